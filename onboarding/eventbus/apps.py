from django.apps import AppConfig


class EventbusConfig(AppConfig):
    name = "onboarding.eventbus"
    label = "eventbus"
    verbose_name = "Event bus"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from onboarding.eventbus import checks  # noqa: F401  (registers system checks)
        from onboarding.eventbus.outbox import write  # noqa: F401  (hears requests start and end)

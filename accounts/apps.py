from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """The Auth Service: creates users and announces ``user.registered``."""

    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from accounts import checks  # noqa: F401  (registers system checks)

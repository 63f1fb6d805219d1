from django.apps import AppConfig


class ProgressionConfig(AppConfig):
    """Meta Progression Service: what a player has unlocked across runs."""

    name = "progression"
    verbose_name = "Meta progression"
    default_auto_field = "django.db.models.BigAutoField"

from django.apps import AppConfig


class BuildingsConfig(AppConfig):
    """Building Service: the buildings of a player's base."""

    name = "buildings"
    default_auto_field = "django.db.models.BigAutoField"

from django.apps import AppConfig


class PlayersConfig(AppConfig):
    """Player Service: the base player record of every user."""

    name = "players"
    default_auto_field = "django.db.models.BigAutoField"

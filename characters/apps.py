from django.apps import AppConfig


class CharactersConfig(AppConfig):
    """Character Service: the characters a player owns, one of them active."""

    name = "characters"
    default_auto_field = "django.db.models.BigAutoField"

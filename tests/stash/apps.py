from django.apps import AppConfig


class StashConfig(AppConfig):
    """Stash Service (test only): the starter items of every user."""

    name = "tests.stash"
    default_auto_field = "django.db.models.BigAutoField"

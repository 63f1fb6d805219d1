from django.apps import AppConfig


class InventoryConfig(AppConfig):
    """Inventory Service (test only): the starter items of every user."""

    name = "tests.inventory"
    default_auto_field = "django.db.models.BigAutoField"

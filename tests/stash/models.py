from django.db import models


class Item(models.Model):
    """An item a user holds (the user lives in another context: no FK)."""

    user_id = models.UUIDField()
    kind = models.CharField(max_length=40)
    quantity = models.PositiveIntegerField(default=1)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user_id", "kind"], name="stash_item_once")
        ]

    def __str__(self):
        return f"{self.kind} x{self.quantity}"

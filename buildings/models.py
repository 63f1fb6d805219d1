from django.db import models
from django.utils import timezone


class Building(models.Model):
    """A building in a user's base; one of each kind per user."""

    class Kind(models.TextChoices):
        HQ = "hq", "HQ"
        WAREHOUSE = "warehouse", "Warehouse"

    # Indexed by one_building_of_a_kind, whose first column it is: a second index on user_id
    # alone served no query more and cost every building a second random-key insert.
    user_id = models.UUIDField()
    kind = models.CharField(max_length=32, choices=Kind.choices)
    level = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["user_id", "kind"]
        constraints = [
            models.UniqueConstraint(fields=["user_id", "kind"], name="one_building_of_a_kind"),
        ]

    def __str__(self):
        return f"{self.get_kind_display()} level {self.level}"

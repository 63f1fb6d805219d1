from django.db import models
from django.db.models import Q
from django.utils import timezone


class Character(models.Model):
    """A player's character. A user has at most one active character (a database constraint)."""

    user_id = models.UUIDField(db_index=True)
    name = models.CharField(max_length=64)
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["user_id"],
                condition=Q(is_active=True),
                name="one_active_character_per_user",
            )
        ]

    def __str__(self):
        return self.name

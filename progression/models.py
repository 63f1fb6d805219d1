from django.db import models
from django.utils import timezone


class MetaProgression(models.Model):
    """A user's meta-progression: one per user, with what they have unlocked."""

    user_id = models.UUIDField(unique=True)
    level = models.PositiveIntegerField(default=1)
    unlocked_weapons = models.JSONField(default=list)
    unlocked_skills = models.JSONField(default=list)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"progression {self.user_id}"

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
        # What it holds, as a building says "HQ level 1": pages and lines that show one are
        # already about its user (the user's page, onboarding_status --user), so the user id
        # would only repeat; the admin's list and change page show it in a column of its own.
        return f"meta progression level {self.level}"

from django.db import models
from django.utils import timezone

from onboarding.contracts import USERNAME_MAX_LENGTH


class Player(models.Model):
    """The base player record, one per user (the user lives in another context: no FK)."""

    user_id = models.UUIDField(unique=True)
    username = models.CharField(max_length=USERNAME_MAX_LENGTH, db_index=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.username

from django.db import models
from django.utils import timezone

from onboarding.contracts import USERNAME_MAX_LENGTH


class Player(models.Model):
    """The base player record, one per user (the user lives in another context: no FK)."""

    user_id = models.UUIDField(unique=True)
    # No index: nothing looks a player up by name (the admin's search is a substring match, which
    # no B-tree serves), and two indexes keyed by random text made every event's insert touch two
    # more random pages once the table outgrew the cache (docs/benchmarks.md, "Grown tables").
    username = models.CharField(max_length=USERNAME_MAX_LENGTH)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.username

import uuid
from collections.abc import Iterable

from onboarding.eventbus import UserDefaults
from players.models import Player


def players_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's Player record, where one exists."""
    return {
        player.user_id: UserDefaults(records=(player,), complete=True)
        for player in Player.objects.filter(user_id__in=list(user_ids))
    }

import uuid
from collections.abc import Iterable

from onboarding.eventbus import UserDefaults, held_user_ids
from players.models import Player


def players_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's Player record, where one exists."""
    return {
        player.user_id: UserDefaults(records=(player,), complete=True)
        for player in Player.objects.filter(user_id__in=list(user_ids))
    }


def players_user_ids(*, after: uuid.UUID | None, limit: int) -> list[uuid.UUID]:
    """The users with rows here, in id order after ``after``: reconcile's search for orphans."""
    return held_user_ids(models=[Player], after=after, limit=limit)

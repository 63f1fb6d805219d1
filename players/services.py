import logging
import uuid
from collections.abc import Iterable

from onboarding.eventbus import insert_ignoring_conflicts
from players.models import Player

logger = logging.getLogger(__name__)


def players_create_defaults(*, users: Iterable[tuple[uuid.UUID, str]]) -> None:
    """Create the player record of each (user_id, username) that has none; others are untouched.

    Idempotent and set-based: one INSERT for the lot, conflicts on ``user_id`` ignored, so a
    replayed or duplicated event creates nothing twice.
    """
    by_user = dict(users)
    insert_ignoring_conflicts(Player, ("user_id", "username"), sorted(by_user.items()))
    logger.debug("default players ensured for %d user(s)", len(by_user))


def player_create_default(*, user_id: uuid.UUID, username: str) -> Player:
    """Create the user's player record; a second call for the same user returns the first."""
    players_create_defaults(users=[(user_id, username)])
    return Player.objects.get(user_id=user_id)

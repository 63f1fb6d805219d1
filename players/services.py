import logging
import uuid
from collections.abc import Iterable

from onboarding.eventbus import erase_users, insert_ignoring_conflicts
from players.models import Player

logger = logging.getLogger(__name__)


def players_create_defaults(*, users: Iterable[tuple[uuid.UUID, str]]) -> None:
    """Create the player record of each (user_id, username) that has none; others are untouched.

    Idempotent and set-based: one INSERT for the lot, conflicts on ``user_id`` ignored, so a
    replayed or duplicated event creates nothing twice.
    """
    by_user = dict(users)
    insert_ignoring_conflicts(Player, ("user_id", "username"), sorted(by_user.items()),
                              unless_erased="players")
    logger.debug("default players ensured for %d user(s)", len(by_user))


def player_create_default(*, user_id: uuid.UUID, username: str) -> Player:
    """Create the user's player record; a second call for the same user returns the first."""
    players_create_defaults(users=[(user_id, username)])
    return Player.objects.get(user_id=user_id)


def players_erase(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Erase each user here (``user.deleted``): their rows go, a tombstone keeps them gone.

    Idempotent, and final: the creation above skips tombstoned users, so a late or repeated
    ``user.registered`` creates nothing for them again.
    """
    user_ids = list(user_ids)
    deleted = erase_users(context="players", models=[Player], user_ids=user_ids)
    logger.debug("erased %d row(s) of %d user(s)", deleted, len(set(user_ids)))


def players_rename(*, renames: Iterable[tuple[uuid.UUID, str]]) -> None:
    """Give each (user_id, username) player its new name (``user.renamed``), in order: of two
    renames of one user, the later one wins. A user without a player here (erased, or whose
    registration has not arrived) is left alone: a reconcile repair sent later carries the
    name the user has then.
    """
    latest = dict(renames)
    for user_id, username in sorted(latest.items()):
        Player.objects.filter(user_id=user_id).update(username=username)
    logger.debug("players renamed: %d", len(latest))

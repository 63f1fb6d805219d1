import logging
import uuid
from collections.abc import Iterable

from characters.defaults import DEFAULT_CHARACTER_NAME
from characters.models import Character
from onboarding.eventbus import erase_users, insert_ignoring_conflicts

logger = logging.getLogger(__name__)


def characters_create_defaults(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Give each new user the default character, active; users with characters keep theirs.

    Idempotent: users who already have a character (active or not) are skipped in the same
    statement, and the one-active-character constraint turns a concurrent duplicate into an
    ignored conflict.
    """
    wanted = set(user_ids)
    insert_ignoring_conflicts(
        Character, ("user_id",), [(user_id,) for user_id in sorted(wanted)],
        same={"name": DEFAULT_CHARACTER_NAME, "is_active": True}, unless_present="user_id",
        unless_erased="characters",
    )
    logger.debug("default characters ensured for %d user(s)", len(wanted))


def character_create_default(*, user_id: uuid.UUID) -> Character:
    """Give a new user the default character, active; a user who has characters keeps them."""
    characters_create_defaults(user_ids=[user_id])
    return Character.objects.filter(user_id=user_id).order_by("-is_active", "id").first()


def characters_erase(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Erase each user here (``user.deleted``): their rows go, a tombstone keeps them gone.

    Idempotent, and final: the creation above skips tombstoned users, so a late or repeated
    ``user.registered`` creates nothing for them again.
    """
    user_ids = list(user_ids)
    deleted = erase_users(context="characters", models=[Character], user_ids=user_ids)
    logger.debug("erased %d row(s) of %d user(s)", deleted, len(set(user_ids)))

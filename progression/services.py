import logging
import uuid
from collections.abc import Iterable

from onboarding.eventbus import erase_users, insert_ignoring_conflicts
from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS
from progression.models import MetaProgression

logger = logging.getLogger(__name__)


def progressions_create_defaults(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Create each user's progression with the starter weapons and skills unlocked.

    Idempotent: an existing progression (a replayed event) is left untouched — conflicts on
    ``user_id`` are ignored, never overwritten.
    """
    wanted = set(user_ids)
    insert_ignoring_conflicts(
        MetaProgression, ("user_id",), [(user_id,) for user_id in sorted(wanted)],
        same={"unlocked_weapons": list(STARTER_WEAPONS), "unlocked_skills": list(STARTER_SKILLS)},
        unless_erased="progression",
    )
    logger.debug("default progressions ensured for %d user(s)", len(wanted))


def progression_create_default(*, user_id: uuid.UUID) -> MetaProgression:
    """Create the user's progression with the starter weapons and skills unlocked."""
    progressions_create_defaults(user_ids=[user_id])
    return MetaProgression.objects.get(user_id=user_id)


def progression_erase(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Erase each user here (``user.deleted``): their rows go, a tombstone keeps them gone.

    Idempotent, and final: the creation above skips tombstoned users, so a late or repeated
    ``user.registered`` creates nothing for them again.
    """
    user_ids = list(user_ids)
    deleted = erase_users(context="progression", models=[MetaProgression], user_ids=user_ids)
    logger.debug("erased %d row(s) of %d user(s)", deleted, len(set(user_ids)))

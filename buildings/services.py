import logging
import uuid
from collections.abc import Iterable

from buildings.defaults import STARTER_BUILDINGS
from buildings.models import Building
from onboarding.eventbus import erase_users, insert_ignoring_conflicts

logger = logging.getLogger(__name__)


def buildings_create_defaults(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Create the starter buildings each user does not have yet.

    Idempotent: one building of a kind per user (a database constraint); existing ones, and
    their levels, are left alone.
    """
    wanted = set(user_ids)
    insert_ignoring_conflicts(
        Building, ("user_id", "kind", "level"),
        [(user_id, kind, level) for user_id in sorted(wanted) for kind, level in STARTER_BUILDINGS],
        unless_erased="buildings",
    )
    logger.debug("default buildings ensured for %d user(s)", len(wanted))


def buildings_create_default(*, user_id: uuid.UUID) -> list[Building]:
    """Create the starter buildings the user does not have yet; return all of theirs."""
    buildings_create_defaults(user_ids=[user_id])
    return list(Building.objects.filter(user_id=user_id))


def buildings_erase(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Erase each user here (``user.deleted``): their rows go, a tombstone keeps them gone.

    Idempotent, and final: the creation above skips tombstoned users, so a late or repeated
    ``user.registered`` creates nothing for them again.
    """
    user_ids = list(user_ids)
    deleted = erase_users(context="buildings", models=[Building], user_ids=user_ids)
    logger.debug("erased %d row(s) of %d user(s)", deleted, len(set(user_ids)))

import logging
import uuid

from buildings.defaults import STARTER_BUILDINGS
from buildings.models import Building

logger = logging.getLogger(__name__)


def buildings_create_default(*, user_id: uuid.UUID) -> list[Building]:
    """Create the starter buildings the user does not have yet; return all of theirs.

    Idempotent: a replayed event creates nothing (one building of a kind per user).
    """
    have = set(Building.objects.filter(user_id=user_id).values_list("kind", flat=True))
    missing = [
        Building(user_id=user_id, kind=kind, level=level)
        for kind, level in STARTER_BUILDINGS
        if kind not in have
    ]
    if missing:
        Building.objects.bulk_create(missing)
        logger.info("default buildings created user_id=%s count=%d", user_id, len(missing))
    return list(Building.objects.filter(user_id=user_id))

import uuid
from collections import defaultdict
from collections.abc import Iterable

from buildings.defaults import STARTER_BUILDINGS
from buildings.models import Building
from onboarding.eventbus import UserDefaults, held_user_ids


def buildings_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's buildings, where any exist; complete once every starter kind is there."""
    starter = {kind for kind, _ in STARTER_BUILDINGS}
    found = defaultdict(list)
    for building in Building.objects.filter(user_id__in=list(user_ids)):
        found[building.user_id].append(building)
    return {
        user_id: UserDefaults(records=tuple(rows), complete=starter <= {b.kind for b in rows})
        for user_id, rows in found.items()
    }


def buildings_user_ids(*, after: uuid.UUID | None, limit: int) -> list[uuid.UUID]:
    """The users with rows here, in id order after ``after``: reconcile's search for orphans."""
    return held_user_ids(models=[Building], after=after, limit=limit)

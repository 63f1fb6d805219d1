import uuid
from collections import defaultdict
from collections.abc import Iterable

from characters.models import Character
from onboarding.eventbus import UserDefaults, held_user_ids


def characters_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's characters, where any exist; complete once one of them is active."""
    found = defaultdict(list)
    for character in Character.objects.filter(user_id__in=list(user_ids)).order_by("created_at"):
        found[character.user_id].append(character)
    return {
        user_id: UserDefaults(records=tuple(rows), complete=any(c.is_active for c in rows))
        for user_id, rows in found.items()
    }


def characters_user_ids(*, after: uuid.UUID | None, limit: int) -> list[uuid.UUID]:
    """The users with rows here, in id order after ``after``: reconcile's search for orphans."""
    return held_user_ids(models=[Character], after=after, limit=limit)

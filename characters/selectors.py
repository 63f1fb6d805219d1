import uuid
from collections import defaultdict
from collections.abc import Iterable

from characters.models import Character
from onboarding.eventbus import UserDefaults


def characters_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's characters, where any exist; complete once one of them is active."""
    found = defaultdict(list)
    for character in Character.objects.filter(user_id__in=list(user_ids)).order_by("created_at"):
        found[character.user_id].append(character)
    return {
        user_id: UserDefaults(records=tuple(rows), complete=any(c.is_active for c in rows))
        for user_id, rows in found.items()
    }

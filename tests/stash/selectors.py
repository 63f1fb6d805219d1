import uuid
from collections import defaultdict
from collections.abc import Iterable

from onboarding.eventbus import UserDefaults
from tests.stash.models import Item
from tests.stash.services import STARTER_ITEMS


def stash_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    found = defaultdict(list)
    for item in Item.objects.filter(user_id__in=list(user_ids)):
        found[item.user_id].append(item)
    return {
        user_id: UserDefaults(
            records=tuple(items), complete={i.kind for i in items} >= set(STARTER_ITEMS)
        )
        for user_id, items in found.items()
    }

import uuid
from collections.abc import Iterable

from tests.stash.models import Item

STARTER_ITEMS = {"medkit": 2}


def stash_create_defaults(*, user_ids: Iterable[uuid.UUID]) -> None:
    """Give each user the starter items; idempotent (the unique constraint ignores repeats)."""
    Item.objects.bulk_create(
        [Item(user_id=user_id, kind=kind, quantity=quantity)
         for user_id in set(user_ids) for kind, quantity in STARTER_ITEMS.items()],
        ignore_conflicts=True,
    )

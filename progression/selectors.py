import uuid
from collections.abc import Iterable

from onboarding.eventbus import UserDefaults, held_user_ids
from progression.models import MetaProgression


def progression_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's meta-progression, where one exists."""
    return {
        progression.user_id: UserDefaults(records=(progression,), complete=True)
        for progression in MetaProgression.objects.filter(user_id__in=list(user_ids))
    }


def progression_user_ids(*, after: uuid.UUID | None, limit: int) -> list[uuid.UUID]:
    """The users with rows here, in id order after ``after``: reconcile's search for orphans."""
    return held_user_ids(models=[MetaProgression], after=after, limit=limit)

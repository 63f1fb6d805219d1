import uuid
from collections.abc import Iterable

from onboarding.eventbus import UserDefaults
from progression.models import MetaProgression


def progression_defaults(*, user_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, UserDefaults]:
    """Each user's meta-progression, where one exists."""
    return {
        progression.user_id: UserDefaults(records=(progression,), complete=True)
        for progression in MetaProgression.objects.filter(user_id__in=list(user_ids))
    }

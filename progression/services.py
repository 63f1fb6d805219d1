import logging
import uuid

from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS
from progression.models import MetaProgression

logger = logging.getLogger(__name__)


def progression_create_default(*, user_id: uuid.UUID) -> MetaProgression:
    """Create the user's progression with the starter weapons and skills unlocked.

    Idempotent: an existing progression (a replayed event) is returned untouched.
    """
    progression, created = MetaProgression.objects.get_or_create(
        user_id=user_id,
        defaults={
            "unlocked_weapons": list(STARTER_WEAPONS),
            "unlocked_skills": list(STARTER_SKILLS),
        },
    )
    if created:
        logger.info("default progression created user_id=%s", user_id)
    return progression

import logging
import uuid

from characters.defaults import DEFAULT_CHARACTER_NAME
from characters.models import Character

logger = logging.getLogger(__name__)


def character_create_default(*, user_id: uuid.UUID) -> Character:
    """Give a new user the default character, active; a user who has characters keeps them.

    Idempotent: for a user who already has a character (a replayed event) nothing is created.
    """
    existing = Character.objects.filter(user_id=user_id).order_by("-is_active", "id").first()
    if existing is not None:
        return existing
    character = Character.objects.create(
        user_id=user_id, name=DEFAULT_CHARACTER_NAME, is_active=True
    )
    logger.info("default character created user_id=%s", user_id)
    return character

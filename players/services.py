import logging
import uuid

from players.models import Player

logger = logging.getLogger(__name__)


def player_create_default(*, user_id: uuid.UUID, username: str) -> Player:
    """Create the user's player record; a second call for the same user returns the first."""
    player, created = Player.objects.get_or_create(user_id=user_id, defaults={"username": username})
    if created:
        logger.info("default player created user_id=%s", user_id)
    return player

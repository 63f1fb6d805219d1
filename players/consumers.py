"""What the Player Service consumes (run with ``manage.py consume players``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus.registry import Subscription
from players.services import player_create_default


def on_user_registered(event: UserRegistered) -> None:
    player_create_default(user_id=event.user_id, username=event.username)


SUBSCRIPTIONS = [Subscription(UserRegistered, on_user_registered)]

"""What the Character Service consumes (run with ``manage.py consume characters``)."""

from characters.services import character_create_default
from onboarding.contracts import UserRegistered
from onboarding.eventbus.registry import Subscription


def on_user_registered(event: UserRegistered) -> None:
    character_create_default(user_id=event.user_id)


SUBSCRIPTIONS = [Subscription(UserRegistered, on_user_registered)]

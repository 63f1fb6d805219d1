"""What the Meta Progression Service consumes (``manage.py consume progression``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus.registry import Subscription
from progression.services import progression_create_default


def on_user_registered(event: UserRegistered) -> None:
    progression_create_default(user_id=event.user_id)


SUBSCRIPTIONS = [Subscription(UserRegistered, on_user_registered)]

"""What the Building Service consumes (run with ``manage.py consume buildings``)."""

from buildings.services import buildings_create_default
from onboarding.contracts import UserRegistered
from onboarding.eventbus.registry import Subscription


def on_user_registered(event: UserRegistered) -> None:
    buildings_create_default(user_id=event.user_id)


SUBSCRIPTIONS = [Subscription(UserRegistered, on_user_registered)]

"""What the Player Service consumes (run with ``manage.py consume players``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus.registry import Subscription
from players.services import players_create_defaults


def on_users_registered(events: list[UserRegistered]) -> None:
    players_create_defaults(users=[(event.user_id, event.username) for event in events])


SUBSCRIPTIONS = [Subscription(UserRegistered, on_users_registered)]

"""What the Player Service consumes (run with ``manage.py consume players``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus import Subscription
from players.selectors import players_defaults
from players.services import players_create_defaults


def on_users_registered(events: list[UserRegistered]) -> None:
    players_create_defaults(users=[(event.user_id, event.username) for event in events])


SUBSCRIPTIONS = [Subscription(UserRegistered, on_users_registered)]
# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = players_defaults

"""What the Character Service consumes (run with ``manage.py consume characters``)."""

from characters.selectors import characters_defaults
from characters.services import characters_create_defaults
from onboarding.contracts import UserRegistered
from onboarding.eventbus import Subscription


def on_users_registered(events: list[UserRegistered]) -> None:
    characters_create_defaults(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [Subscription(UserRegistered, on_users_registered)]
# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = characters_defaults

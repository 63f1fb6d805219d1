"""What the Stash Service consumes (run with ``manage.py consume stash``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus import Subscription
from tests.stash.selectors import stash_defaults
from tests.stash.services import stash_create_defaults


def on_users_registered(events: list[UserRegistered]) -> None:
    stash_create_defaults(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [Subscription(UserRegistered, on_users_registered)]
DEFAULTS = stash_defaults

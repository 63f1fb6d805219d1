"""What the Character Service consumes (run with ``manage.py consume characters``)."""

from characters.selectors import characters_defaults, characters_user_ids
from characters.services import characters_create_defaults, characters_erase
from onboarding.contracts import UserDeleted, UserRegistered
from onboarding.eventbus import Subscription


def on_users_registered(events: list[UserRegistered]) -> None:
    characters_create_defaults(user_ids=[event.user_id for event in events])


def on_users_deleted(events: list[UserDeleted]) -> None:
    characters_erase(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [
    Subscription(UserRegistered, on_users_registered),
    Subscription(UserDeleted, on_users_deleted),
]

# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = characters_defaults
# Which users hold rows here: reconcile's search for orphans (rows of users accounts does not
# know).
USERS = characters_user_ids

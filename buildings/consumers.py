"""What the Building Service consumes (run with ``manage.py consume buildings``)."""

from buildings.selectors import buildings_defaults, buildings_user_ids
from buildings.services import buildings_create_defaults, buildings_erase
from onboarding.contracts import UserDeleted, UserRegistered
from onboarding.eventbus import Subscription


def on_users_registered(events: list[UserRegistered]) -> None:
    buildings_create_defaults(user_ids=[event.user_id for event in events])


def on_users_deleted(events: list[UserDeleted]) -> None:
    buildings_erase(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [
    Subscription(UserRegistered, on_users_registered),
    Subscription(UserDeleted, on_users_deleted),
]

# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = buildings_defaults
# Which users hold rows here: reconcile's search for orphans (rows of users accounts does not
# know).
USERS = buildings_user_ids

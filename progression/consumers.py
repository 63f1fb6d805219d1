"""What the Meta Progression Service consumes (run with ``manage.py consume progression``)."""

from onboarding.contracts import UserDeleted, UserRegistered
from onboarding.eventbus import Subscription
from progression.selectors import progression_defaults, progression_user_ids
from progression.services import progression_erase, progressions_create_defaults


def on_users_registered(events: list[UserRegistered]) -> None:
    progressions_create_defaults(user_ids=[event.user_id for event in events])


def on_users_deleted(events: list[UserDeleted]) -> None:
    progression_erase(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [
    Subscription(UserRegistered, on_users_registered),
    Subscription(UserDeleted, on_users_deleted),
]

# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = progression_defaults
# Which users hold rows here: reconcile's search for orphans (rows of users accounts does not
# know).
USERS = progression_user_ids

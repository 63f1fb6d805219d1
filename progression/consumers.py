"""What the Meta Progression Service consumes (``manage.py consume progression``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus import Subscription
from progression.selectors import progression_defaults
from progression.services import progressions_create_defaults


def on_users_registered(events: list[UserRegistered]) -> None:
    progressions_create_defaults(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [Subscription(UserRegistered, on_users_registered)]
# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = progression_defaults

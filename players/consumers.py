"""What the Player Service consumes (run with ``manage.py consume players``)."""

from onboarding.contracts import UserDeleted, UserRegistered, UserRenamed
from onboarding.eventbus import Subscription
from players.selectors import players_defaults, players_user_ids
from players.services import players_create_defaults, players_erase, players_rename


def on_users_registered(events: list[UserRegistered]) -> None:
    players_create_defaults(users=[(event.user_id, event.username) for event in events])


def on_users_deleted(events: list[UserDeleted]) -> None:
    players_erase(user_ids=[event.user_id for event in events])


def on_users_renamed(events: list[UserRenamed]) -> None:
    players_rename(renames=[(event.user_id, event.username) for event in events])


SUBSCRIPTIONS = [
    Subscription(UserRegistered, on_users_registered),
    Subscription(UserDeleted, on_users_deleted),
    Subscription(UserRenamed, on_users_renamed),
]

# Which of a user's defaults exist: the per-user story, readiness and reconciliation.
DEFAULTS = players_defaults
# Which users hold rows here: reconcile's search for orphans (rows of users accounts does not
# know).
USERS = players_user_ids

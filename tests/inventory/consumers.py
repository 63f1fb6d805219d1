"""What the Inventory Service consumes (run with ``manage.py consume inventory``)."""

from onboarding.contracts import UserRegistered
from onboarding.eventbus.registry import Subscription
from tests.inventory.selectors import inventory_defaults
from tests.inventory.services import inventory_create_defaults


def on_users_registered(events: list[UserRegistered]) -> None:
    inventory_create_defaults(user_ids=[event.user_id for event in events])


SUBSCRIPTIONS = [Subscription(UserRegistered, on_users_registered)]
DEFAULTS = inventory_defaults

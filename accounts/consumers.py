"""What the Auth Service consumes (run with ``manage.py consume accounts``): the services'
announcements, into the readiness projection the game client polls.

Accounts reads no service's database to answer ``GET /api/auth/me/onboarding``: each service
announces what it did for its users (``user.onboarded.<service>``, ``user.erased.<service>``) and
this consumer keeps ``ServiceReadiness`` from them, with the inbox, ordering and dead letters
every consumer has.
"""

from accounts.services import readiness_record_erased, readiness_record_onboarded
from onboarding.contracts import UserErased, UserOnboarded
from onboarding.eventbus import Subscription


def on_users_onboarded(events: list[UserOnboarded]) -> None:
    readiness_record_onboarded(onboarded=[
        (user_id, event.service, event.onboarded_at)
        for event in events for user_id in event.user_ids])


def on_users_erased(events: list[UserErased]) -> None:
    readiness_record_erased(erased=[
        (user_id, event.service, event.erased_at)
        for event in events for user_id in event.user_ids])


SUBSCRIPTIONS = [
    Subscription(UserOnboarded, on_users_onboarded),
    Subscription(UserErased, on_users_erased),
]

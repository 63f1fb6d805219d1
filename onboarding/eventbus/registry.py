"""Which consumers exist: each context app declares its own in ``<app>/consumers.py``.

A context's ``consumers.py`` lists ``SUBSCRIPTIONS``: which contract events it handles and the
handler (a one-line call into one of its services) for each; ``DEFAULTS``: a selector that
says which of a user's defaults exist (for the per-user story, readiness and reconciliation);
and ``USERS``: a selector that pages through the users it holds rows of (``reconcile``'s search
for orphans).
This module discovers them, the way ``django.contrib.admin`` discovers ``admin.py``. A consumer
is named after its app label; that name is also its JetStream durable and its key in the inbox
and dead letters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import import_module

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import module_has_submodule

from onboarding.eventbus.subjects import subject_matches


@dataclass(frozen=True)
class Subscription:
    """Handle events of contract class ``event`` with ``handler(events)``.

    The handler receives a list (one event, or a whole fetched batch) and runs inside the
    consumer's database transaction. It must be idempotent: the inbox skips exact
    redeliveries, but the same fact may still arrive twice under two event ids.
    """

    event: type
    handler: Callable[[object], None]


@dataclass(frozen=True)
class UserDefaults:
    """What one context holds for one user: the records that exist, and whether they are all
    the defaults a new user gets there."""

    records: tuple
    complete: bool


# ``DEFAULTS(user_ids=[...])`` → ``{user_id: UserDefaults}``, with an entry only for users that
# have at least one record; runs on the context's own database (its models are routed there).
DefaultsSelector = Callable[..., dict]


@dataclass(frozen=True)
class ConsumerSpec:
    name: str
    subscriptions: tuple[Subscription, ...]
    defaults: DefaultsSelector | None = None
    # ``USERS(after=<user id or None>, limit=n)`` → the next ``n`` user ids it holds, in order.
    users: Callable[..., list] | None = None

    @property
    def durable(self) -> str:
        return self.name

    @property
    def subjects(self) -> list[str]:
        return [s.event.subject for s in self.subscriptions]

    @property
    def database(self) -> str:
        """The alias of the context's own database, where its inbox lives.

        Never a fallback to ``default``: a consumer whose app the settings did not derive as a
        bounded context would put its inbox beside accounts (``manage.py check`` reports it,
        eventbus.E010).
        """
        try:
            return settings.CONTEXT_DATABASES[self.name]
        except KeyError:
            raise ImproperlyConfigured(
                f"consumer {self.name} has no database of its own: it is not in "
                f"settings.BOUNDED_CONTEXTS (run `manage.py check`)"
            ) from None

    def handler_for(self, subject: str) -> Callable[[object], None] | None:
        """The handler of events published on ``subject`` (a subscription may name a pattern:
        ``user.onboarded.*``)."""
        for subscription in self.subscriptions:
            if subject_matches(subject, subscription.event.subject):
                return subscription.handler
        return None


@cache
def get_consumers() -> dict[str, ConsumerSpec]:
    found = {}
    for app_config in apps.get_app_configs():
        if not module_has_submodule(app_config.module, "consumers"):
            continue
        module = import_module(f"{app_config.name}.consumers")
        subscriptions = tuple(getattr(module, "SUBSCRIPTIONS", ()))
        if subscriptions:
            found[app_config.label] = ConsumerSpec(
                app_config.label, subscriptions, getattr(module, "DEFAULTS", None),
                getattr(module, "USERS", None),
            )
    return found


def get_services() -> dict[str, ConsumerSpec]:
    """The consumers that set users up: those with a ``DEFAULTS`` selector (the per-user story,
    readiness, ``reconcile``), not accounts' own, which keeps the readiness projection from
    their announcements."""
    return {name: spec for name, spec in get_consumers().items() if spec.defaults is not None}

"""Which services have set a user up: read from each context's own database.

Each context declares, beside what it consumes, a ``DEFAULTS`` selector (``<app>/consumers.py``)
that reports which of a user's defaults exist there. This module asks every registered
consumer's selector, so the per-user story (``onboarding_status --user``, the admin) and
``reconcile`` read the same answer, and a new service is included by declaring its selector —
nothing here names a context. These read each context's database, with credentials the web need
not hold: the game client's readiness endpoint answers from accounts' own projection instead
(``accounts.models.ServiceReadiness``), and only the list of services comes from here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from contextlib import contextmanager

from django.db import DatabaseError

from onboarding.eventbus.registry import UserDefaults, get_consumers, get_services


class ServiceUnreachable(DatabaseError):
    """A service's database did not answer: one line naming the service, its database and
    what the driver said (never a password: neither the label nor libpq's messages carry one).
    """

    def __init__(self, service: str, alias: str, error: Exception) -> None:
        from onboarding.eventbus.ops.labels import unreachable

        super().__init__(f"service {service}: {unreachable(alias, error)}")
        self.service, self.alias = service, alias


@contextmanager
def reading_service(spec):
    """Reads of ``spec``'s own database: a failure to reach it raises
    :class:`ServiceUnreachable` (these reads need the operator's credentials for every
    service's database, which accounts' own processes do not hold)."""
    try:
        yield
    except ServiceUnreachable:
        raise
    except DatabaseError as exc:
        raise ServiceUnreachable(spec.name, spec.database, exc) from exc


def onboarding_services() -> list[str]:
    """The services that set a new user up: every registered consumer with a ``DEFAULTS``
    selector (what the readiness endpoint lists; accounts' own consumer has none)."""
    return list(get_services())


def onboarding_readiness(
    *, user_ids: Iterable[uuid.UUID], services: Iterable[str] | None = None
) -> dict[str, dict[uuid.UUID, UserDefaults]]:
    """Per service: ``{user_id: UserDefaults}`` for the given users that have any record there.

    A user missing from a service's mapping has nothing there yet. Services without a
    ``DEFAULTS`` selector are left out.
    """
    ids = list(user_ids)
    consumers = get_consumers()
    names = list(services) if services is not None else list(consumers)
    found = {}
    for name in names:
        if consumers[name].defaults is not None:
            with reading_service(consumers[name]):
                found[name] = consumers[name].defaults(user_ids=ids)
    return found


def user_readiness(*, user_id: uuid.UUID) -> dict[str, UserDefaults | None]:
    """One user: per service, what exists (``None`` when nothing does yet)."""
    return {
        name: found.get(user_id)
        for name, found in onboarding_readiness(user_ids=[user_id]).items()
    }

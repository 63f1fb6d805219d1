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

from onboarding.eventbus.registry import UserDefaults, get_consumers, get_services


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
    return {
        name: consumers[name].defaults(user_ids=ids)
        for name in names
        if consumers[name].defaults is not None
    }


def user_readiness(*, user_id: uuid.UUID) -> dict[str, UserDefaults | None]:
    """One user: per service, what exists (``None`` when nothing does yet)."""
    return {
        name: found.get(user_id)
        for name, found in onboarding_readiness(user_ids=[user_id]).items()
    }

"""Reconciliation: which registered users lack a service's defaults, and the events that repair it.

The accounts database is the source of truth for who registered — not the stream, whose history
ends at ``NATS_STREAM_MAX_AGE`` and which says nothing about defaults lost *after* an event was
processed (a restored backup, a row deleted by hand). So reconcile walks the users table and asks
every service's ``DEFAULTS`` selector (through ``onboarding.readiness``, the one place that
crosses contexts) which of them are set up.

Batching: users are read in primary-key order, ``chunk_size`` at a time, by keyset pagination
(``pk > last seen``, never ``OFFSET``): each chunk costs one indexed query on the accounts
database and one query per service, whatever the table's size, and only one chunk is in memory.
A user inserted behind the cursor during a run (UUIDs are random) is not seen by that run; it is
younger than the grace anyway, and the next run sees it.

Users registered less than ``min_age`` ago are left out: their event may still be on its way
(the outbox, the stream, a consumer's batch), and a cron job must not alarm on them.

The repair of (service, user) is the user's ``user.registered`` rebuilt from the row by
``accounts.services.user_registered_event`` (the builder registration uses) and addressed to that
service alone (``onboarding.eventbus.redelivery``). Its event id — ``Event-Id`` and
``Nats-Msg-Id`` — is :func:`repair_event_id`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.conf import settings

from accounts.models import User
from accounts.services import user_registered_event
from onboarding.eventbus.redelivery import Redelivery
from onboarding.eventbus.registry import get_consumers
from onboarding.readiness import onboarding_readiness

DEFAULT_CHUNK_SIZE = 1000
# uuid5 namespace of repair event ids (fixed: an id must come out the same in every process).
REPAIR_NAMESPACE = uuid.UUID("5d0c4e52-3b1e-4f7a-9d7e-2a6f1c0b9e41")
# The columns the event is built from: nothing else of a user is loaded.
EVENT_COLUMNS = ("id", "username", "email", "date_joined")


def reconcilable_services() -> list[str]:
    """The services reconcile can check: every consumer that declares a DEFAULTS selector."""
    return [name for name, spec in get_consumers().items() if spec.defaults is not None]


def users_to_check(*, since: dt.datetime | None, until: dt.datetime):
    """Users registered in ``[since, until]`` (``since`` None: from the first)."""
    users = User.objects.filter(date_joined__lte=until)
    if since is not None:
        users = users.filter(date_joined__gte=since)
    return users


def user_chunks(
    *, since: dt.datetime | None, until: dt.datetime, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[list[User]]:
    """Those users, ``chunk_size`` at a time, by keyset pagination on the primary key.

    One query per chunk (the last chunk, if full, costs one more that finds nothing).
    """
    users = users_to_check(since=since, until=until).only(*EVENT_COLUMNS).order_by("pk")
    last = None
    while True:
        page = users if last is None else users.filter(pk__gt=last)
        chunk = list(page[:chunk_size])
        if chunk:
            yield chunk
        if len(chunk) < chunk_size:
            return
        last = chunk[-1].pk


@dataclass
class ChunkResult:
    """One chunk: its users, and per service the users that lack that service's defaults."""

    users: list[User]
    missing: dict[str, list[User]] = field(default_factory=dict)


def reconcile_scan(
    *,
    services: list[str],
    since: dt.datetime | None,
    until: dt.datetime,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[ChunkResult]:
    """Per chunk of users, who lacks which service's defaults.

    A user lacks a service's defaults when the service holds nothing for them, or only part of
    them (``UserDefaults.complete`` false: a building deleted of two). One query per service and
    chunk (``onboarding_readiness`` asks each selector for the whole chunk at once).
    """
    for users in user_chunks(since=since, until=until, chunk_size=chunk_size):
        found = onboarding_readiness(user_ids=[user.pk for user in users], services=services)
        result = ChunkResult(users)
        for service in services:
            present = found.get(service, {})
            result.missing[service] = [
                user for user in users
                if (defaults := present.get(user.pk)) is None or not defaults.complete
            ]
        yield result


def repair_event_id(*, service: str, user_id: uuid.UUID, now: dt.datetime) -> str:
    """The id of a repair of ``service`` for ``user_id`` sent at ``now``.

    Deterministic per (service, user, window of ``NATS_DUPLICATE_WINDOW`` seconds): a second
    ``--repair`` fired before the consumer caught up publishes the same ``Nats-Msg-Id``, and
    JetStream drops the copy (its PubAck says duplicate); were a copy stored anyway (two runs
    either side of a window's edge), the consumer's inbox or, failing that, the handlers' unique
    constraints make it a no-op. It differs from the original event's id, which the inbox
    already holds, and it is the same for every run in a window, so defaults lost *again* within
    the window of a processed repair need ``--force`` (a fresh random id) or the next window.
    """
    window = max(1, int(settings.NATS_DUPLICATE_WINDOW))
    bucket = int(now.timestamp()) // window
    return str(uuid.uuid5(REPAIR_NAMESPACE, f"{service}/{user_id}/{bucket}"))


def repairs_for(
    result: ChunkResult, *, now: dt.datetime, force: bool = False
) -> list[Redelivery]:
    """The redeliveries that repair a chunk: one per (service, user) lacking defaults."""
    return [
        Redelivery(
            consumer=service,
            event=user_registered_event(user=user),
            event_id=(
                str(uuid.uuid4()) if force
                else repair_event_id(service=service, user_id=user.pk, now=now)
            ),
        )
        for service, users in result.missing.items()
        for user in users
    ]

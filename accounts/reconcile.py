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
service alone (``onboarding.eventbus.deadletters.redelivery``). Its event id — ``Event-Id`` and
``Nats-Msg-Id`` — is :func:`repair_event_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connections

from accounts.models import User
from accounts.services import user_registered_event
from onboarding.eventbus.deadletters.redelivery import Redelivery, redeliver, redeliveries_record
from onboarding.eventbus.nats.connection import session
from onboarding.eventbus.registry import get_consumers
from onboarding.readiness import onboarding_readiness

DEFAULT_CHUNK_SIZE = 1000
# Users named per service in a report; the counts are always complete.
LISTED_PER_SERVICE = 50
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


@dataclass
class ServiceTotals:
    missing: int = 0
    repaired: int = 0  # stored by JetStream for the consumer
    already_sent: int = 0  # dropped by JetStream: the same repair is already in the stream
    listed: list[tuple[str, str]] = field(default_factory=list)  # (user id, username)


class Totals:
    def __init__(self, services: list[str]) -> None:
        self.checked = 0
        self.services = {name: ServiceTotals() for name in services}

    def add(self, result: ChunkResult) -> None:
        self.checked += len(result.users)
        for service, users in result.missing.items():
            totals = self.services[service]
            totals.missing += len(users)
            room = LISTED_PER_SERVICE - len(totals.listed)
            totals.listed += [(str(user.pk), user.username) for user in users[:max(room, 0)]]

    def sent(self, repairs, stored: list[bool]) -> None:
        for repair, was_stored in zip(repairs, stored, strict=True):
            totals = self.services[repair.consumer]
            if was_stored:
                totals.repaired += 1
            else:
                totals.already_sent += 1

    @property
    def missing(self) -> int:
        return sum(t.missing for t in self.services.values())

    @property
    def repaired(self) -> int:
        return sum(t.repaired for t in self.services.values())

    @property
    def already_sent(self) -> int:
        return sum(t.already_sent for t in self.services.values())

    def sent_so_far(self) -> str:
        """What a repair that failed had sent before, for its error message."""
        return (
            f"{self.repaired} repair(s) sent and acknowledged before it"
            + (f" ({self.already_sent} already in the stream)" if self.already_sent else "")
            + "; run it again: repairs are idempotent"
        )


def reconcile_run(
    totals: Totals,
    *,
    since: dt.datetime | None,
    until: dt.datetime,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    repair: bool = False,
    force: bool = False,
    now: dt.datetime,
    on_chunk: Callable[[Totals], None] | None = None,
) -> Totals:
    """Check every user registered in ``[since, until]`` against ``totals``' services, adding
    up into ``totals`` (``on_chunk(totals)`` after each chunk: a progress bar); with ``repair``,
    re-deliver each missing (service, user)'s event to that service alone.

    Repairing, the scan runs on one worker thread (the ORM may not run on the event loop) and
    publishing on the loop; NATS is connected on the first chunk that needs a repair, with this
    process's own NATS settings (in a secured deployment, the ``replay`` role's). Raises
    ``NatsAccessError``, ``TimeoutError`` or ``RedeliveryError`` if a repair cannot be sent;
    ``totals`` then says what was sent before (:meth:`Totals.sent_so_far`).
    """
    scan = reconcile_scan(services=list(totals.services), since=since, until=until,
                          chunk_size=chunk_size)
    if not repair:
        for result in scan:
            totals.add(result)
            if on_chunk:
                on_chunk(totals)
        return totals
    executor = ThreadPoolExecutor(1, thread_name_prefix="reconcile")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            nc = js = None
            while True:
                result = await loop.run_in_executor(executor, next, scan, None)
                if result is None:
                    break
                totals.add(result)
                repairs = repairs_for(result, now=now, force=force)
                if repairs:
                    if js is None:
                        nc = await stack.enter_async_context(
                            session("reconcile", timeout=settings.NATS_REQUEST_TIMEOUT * 2)
                        )
                        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
                    acks = await redeliver(nc, js, repairs)
                    await loop.run_in_executor(executor, redeliveries_record, repairs, acks)
                    totals.sent(repairs, [not ack.duplicate for ack in acks])
                if on_chunk:
                    on_chunk(totals)

    try:
        asyncio.run(run())
    finally:
        executor.submit(connections.close_all).result()
        executor.shutdown()
    return totals


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def reconcile_report(totals: Totals, *, since: dt.datetime | None, until: dt.datetime,
                     min_age: float, repair: bool) -> dict:
    """What a run found, as ``reconcile --json`` prints it."""
    return {
        "checked": totals.checked,
        "since": _iso(since),
        "until": _iso(until),
        "min_age": min_age,
        "repair": repair,
        "complete": totals.missing == 0,
        "services": {
            name: {
                "checked": totals.checked,
                "missing": t.missing,
                "repaired": t.repaired,
                "already_sent": t.already_sent,
                "missing_users": [
                    {"userId": user_id, "username": username} for user_id, username in t.listed
                ],
                "missing_users_truncated": t.missing > len(t.listed),
            }
            for name, t in totals.services.items()
        },
    }

"""Reconciliation: which registered users lack a service's defaults, which rows belong to no user,
and the events that repair both.

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

Orphans, the other way round: rows a service holds for a user id the users table does not have
(left by deletions made before ``user.deleted`` existed, or by a registration whose user is gone).
Each service's ``USERS`` selector pages through the ids it holds, ``chunk_size`` at a time by
keyset on ``user_id``, and each page is checked against the users table in one query. The repair
of an orphan (service, user) is a ``user.deleted`` addressed to that service alone: it erases the
rows and keeps a tombstone there, so no later ``user.registered`` (a replay, an earlier repair)
brings them back. A user whose deletion accounts announced less than ``min_age`` ago is no orphan
yet: that ``user.deleted`` may still be on its way.
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

from accounts.models import ServiceReadiness, User
from accounts.services import readiness_record_onboarded, user_registered_event
from onboarding.contracts import UserDeleted
from onboarding.eventbus.deadletters.redelivery import Redelivery, redeliver, redeliveries_record
from onboarding.eventbus.ids import uuid7
from onboarding.eventbus.models import OUTBOX_DATABASE, Erasure
from onboarding.eventbus.nats.connection import session
from onboarding.eventbus.registry import get_consumers
from onboarding.readiness import onboarding_readiness, onboarding_services, reading_service

DEFAULT_CHUNK_SIZE = 1000
# Users named per service in a report; the counts are always complete.
LISTED_PER_SERVICE = 50
# uuid5 namespace of repair event ids (fixed: an id must come out the same in every process).
REPAIR_NAMESPACE = uuid.UUID("5d0c4e52-3b1e-4f7a-9d7e-2a6f1c0b9e41")
# The columns the event is built from: nothing else of a user is loaded.
EVENT_COLUMNS = ("id", "username", "email", "date_joined")


def reconcilable_services() -> list[str]:
    """The services reconcile can check: every consumer that declares a DEFAULTS selector."""
    return onboarding_services()


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
    # Per service, the users whose readiness in accounts' projection disagrees with the
    # service's own rows, each with the truth (whether the service holds all their defaults).
    stale: dict[str, list[tuple[uuid.UUID, bool]]] = field(default_factory=dict)


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
        ids = [user.pk for user in users]
        found = onboarding_readiness(user_ids=ids, services=services)
        projected = {
            (row.user_id, row.service): row.ready
            for row in ServiceReadiness.objects.filter(user_id__in=ids, service__in=services)
        }
        result = ChunkResult(users)
        for service in services:
            present = found.get(service, {})
            complete = {user.pk: (defaults := present.get(user.pk)) is not None
                        and defaults.complete for user in users}
            result.missing[service] = [user for user in users if not complete[user.pk]]
            result.stale[service] = [
                (user.pk, complete[user.pk]) for user in users
                if projected.get((user.pk, service), False) != complete[user.pk]
            ]
        yield result


def readiness_repair(stale: dict[str, list[tuple[uuid.UUID, bool]]], *,
                     now: dt.datetime) -> int:
    """Set accounts' projection to what the services' rows say: ready where a service holds
    all of a user's defaults (its announcement was lost, say), not ready where it does not (its
    rows were lost: the user.registered repair makes it announce again). Accounts owns the
    projection, so this is a direct write. Returns how many rows it set."""
    ready = [(user_id, service, now) for service, users in stale.items()
             for user_id, truth in users if truth]
    readiness_record_onboarded(onboarded=ready)
    unready = 0
    for service, users in stale.items():
        lost = [user_id for user_id, truth in users if not truth]
        if lost:
            unready += ServiceReadiness.objects.filter(
                service=service, user_id__in=lost).update(onboarded_at=None)
    return len(ready) + unready


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
class OrphanPage:
    """One page of the users a service holds rows of, and those of them that are orphans."""

    service: str
    held: list[uuid.UUID]
    orphans: list[uuid.UUID]


def erasures_announced(*, user_ids: list[uuid.UUID], after: dt.datetime) -> set[uuid.UUID]:
    """Those of ``user_ids`` whose ``user.deleted`` accounts wrote after ``after`` (its outbox
    keeps an ``Erasure`` per erased user): their rows are expected to go, shortly."""
    keys = Erasure.objects.using(OUTBOX_DATABASE).filter(
        key__in=[str(user_id) for user_id in user_ids], requested_at__gt=after,
    ).values_list("key", flat=True)
    return {uuid.UUID(key) for key in keys}


def orphan_scan(
    *, services: list[str], until: dt.datetime, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[OrphanPage]:
    """Per service that declares ``USERS`` and per page of the users it holds rows of, those
    the users table does not have: orphans.

    Each page costs one query on the service's database (its ``USERS`` selector, keyset on
    ``user_id``) and one on the accounts database (the page's ids against the users table),
    whatever the tables' sizes; a page that finds ids unknown costs one more, on the outbox,
    to leave out users erased after ``until`` (their ``user.deleted`` may still be on its way,
    as a registration younger than the grace may be). The service is read before accounts: a
    service makes a user's rows only once the user has committed, so an id accounts lacks when
    asked after is gone, never a registration still on its way.
    """
    consumers = get_consumers()
    for service in services:
        select = consumers[service].users
        if select is None:
            continue
        after = None
        while True:
            with reading_service(consumers[service]):
                held = list(select(after=after, limit=chunk_size))
            if held:
                known = set(User.objects.filter(pk__in=held).values_list("pk", flat=True))
                unknown = [user_id for user_id in held if user_id not in known]
                if unknown:
                    erasing = erasures_announced(user_ids=unknown, after=until)
                    unknown = [user_id for user_id in unknown if user_id not in erasing]
                yield OrphanPage(service, held, unknown)
            if len(held) < chunk_size:
                break
            after = held[-1]


def orphan_repairs(page: OrphanPage, *, now: dt.datetime) -> list[Redelivery]:
    """The redeliveries that erase a page's orphans: a ``user.deleted`` per orphan, to the
    service holding it alone.

    Each under a fresh event id (``uuid7``, as the outbox gives its events), not a
    per-window one as a ``user.registered`` repair: erasing is idempotent whatever arrives (the
    rows are gone, the first tombstone stays), so a copy needs no deduplication, and a fresh id
    is never skipped by the inbox, whatever came before. A second ``--repair`` before the
    consumer caught up stores a second copy, which then erases nothing.
    """
    return [
        Redelivery(
            consumer=page.service,
            event=UserDeleted(user_id=user_id, deleted_at=now),
            event_id=str(uuid7()),
        )
        for user_id in page.orphans
    ]


@dataclass
class ServiceTotals:
    missing: int = 0
    repaired: int = 0  # stored by JetStream for the consumer
    already_sent: int = 0  # dropped by JetStream: the same repair is already in the stream
    listed: list[tuple[str, str]] = field(default_factory=list)  # (user id, username)
    # Users the service holds rows of; None: it declares no USERS, orphans are not searched.
    held: int | None = None
    orphans: int = 0
    erased: int = 0  # user.deleted sent for orphans, acknowledged by JetStream
    orphans_listed: list[str] = field(default_factory=list)  # user ids
    stale: int = 0  # users whose readiness in accounts' projection disagrees with the rows
    stale_repaired: int = 0  # of those, set right in the projection


class Totals:
    def __init__(self, services: list[str]) -> None:
        self.checked = 0
        consumers = get_consumers()
        self.services = {
            name: ServiceTotals(held=None if consumers[name].users is None else 0)
            for name in services
        }

    def add(self, result: ChunkResult) -> None:
        self.checked += len(result.users)
        for service, users in result.missing.items():
            totals = self.services[service]
            totals.missing += len(users)
            room = LISTED_PER_SERVICE - len(totals.listed)
            totals.listed += [(str(user.pk), user.username) for user in users[:max(room, 0)]]
        for service, users in result.stale.items():
            self.services[service].stale += len(users)

    def add_orphans(self, page: OrphanPage) -> None:
        totals = self.services[page.service]
        totals.held = (totals.held or 0) + len(page.held)
        totals.orphans += len(page.orphans)
        room = LISTED_PER_SERVICE - len(totals.orphans_listed)
        totals.orphans_listed += [str(user_id) for user_id in page.orphans[:max(room, 0)]]

    def sent(self, repairs, stored: list[bool]) -> None:
        for repair, was_stored in zip(repairs, stored, strict=True):
            totals = self.services[repair.consumer]
            if isinstance(repair.event, UserDeleted):
                totals.erased += 1  # a fresh id each: never dropped as a duplicate
            elif was_stored:
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

    @property
    def stale(self) -> int:
        return sum(t.stale for t in self.services.values())

    @property
    def orphans(self) -> int:
        return sum(t.orphans for t in self.services.values())

    @property
    def erased(self) -> int:
        return sum(t.erased for t in self.services.values())

    def sent_so_far(self) -> str:
        """What a repair that failed had sent before, for its error message."""
        return (
            f"{self.repaired} repair(s) sent and acknowledged before it"
            + (f" ({self.already_sent} already in the stream)" if self.already_sent else "")
            + (f", and {self.erased} erasure(s) of orphans" if self.erased else "")
            + "; run it again: repairs are idempotent"
        )


def reconcile_steps(
    totals: Totals,
    *,
    since: dt.datetime | None,
    until: dt.datetime,
    chunk_size: int,
    repair: bool,
    force: bool,
    now: dt.datetime,
) -> Iterator[list[Redelivery]]:
    """Both directions, a chunk at a time: each step adds a chunk of users (then, service by
    service, a page of the users a service holds) into ``totals`` and yields the redeliveries
    that repair it (none without ``repair``). Uses the ORM: run it where the ORM may run."""
    services = list(totals.services)
    for result in reconcile_scan(services=services, since=since, until=until,
                                 chunk_size=chunk_size):
        totals.add(result)
        if repair and any(result.stale.values()):
            readiness_repair(result.stale, now=now)
            for service, users in result.stale.items():
                totals.services[service].stale_repaired += len(users)
        yield repairs_for(result, now=now, force=force) if repair else []
    for page in orphan_scan(services=services, until=until, chunk_size=chunk_size):
        totals.add_orphans(page)
        yield orphan_repairs(page, now=now) if repair else []


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
    """Check every user registered in ``[since, until]`` against ``totals``' services, then
    search each of those services for orphans (whenever their users registered: the users table
    has no date for them), adding up into ``totals`` (``on_chunk(totals)`` after each chunk or
    page: a progress bar); with ``repair``, re-deliver each missing (service, user)'s
    ``user.registered``, and a ``user.deleted`` for each orphan (service, user), to that service
    alone.

    Repairing, the scan runs on one worker thread (the ORM may not run on the event loop) and
    publishing on the loop; NATS is connected on the first chunk that needs a repair, with this
    process's own NATS settings (in a secured deployment, the ``replay`` role's). Raises
    ``NatsAccessError``, ``TimeoutError`` or ``RedeliveryError`` if a repair cannot be sent;
    ``totals`` then says what was sent before (:meth:`Totals.sent_so_far`).
    """
    steps = reconcile_steps(totals, since=since, until=until, chunk_size=chunk_size,
                            repair=repair, force=force, now=now)
    if not repair:
        for _ in steps:
            if on_chunk:
                on_chunk(totals)
        return totals
    executor = ThreadPoolExecutor(1, thread_name_prefix="reconcile")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            nc = js = None
            while True:
                repairs = await loop.run_in_executor(executor, next, steps, None)
                if repairs is None:
                    break
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
    """What a run found, as ``reconcile --json`` prints it. ``complete``: no checked user lacks
    defaults; ``orphans``: rows of unknown users, across the services (either makes exit 1)."""
    return {
        "checked": totals.checked,
        "since": _iso(since),
        "until": _iso(until),
        "min_age": min_age,
        "repair": repair,
        "complete": totals.missing == 0,
        "orphans": totals.orphans,
        "projection_stale": totals.stale,
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
                "held": t.held,
                "orphans": t.orphans,
                "erased": t.erased,
                "orphan_users": [{"userId": user_id} for user_id in t.orphans_listed],
                "orphan_users_truncated": t.orphans > len(t.orphans_listed),
                "projection_stale": t.stale,
                "projection_repaired": t.stale_repaired,
            }
            for name, t in totals.services.items()
        },
    }

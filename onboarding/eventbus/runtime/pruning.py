"""Pruning: the event bus's tables stay bounded, and nothing a guarantee needs is removed.

These rows outlive their use:

- **outbox** rows published longer ago than ``NATS_DUPLICATE_WINDOW``. Nothing republishes a
  published row, and a republication would be dropped by JetStream only within that window, so
  the row is kept that long. An unpublished row is never removed, set aside or not: it is an
  event still owed to the stream. Where its message sits in the stream (its key and sequence,
  no payload) moves to the **published messages** ledger in the same transaction, which keeps
  it for ``NATS_STREAM_MAX_AGE``, as long as the stream may hold the message: an erasure of the
  key deletes the message by that sequence (``outbox/erasure.py``).
- **inbox** rows (``ProcessedEvent``) older than ``NATS_STREAM_MAX_AGE``. A row was written when
  its event was already in the stream, so once it is that old the stream has dropped the event
  and can no longer redeliver it. (A replay or a repair may still bring the same fact back under
  any id at any time: the handlers are idempotent by unique constraints, the inbox only saves
  them the work.)
- **announcements** (a context's own outbox, ``announcing.py``) published longer ago than
  ``NATS_DUPLICATE_WINDOW``, as the outbox's; an unpublished one stays.
- **dead letters** resolved or discarded longer ago than ``EVENTBUS_DEAD_LETTER_KEEP`` (30 days).
  An open dead letter is never removed.
- **admin access logs**: the admin login's records that django-axes keeps (access logs, failure
  logs, attempts: a username, an address, a browser each) older than ``ADMIN_ACCESS_LOG_KEEP``
  (30 days, never less than the lockout's cool-off). Personal data has a lifetime.

Rows go in batches of ``PRUNE_BATCH``, each one short transaction (one ``DELETE ... WHERE id IN
(SELECT id ... ORDER BY <age> LIMIT n)``, on the age indexes), with a pause between batches, so
a prune never holds long locks on a busy table nor keeps SQLite's write lock from the consumers.
On PostgreSQL the batch's ``SELECT`` skips rows another pruner has locked (``FOR UPDATE SKIP
LOCKED``): replicas pruning at the same moment never wait on, nor deadlock with, each other.

``manage.py eventbus_prune`` prunes everything (for cron); in the background, the active outbox
relay prunes the outbox and the admin's access logs (both in the default database), and each
consumer its own inbox rows, announcements and dead letters, every
``EVENTBUS_PRUNE_INTERVAL`` seconds (0: never), see :class:`BackgroundPruning`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from django.apps import apps
from django.conf import settings
from django.db import close_old_connections, connections, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from onboarding.eventbus.models import (
    DEAD_LETTER_DATABASE,
    OUTBOX_DATABASE,
    Announcement,
    DeadLetter,
    OutboxEvent,
    ProcessedEvent,
    PublishedMessage,
)
from onboarding.eventbus.rows import insert_ignoring_conflicts

logger = logging.getLogger(__name__)

PRUNE_BATCH = 1000  # rows per DELETE: a few milliseconds of locks
# Between batches: SQLite's busy handler polls a waiting writer every few to 100 ms; without a
# pause a long prune would take the write lock back before a consumer's transaction got it.
BATCH_PAUSE = 0.02  # seconds

# How soon a background round skipped by its ``when`` (a standby relay) looks again.
SKIPPED_ROUND_RETRY = 5.0  # seconds

OUTBOX, INBOX, DEAD_LETTERS = "outbox rows", "inbox rows", "dead letters"  # the kinds
LEDGER = "published messages"
ANNOUNCEMENTS = "announcements"
ACCESS_LOGS = "admin access logs"
# Where django-axes keeps the admin's logins (the default database, with accounts).
ACCESS_LOG_DATABASE = "default"


@dataclass(frozen=True)
class Pruned:
    """How many rows of one kind one database lost (or would lose, in a dry run)."""

    database: str
    kind: str
    count: int
    consumer: str = ""  # the background prunes of a consumer: its own rows only


def _never() -> bool:
    return False


def outbox_prunable(*, now: dt.datetime | None = None) -> QuerySet[OutboxEvent]:
    """Outbox rows published longer ago than ``NATS_DUPLICATE_WINDOW``.

    ``published_at`` is null on every row still owed to the stream, set aside or not; a set-aside
    row is excluded outright too, should it ever carry a publication time (it waits for an
    operator, who decides).
    """
    cutoff = (now or timezone.now()) - dt.timedelta(seconds=settings.NATS_DUPLICATE_WINDOW)
    return OutboxEvent.objects.using(OUTBOX_DATABASE).filter(
        published_at__isnull=False, published_at__lt=cutoff, set_aside_at__isnull=True
    )


def ledger_prunable(*, now: dt.datetime | None = None) -> QuerySet[PublishedMessage]:
    """Published messages older than ``NATS_STREAM_MAX_AGE``: the stream holds them no more."""
    cutoff = (now or timezone.now()) - dt.timedelta(seconds=settings.NATS_STREAM_MAX_AGE)
    return PublishedMessage.objects.using(OUTBOX_DATABASE).filter(published_at__lt=cutoff)


def ledger_keep(pks: list) -> None:
    """Before the outbox rows ``pks`` go: where the keyed ones sit in the stream, into the
    ledger (:class:`~onboarding.eventbus.models.PublishedMessage`), unless the stream has
    dropped them already (older than ``NATS_STREAM_MAX_AGE``)."""
    kept_since = timezone.now() - dt.timedelta(seconds=settings.NATS_STREAM_MAX_AGE)
    rows = (
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(pk__in=pks, stream_seq__isnull=False, published_at__gte=kept_since)
        .exclude(key="")
        .values_list("key", "stream_seq", "subject", "event_id", "published_at")
    )
    insert_ignoring_conflicts(
        PublishedMessage, ("key", "stream_seq", "subject", "event_id", "published_at"),
        [(key, seq, subject, str(event_id), published)
         for key, seq, subject, event_id, published in rows],
        same={"stream": settings.NATS_STREAM}, using=OUTBOX_DATABASE,
    )


def inbox_prunable(
    *, database: str, consumer: str | None = None, now: dt.datetime | None = None
) -> QuerySet[ProcessedEvent]:
    """Inbox rows of ``database`` (one consumer's, or all) older than ``NATS_STREAM_MAX_AGE``."""
    cutoff = (now or timezone.now()) - dt.timedelta(seconds=settings.NATS_STREAM_MAX_AGE)
    rows = ProcessedEvent.objects.using(database).filter(processed_at__lt=cutoff)
    return rows if consumer is None else rows.filter(consumer=consumer)


def announcements_prunable(
    *, database: str, context: str | None = None, now: dt.datetime | None = None
) -> QuerySet[Announcement]:
    """A context's announcements (or all of ``database``'s) published before the duplicate
    window: as the outbox's, nothing republishes them, and an unpublished one stays."""
    cutoff = (now or timezone.now()) - dt.timedelta(seconds=settings.NATS_DUPLICATE_WINDOW)
    rows = Announcement.objects.using(database).filter(published_at__lt=cutoff)
    return rows if context is None else rows.filter(context=context)


def dead_letters_prunable(
    *, consumer: str | None = None, now: dt.datetime | None = None
) -> QuerySet[DeadLetter]:
    """Dead letters resolved or discarded longer ago than ``EVENTBUS_DEAD_LETTER_KEEP``.

    An open one (neither) never matches. A resolved one that failed again was reopened
    (``resolved_at`` cleared), so it no longer matches either.
    """
    cutoff = (now or timezone.now()) - dt.timedelta(seconds=settings.EVENTBUS_DEAD_LETTER_KEEP)
    letters = DeadLetter.objects.using(DEAD_LETTER_DATABASE).filter(
        Q(resolved_at__lt=cutoff) | Q(discarded_at__lt=cutoff)
    )
    return letters if consumer is None else letters.filter(consumer=consumer)


def delete_in_batches(
    rows: QuerySet,
    *,
    order_by: str,
    batch: int = PRUNE_BATCH,
    pause: float = BATCH_PAUSE,
    should_stop: Callable[[], bool] = _never,
    keep: Callable[[list], None] | None = None,
) -> int:
    """Delete ``rows`` a batch at a time, each batch its own short transaction; return the count.

    Each batch is one statement that deletes by primary key the first ``batch`` rows in
    ``order_by`` order (an index on it walks straight to them, instead of rescanning the deleted
    head of the table). On PostgreSQL the inner ``SELECT`` locks its rows ``FOR UPDATE SKIP
    LOCKED``, which re-checks the conditions on a row changed meanwhile (a dead letter reopened)
    and passes over rows another pruner holds. A batch short of ``batch`` ends the prune: nothing
    older is left, or another pruner holds the rest and deletes it. ``should_stop`` is asked
    between batches. ``keep(pks)`` is called in each batch's transaction before its rows go
    (the batch's keys are then read first, one more statement).
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    alias = rows.db
    deleted = 0
    while not should_stop():
        with transaction.atomic(using=alias):  # BEGIN IMMEDIATE on SQLite: no busy upgrade
            oldest = rows.order_by(order_by).select_for_update(skip_locked=True)
            if keep is None:
                count = _delete_by_pk(rows.model, alias, oldest.values("pk")[:batch])
            else:
                pks = list(oldest.values_list("pk", flat=True)[:batch])
                keep(pks)
                count = rows.model.objects.using(alias).filter(pk__in=pks).delete()[0]
        deleted += count
        if count < batch:
            break
        if pause:
            time.sleep(pause)
    return deleted


def _delete_by_pk(model, alias: str, pks: QuerySet) -> int:
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return model.objects.using(alias).filter(pk__in=pks).delete()[0]
    # ``id IN (subquery)`` lets PostgreSQL's planner hash-join the subquery against a scan of
    # the whole table; ``id = ANY(ARRAY(subquery))`` runs it once and looks the ids up by key.
    sql, params = pks.query.get_compiler(using=alias).as_sql()
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {quote(model._meta.db_table)} "
            f"WHERE {quote(model._meta.pk.column)} = ANY(ARRAY({sql}))",
            params,
        )
        return cursor.rowcount


def _prune(rows: QuerySet, order_by: str, *, dry_run: bool, **options) -> int:
    return rows.count() if dry_run else delete_in_batches(rows, order_by=order_by, **options)


def outbox_prune(*, dry_run: bool = False, now: dt.datetime | None = None, **options) -> int:
    """Delete (or, dry, count) the outbox rows published before the duplicate window; keyed ones
    leave their place in the stream to the ledger."""
    return _prune(outbox_prunable(now=now), "published_at", dry_run=dry_run, keep=ledger_keep,
                  **options)


def ledger_prune(*, dry_run: bool = False, now: dt.datetime | None = None, **options) -> int:
    """Delete (or, dry, count) the ledger's messages older than the stream's max age."""
    return _prune(ledger_prunable(now=now), "published_at", dry_run=dry_run, **options)


def inbox_prune(
    *, database: str, consumer: str | None = None, dry_run: bool = False,
    now: dt.datetime | None = None, **options,
) -> int:
    """Delete (or, dry, count) the inbox rows older than the stream's max age."""
    rows = inbox_prunable(database=database, consumer=consumer, now=now)
    return _prune(rows, "processed_at", dry_run=dry_run, **options)


def announcements_prune(
    *, database: str, context: str | None = None, dry_run: bool = False,
    now: dt.datetime | None = None, **options,
) -> int:
    """Delete (or, dry, count) the announcements published before the duplicate window."""
    rows = announcements_prunable(database=database, context=context, now=now)
    return _prune(rows, "published_at", dry_run=dry_run, **options)


def dead_letters_prune(
    *, consumer: str | None = None, dry_run: bool = False, now: dt.datetime | None = None,
    **options,
) -> int:
    """Delete (or, dry, count) the dead letters closed longer ago than the keep period."""
    rows = dead_letters_prunable(consumer=consumer, now=now)
    return _prune(rows, "id", dry_run=dry_run, **options)


def access_logs_prunable(*, now: dt.datetime | None = None) -> list[QuerySet]:
    """The admin login's records older than ``ADMIN_ACCESS_LOG_KEEP`` (none without axes)."""
    if not apps.is_installed("axes"):
        return []
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog

    cutoff = (now or timezone.now()) - dt.timedelta(seconds=settings.ADMIN_ACCESS_LOG_KEEP)
    return [model.objects.using(ACCESS_LOG_DATABASE).filter(attempt_time__lt=cutoff)
            for model in (AccessLog, AccessFailureLog, AccessAttempt)]


def access_logs_prune(*, dry_run: bool = False, now: dt.datetime | None = None,
                      **options) -> int:
    """Delete (or, dry, count) the admin login's records older than the keep period."""
    return sum(_prune(rows, "id", dry_run=dry_run, **options)
               for rows in access_logs_prunable(now=now))


def inbox_databases() -> list[str]:
    """Each database holding an inbox, once (contexts configured onto one database share it)."""
    return list(dict.fromkeys(settings.CONTEXT_DATABASES.values()))


def prune_everything(
    *, dry_run: bool = False, now: dt.datetime | None = None, **options
) -> list[Pruned]:
    """Every kind, every consumer, every database: what ``manage.py eventbus_prune`` does.

    One ``now`` for the whole run, so a dry run and the run after it draw the same lines.
    """
    now = now or timezone.now()
    return [
        Pruned(OUTBOX_DATABASE, OUTBOX, outbox_prune(dry_run=dry_run, now=now, **options)),
        Pruned(OUTBOX_DATABASE, LEDGER, ledger_prune(dry_run=dry_run, now=now, **options)),
        *(
            Pruned(alias, INBOX, inbox_prune(database=alias, dry_run=dry_run, now=now, **options))
            for alias in inbox_databases()
        ),
        *(
            Pruned(alias, ANNOUNCEMENTS,
                   announcements_prune(database=alias, dry_run=dry_run, now=now, **options))
            for alias in inbox_databases()
        ),
        Pruned(DEAD_LETTER_DATABASE, DEAD_LETTERS,
               dead_letters_prune(dry_run=dry_run, now=now, **options)),
        Pruned(ACCESS_LOG_DATABASE, ACCESS_LOGS,
               access_logs_prune(dry_run=dry_run, now=now, **options)),
    ]


# -- in the background ------------------------------------------------------------------------


def relay_prune(*, should_stop: Callable[[], bool] = _never) -> list[Pruned]:
    """The relay's share: the outbox it publishes, and the admin's access logs beside it."""
    return [Pruned(OUTBOX_DATABASE, OUTBOX, outbox_prune(should_stop=should_stop)),
            Pruned(OUTBOX_DATABASE, LEDGER, ledger_prune(should_stop=should_stop)),
            Pruned(ACCESS_LOG_DATABASE, ACCESS_LOGS, access_logs_prune(should_stop=should_stop))]


def consumers_prune(specs: Iterable) -> Callable[..., list[Pruned]]:
    """A consumer process's share: each of its consumers' own inbox rows, announcements and
    dead letters."""
    specs = list(specs)

    def prune(*, should_stop: Callable[[], bool] = _never) -> list[Pruned]:
        found = []
        for spec in specs:
            found.append(Pruned(spec.database, INBOX, inbox_prune(
                database=spec.database, consumer=spec.name, should_stop=should_stop), spec.name))
            found.append(Pruned(spec.database, ANNOUNCEMENTS, announcements_prune(
                database=spec.database, context=spec.name, should_stop=should_stop), spec.name))
            found.append(Pruned(DEAD_LETTER_DATABASE, DEAD_LETTERS, dead_letters_prune(
                consumer=spec.name, should_stop=should_stop), spec.name))
        return found

    return prune


class BackgroundPruning:
    """Run a prune on a thread of its own at start and every ``EVENTBUS_PRUNE_INTERVAL`` seconds.

    For a long-running process's event loop: ``start()`` in ``run()``, ``await stop()`` in its
    ``finally``. The work runs off the loop, on its own thread and database connections (closed
    after each round, not held idle for an interval), so it neither blocks the loop nor shares
    the ORM thread of the process's real work, and the heartbeat does not depend on it. A
    failure is logged and tried again next round; it never stops the process. ``when`` (called
    on the pruning thread, must not block) skips a round, e.g. while a relay stands by. Stopping
    waits for the batch in hand at most.
    """

    def __init__(
        self,
        name: str,
        prune: Callable[..., list[Pruned]],
        *,
        when: Callable[[], bool] = lambda: True,
        interval: float | None = None,
        enabled: bool = True,
    ) -> None:
        self.name, self.prune, self.when = name, prune, when
        self.interval = settings.EVENTBUS_PRUNE_INTERVAL if interval is None else interval
        self.enabled = enabled and self.interval > 0
        self.rounds = 0  # rounds that pruned (skipped ones do not count)
        self.deleted = 0
        self._halt = threading.Event()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> BackgroundPruning:
        if self.enabled:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"prune-{self.name}")
        return self

    async def stop(self) -> None:
        if self._task is None:
            return
        self._halt.set()
        self._wake.set()
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"prune-{self.name}")
        try:
            while not self._halt.is_set():
                pruned = await loop.run_in_executor(executor, self._round)
                # A skipped round (a relay standing by) looks again soon: a relay that takes
                # over prunes within seconds, not an interval after its predecessor died.
                delay = self.interval if pruned else min(self.interval, SKIPPED_ROUND_RETRY)
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            self._halt.set()  # cancelled mid-round: the thread stops after its batch
            executor.shutdown(wait=False)

    def _round(self) -> bool:
        """One prune, unless ``when`` says not now; False if skipped."""
        try:
            if not self.when():
                return False
            close_old_connections()
            found = self.prune(should_stop=self._halt.is_set)
            self.rounds += 1
            for pruned in found:
                self.deleted += pruned.count
                if pruned.count:
                    logger.info("prune %s: deleted %d %s%s in %r", self.name, pruned.count,
                                pruned.kind, f" of {pruned.consumer}" * bool(pruned.consumer),
                                pruned.database)
        except Exception as exc:
            logger.warning("prune %s failed, trying again in %.0fs: %s: %s", self.name,
                           self.interval, type(exc).__name__, exc)
        finally:
            connections.close_all()  # this thread's own connections
        return True

"""Publishing a context's announcements from its own ``consume`` process.

A context writes its announcements (``user.onboarded.<context>``, ``user.erased.<context>``) to
its own outbox, in the transaction that applied the handler (:mod:`onboarding.eventbus.announcing`).
Its ``consume`` process already holds that database and a NATS connection, so it publishes them
too: no process per context is added, and no other process needs the context's database.

- **At once**: when the handler's transaction commits, the messages are handed over in memory
  and published on the consumer's connection; they are marked published together, once per
  scan interval (one statement, its commit unflushed), not one by one.
- **The scan**: every ``OUTBOX_RELAY_POLL_INTERVAL``, the rows still unpublished after
  ``OUTBOX_RELAY_GRACE`` (and, at start, every one) are published: what a process that died
  between its commit and its publish left, or what NATS did not take while it was down.

Replicas of a consumer may publish the same row twice (one at once, another's scan): the row's
event id travels as ``Nats-Msg-Id``, so JetStream keeps one, and the projection that reads them
is idempotent anyway. A failure leaves the rows unpublished; the next scan tries again, with a
back-off, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Count, Min
from django.utils import timezone

from onboarding.eventbus import announcing
from onboarding.eventbus.models import Announcement
from onboarding.eventbus.nats.elections import during_election
from onboarding.eventbus.nats.publish import describe, failed, publish_pipelined
from onboarding.eventbus.runtime import metrics
from onboarding.eventbus.runtime.lifecycle import Backoff

logger = logging.getLogger(__name__)


def announcements_unpublished(*, context: str, older_than: float,
                              limit: int) -> list[announcing.AnnouncedMessage]:
    """Up to ``limit`` of ``context``'s announcements still unpublished after ``older_than``
    seconds, in the order they were written."""
    cutoff = timezone.now() - dt.timedelta(seconds=older_than)
    rows = (Announcement.objects.using(settings.CONTEXT_DATABASES[context])
            .filter(context=context, published_at__isnull=True, created_at__lte=cutoff)
            .order_by("id").values_list("event_id", "subject", "payload")[:limit])
    return [announcing.AnnouncedMessage(str(event_id), subject, payload.encode())
            for event_id, subject, payload in rows]


def announcements_backlog(*, context: str) -> tuple[int, dt.datetime | None]:
    """(how many of ``context``'s announcements wait to be published, when the oldest was
    written): read in the context's own database, through the small index of its unpublished
    rows."""
    # One statement: a count and an oldest read apart could disagree (rows published between).
    found = (Announcement.objects.using(settings.CONTEXT_DATABASES[context])
             .filter(context=context, published_at__isnull=True)
             .aggregate(n=Count("id"), oldest=Min("created_at")))
    return found["n"], found["oldest"]


def announcements_mark_published(*, context: str, event_ids: list[str]) -> int:
    """Mark these announcements published. Not worth a disk flush of its own (PostgreSQL:
    ``synchronous_commit`` off for this transaction alone): a mark lost in a crash only has the
    scan publish the row again, which JetStream drops as a duplicate (its ``Nats-Msg-Id``)."""
    alias = settings.CONTEXT_DATABASES[context]
    with transaction.atomic(using=alias):
        if connections[alias].vendor == "postgresql":
            with connections[alias].cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit = off")
        # Through the small index of the context's unpublished rows (event_id has none).
        return (Announcement.objects.using(alias)
                .filter(context=context, published_at__isnull=True, event_id__in=event_ids)
                .update(published_at=timezone.now()))


class Announcer:
    """One context's announcements, published by its consumer's process (see the module)."""

    def __init__(self, context: str, nc, db_call, stopper, *, grace: float | None = None,
                 interval: float | None = None, batch: int | None = None) -> None:
        self.context, self.nc, self.db_call, self.stopper = context, nc, db_call, stopper
        self.js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        self.grace = settings.OUTBOX_RELAY_GRACE if grace is None else grace
        self.interval = interval or settings.OUTBOX_RELAY_POLL_INTERVAL
        self.batch = batch or settings.OUTBOX_RELAY_BATCH
        self.published = 0
        self._acked: list[str] = []  # published, not marked yet

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        committed = asyncio.Event()
        announcing.listen(self.context, lambda: loop.call_soon_threadsafe(committed.set))
        backoff = Backoff(initial=self.interval, maximum=30.0)
        grace = 0.0  # at start, whatever a process before this one left
        scan_due = 0.0  # the loop's clock: when the next scan is due
        loop_time = asyncio.get_running_loop().time
        try:
            while not self.stopper.stopped:
                try:
                    fresh = announcing.take_committed(self.context)
                    if fresh:
                        await self._publish(fresh, path="commit")
                    if loop_time() >= scan_due:  # every interval, busy or idle
                        await self._mark()
                        while await self._scan(grace) == self.batch:
                            pass
                        grace, scan_due = self.grace, loop_time() + self.interval
                    backoff.reset()
                except Exception as exc:
                    delay = backoff.next(quick=during_election(exc))
                    logger.warning("consumer %s: announcements not published, the scan tries "
                                   "again in %.1fs: %s", self.context, delay, describe(exc))
                    await self.stopper.sleep(delay)
                    continue
                if not fresh:
                    await self.stopper.wait_for(
                        asyncio.ensure_future(committed.wait()),
                        timeout=max(0.0, scan_due - loop_time()))
                    committed.clear()
        finally:
            announcing.listen(self.context, None)
            with contextlib.suppress(Exception):  # else the next scan publishes them again
                await self._mark()

    async def _mark(self) -> None:
        """Mark what was published since the last time, in one statement: once per scan
        interval rather than once per publish (the scan leaves rows younger than its grace
        alone, so a mark that waits a second republishes nothing)."""
        acked, self._acked = self._acked, []
        if acked:
            try:
                await self.db_call(announcements_mark_published, context=self.context,
                                   event_ids=acked)
            except BaseException:
                self._acked = acked + self._acked
                raise

    async def _scan(self, grace: float) -> int:
        messages = await self.db_call(announcements_unpublished, context=self.context,
                                      older_than=grace, limit=self.batch)
        if messages:
            await self._publish(messages, path="scan")
        return len(messages)

    async def _publish(self, messages: list, *, path: str) -> None:
        if not self.nc.is_connected:
            raise ConnectionError("not connected to NATS")
        outcomes = await publish_pipelined(self.nc, self.js, messages,
                                           timeout=settings.NATS_REQUEST_TIMEOUT * 2)
        acked = [m.event_id for m, outcome in zip(messages, outcomes, strict=True)
                 if not failed(outcome)]
        if acked:
            self._acked += acked  # marked with the next scan (_mark)
            self.published += len(acked)
            metrics.announcements_published(self.context, len(acked), path=path)
        if len(acked) < len(messages):
            error = next(outcome for outcome in outcomes if failed(outcome))
            raise RuntimeError(f"{len(messages) - len(acked)} of {len(messages)} not "
                               f"acknowledged: {describe(error)}") from error


async def announce_beside(spec, nc, db_call, stopper) -> None:
    """The consume command's companion (``ConsumerRunner(companion=...)``): publish the
    context's announcements beside its consumer."""
    await Announcer(spec.name, nc, db_call, stopper).run()

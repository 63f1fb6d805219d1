"""The outbox relay: ``manage.py outbox_relay``.

It scans unpublished rows older than the grace period (``OUTBOX_RELAY_GRACE``: the fast path
publishes within milliseconds and marks within a second; the grace keeps the relay from
publishing each event a second time), publishes them pipelined (``publish_async``) in id order
with their original ``Nats-Msg-Id``, and marks them published only after their PubAck. A failure
that may pass (NATS down, no PubAck in time) leaves rows unpublished and the relay backs off and
tries again, for ever. A row JetStream refuses (a subject no stream takes, a message too large:
see :mod:`.refusals`) is set aside after ``OUTBOX_MAX_ATTEMPTS``, so that it cannot hold back the
rows behind it; it stays in the outbox, in the admin and in ``onboarding_status``, until an
operator requeues it.

It is also the fast path (:mod:`.listening`): on PostgreSQL (``OUTBOX_FAST_PATH=notify``) each
registration's commit sends a ``NOTIFY`` carrying its message, on SQLite (``wake``) a datagram
naming its row, and a thread of the active relay hears them and hands the messages to a
``BackgroundPublisher`` as they commit. The web process does no NATS work. Hints sent while the
relay was down or disconnected are lost to it, not the events: the scan publishes them after
the grace period.

One relay per outbox database is active: it holds the database's relay lock
(``leadership.py``) before it listens or scans, and checks it before each batch. Any other relay
on that database waits as a hot standby, retrying the lock every ``OUTBOX_RELAY_STANDBY_POLL``
seconds, and starts afresh when it gets it: when the active one died, or lost its database
session and stepped down. ``--once`` does not wait: when another relay is active, that one
publishes the backlog, and the one-shot flush does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

from onboarding.eventbus.nats.connection import close, connect
from onboarding.eventbus.nats.elections import during_election
from onboarding.eventbus.nats.publish import describe, failed, publish_pipelined
from onboarding.eventbus.outbox.erasure import erase_messages, erasures_done, erasures_due
from onboarding.eventbus.outbox.healing import BackgroundHealing
from onboarding.eventbus.outbox.leadership import relay_lock
from onboarding.eventbus.outbox.listening import FastPath
from onboarding.eventbus.outbox.refusals import refusal
from onboarding.eventbus.outbox.store import (
    OutboundMessage,
    outbox_backlog,
    outbox_mark_published,
    outbox_record_failure,
    outbox_record_refusals,
    outbox_unpublished,
)
from onboarding.eventbus.outbox.write import fast_path
from onboarding.eventbus.runtime import metrics, pruning
from onboarding.eventbus.runtime.lifecycle import Backoff, Stopper

logger = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        *,
        grace: float | None = None,
        batch: int | None = None,
        poll_interval: float | None = None,
    ) -> None:
        # Its own fast path: notify (PostgreSQL) or wake (SQLite), else the scan alone.
        mode = fast_path()
        self.fast_path_mode = mode if mode in ("notify", "wake") else None
        self.grace = settings.OUTBOX_RELAY_GRACE if grace is None else grace
        self.batch = batch or settings.OUTBOX_RELAY_BATCH
        self.poll_interval = poll_interval or settings.OUTBOX_RELAY_POLL_INTERVAL
        self.stopper = Stopper()
        self._lock = relay_lock()
        self.skipped = False  # with once: another relay was active, so this one did nothing
        # One thread for the ORM, so the relay keeps one database connection.
        self._db = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-db")
        self._nc = None
        self._js = None
        # While active with a fast path: a thread hears commits and publishes them at once.
        self._fast_path: FastPath | None = None
        self._scan_now: asyncio.Event | None = None
        self.listening = threading.Event()  # set once it first listened (or failed to)
        self.scanned = threading.Event()  # set once the first scan is over
        self.published = 0
        self.erased = 0  # erasures carried out
        self.healing: BackgroundHealing | None = None

    async def _orm(self, fn, /, **kwargs):
        def call():
            close_old_connections()
            return fn(**kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._db, call)

    async def run(self, *, once: bool = False, install_signal_handlers: bool = False) -> int:
        """Publish until stopped (or, with ``once``, until the backlog is empty)."""
        self.stopper.bind()
        if install_signal_handlers:
            self.stopper.install_signal_handlers()
        connecting = asyncio.ensure_future(connect("outbox-relay", on_refused=self.stopper.fail))
        if not await self.stopper.wait_for(connecting):
            return self.published
        self._nc = connecting.result()  # raises NatsAccessError if NATS refused us
        # One JetStream context for the run: each new one subscribes its own PubAck inbox.
        self._js = self._nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        backoff = Backoff(initial=0.5, maximum=10.0)
        # The active relay prunes the outbox it publishes (EVENTBUS_PRUNE_INTERVAL).
        pruner = pruning.BackgroundPruning("relay", pruning.relay_prune, enabled=not once,
                                           when=lambda: self._lock.holding).start()
        # And heals what a broker forgot (RECONCILE_INTERVAL): outbox/healing.py.
        self.healing = BackgroundHealing(active=lambda: self._lock.holding,
                                         connection=lambda: (self._nc, self._js),
                                         enabled=not once).start()
        failing_since = None  # time.monotonic() of the first failed batch since one worked
        try:
            grace = await self._lead(once=once)
            while grace is not None and not self.stopper.stopped:
                metrics.relay_tick()
                if not await self._orm(self._lock.held):  # another relay may be active now
                    grace = await self._lead(once=once)
                    continue
                await self._refresh_backlog_metric()  # METRICS_PORT, every few seconds
                try:
                    count = await self.flush_batch(grace=grace)
                except Exception as exc:
                    if once:  # a one-shot flush reports failure instead of waiting for ever
                        raise (self.stopper.error or exc) from None
                    self.scanned.set()
                    failing_since = failing_since or time.monotonic()
                    if self._stalled(failing_since, exc):
                        failing_since = None
                        await self._step_down()
                        grace = await self._lead(once=once)
                        continue
                    delay = backoff.next(quick=during_election(exc))
                    logger.warning("relay batch failed, retrying in %.1fs: %s", delay, exc)
                    await self.stopper.sleep(delay)
                    continue
                failing_since = None
                backoff.reset()
                await self._erase_due()
                self.scanned.set()
                if count < self.batch:
                    if once:
                        break
                    # A notification without its message (too large) asks for a scan at once.
                    grace = 0.0 if await self._idle() else self.grace
        finally:
            await self.healing.stop()
            await pruner.stop()
            await self._stop_fast_path()
            await close(self._nc)
            # Both block on the database (closing the lock's session, the ORM's connections):
            # on the ORM's thread, as every other database call of the relay, never the loop's.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._db, self._lock.release)
            await loop.run_in_executor(self._db, connections.close_all)
            self._db.shutdown(wait=False)  # nothing left on it to wait for
        if self.stopper.error is not None:
            raise self.stopper.error
        return self.published

    @staticmethod
    def _stalled(failing_since: float, exc: Exception) -> bool:
        stall = settings.RELAY_STALL_SECONDS
        if not stall or time.monotonic() - failing_since < stall:
            return False
        logger.warning(
            "relay: nothing published for %.0fs (%s); giving up the outbox lock so that a relay "
            "whose NATS connection works takes over", time.monotonic() - failing_since, exc)
        return True

    async def _step_down(self) -> None:
        """Give up the lock, and stay away from it long enough for a standby's next try
        (``OUTBOX_RELAY_STANDBY_POLL``); then :meth:`_lead` tries for it again, as any standby."""
        metrics.relay_stepped_down()
        await self._stop_fast_path()
        await self._orm(self._lock.release)
        metrics.relay_active(False)
        await self.stopper.sleep(max(3 * settings.OUTBOX_RELAY_STANDBY_POLL, 2.0))

    async def _lead(self, *, once: bool) -> float | None:
        """Wait as a standby until this relay holds the outbox lock, then start afresh.

        Returns the grace period of the first scan, or None when stopped first or, with
        ``once``, when another relay is active (it publishes the backlog; a one-shot flush does
        not wait for it to die).
        """
        await self._stop_fast_path()  # what a lost lock leaves running
        backoff = Backoff(initial=settings.OUTBOX_RELAY_STANDBY_POLL, maximum=10.0)
        standby = False
        metrics.relay_active(False)
        while not self.stopper.stopped:
            metrics.relay_tick()  # standing by is waiting on purpose
            try:
                acquired = await self._orm(self._lock.acquire)
            except Exception as exc:
                if once:
                    raise
                delay = backoff.next()
                logger.warning("relay: could not try the outbox lock, retrying in %.1fs: %s",
                               delay, exc)
                await self.stopper.sleep(delay)
                continue
            if acquired:
                logger.info("relay: active (took the outbox lock)")
                metrics.relay_active(True)
                if self.fast_path_mode and not once:
                    await self._start_fast_path()
                # Listening, the relay first publishes whatever is waiting, however fresh:
                # commits notified before it listened are lost to it, and nobody else publishes
                # them.
                return 0.0 if self._fast_path is not None else self.grace
            if once:
                logger.info("relay: another relay holds the outbox lock and publishes the backlog")
                self.skipped = True
                return None
            if not standby:
                logger.info("relay: standby, another relay holds the outbox lock")
                standby = True
            backoff.reset()
            await self.stopper.sleep(settings.OUTBOX_RELAY_STANDBY_POLL)
        return None

    async def _idle(self) -> bool:
        """Sleep the poll interval, or until a stop or a request to scan now (True)."""
        if self._scan_now is None:
            await self.stopper.sleep(self.poll_interval)
            return False
        await self.stopper.wait_for(
            asyncio.ensure_future(self._scan_now.wait()), timeout=self.poll_interval
        )
        woken = self._scan_now.is_set()
        self._scan_now.clear()
        return woken

    # -- the fast path (notify on PostgreSQL, wake on SQLite): listening.py ----------------

    async def _start_fast_path(self) -> None:
        loop = asyncio.get_running_loop()
        self._scan_now = asyncio.Event()
        self._fast_path = FastPath.for_mode(
            self.fast_path_mode, batch=self.batch, listening=self.listening,
            request_scan=lambda: loop.call_soon_threadsafe(self._scan_now.set),
        )
        await self._fast_path.start()

    async def _stop_fast_path(self) -> None:
        fast, self._fast_path = self._fast_path, None
        if fast is not None:
            await fast.stop()

    async def _refresh_backlog_metric(self) -> None:
        """On a scan, at most every METRICS_REFRESH_INTERVAL: the outbox backlog and its age.
        Never raises: a metric is not worth a relay's loop (a database that is down shows in
        the scan itself)."""
        if not metrics.refresh_due("relay-backlog"):
            return
        try:
            count, oldest = await self._orm(outbox_backlog)
        except Exception as exc:
            logger.debug("metrics: outbox backlog failed: %s", exc)
            return
        metrics.relay_backlog(count, (timezone.now() - oldest).total_seconds() if oldest else 0)

    async def _erase_due(self) -> None:
        """Carry out the erasures that are due (:mod:`.erasure`). Never raises: one that fails
        stays pending, and the next round tries it again."""
        try:
            works = await self._orm(erasures_due)
            if not works:
                return
            deleted = await erase_messages(self._js, works)
            await self._orm(erasures_done, works=works, deleted=deleted)
            self.erased += len(works)
            metrics.relay_erasure(done=True, count=len(works))
        except Exception as exc:
            metrics.relay_erasure(done=False)
            logger.warning("relay: erasure failed, retrying on the next round: %s: %s",
                           type(exc).__name__, exc)

    async def flush_batch(self, grace: float | None = None) -> int:
        """Publish one batch of due rows; return how many rows it took (published or not).

        A row JetStream refuses (see :func:`refusal`) counts an attempt, and is set aside after
        ``OUTBOX_MAX_ATTEMPTS``; the others in the batch are published all the same, and the
        relay carries on. Any other failure may pass (NATS down, no PubAck in time): it counts
        no attempt, and raises, so that the relay backs off.
        """
        if not self._nc.is_connected:
            raise ConnectionError("not connected to NATS")
        messages: list[OutboundMessage] = await self._orm(
            outbox_unpublished, older_than=self.grace if grace is None else grace,
            limit=self.batch,
        )
        if not messages:
            return 0
        outcomes = await publish_pipelined(  # in id order, on one connection
            self._nc, self._js, messages, timeout=settings.NATS_REQUEST_TIMEOUT * 2
        )
        acked, refused, unacked = [], {}, []
        for message, outcome in zip(messages, outcomes, strict=True):
            if not failed(outcome):
                acked.append((message.row_id, outcome.seq))
            elif (why := refusal(message, outcome)) is not None:
                refused[message.row_id] = why
            else:
                unacked.append((message.row_id, outcome))
        await self._orm(outbox_mark_published, acked=acked)
        self.published += len(acked)
        metrics.relay_published(len(acked), path="scan")
        if acked:
            logger.info("relay published %d event(s)", len(acked))
        if refused:
            metrics.relay_publish_failed(len(refused))
            set_aside = await self._orm(
                outbox_record_refusals, refusals=refused,
                max_attempts=settings.OUTBOX_MAX_ATTEMPTS,
            )
            logger.warning("relay: %d event(s) refused by JetStream: %s",
                           len(refused), next(iter(refused.values())))
            for row in set_aside:
                logger.error(
                    "relay: set aside outbox row id=%s event_id=%s subject=%s after %d refused "
                    "attempt(s): %s (fix the cause, then requeue it in the admin)",
                    row.row_id, row.event_id, row.subject, row.attempts, row.error,
                )
        if unacked:
            metrics.relay_publish_failed(len(unacked))
            error = describe(unacked[0][1])
            await self._orm(outbox_record_failure, row_ids=[i for i, _ in unacked], error=error)
            raise RuntimeError(
                f"{len(unacked)} publish(es) not acknowledged: {error}") from unacked[0][1]
        return len(messages)

"""The outbox relay: ``manage.py outbox_relay``.

It scans unpublished rows older than the grace period (``OUTBOX_RELAY_GRACE``: the fast path
publishes within milliseconds and marks within a second; the grace keeps the relay from
publishing each event a second time), publishes them pipelined (``publish_async``) in id order
with their original ``Nats-Msg-Id``, and marks them published only after their PubAck. A failure
that may pass (NATS down, no PubAck in time) leaves rows unpublished and the relay backs off and
tries again, for ever. A row JetStream refuses (a subject no stream takes, a message too large:
see :func:`refusal`) is set aside after ``OUTBOX_MAX_ATTEMPTS``, so that it cannot hold back the
rows behind it; it stays in the outbox, in the admin and in ``onboarding_status``, until an
operator requeues it.

On PostgreSQL (``OUTBOX_FAST_PATH=notify``) it is also the fast path: each registration's
transaction sends a ``NOTIFY`` carrying its message, and a thread of the relay LISTENs and hands
the messages to a ``BackgroundPublisher`` as they commit, once their outbox rows bear them out
(anyone who may connect to the database may NOTIFY). The web process does no NATS work.
Notifications sent while the relay was down or disconnected are lost to it, not the events: the
scan publishes them after the grace period.

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
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections, connections

from onboarding.eventbus import metrics, pruning
from onboarding.eventbus.connection import close, connect
from onboarding.eventbus.leadership import relay_lock
from onboarding.eventbus.lifecycle import Backoff, Stopper
from onboarding.eventbus.oncommit import fast_path, message_from_notification, outbox_listen
from onboarding.eventbus.outbox import (
    ALREADY_DONE,
    OutboundMessage,
    outbox_check_messages,
    outbox_mark_published,
    outbox_record_failure,
    outbox_record_refusals,
    outbox_unpublished,
)
from onboarding.eventbus.publisher import (
    BackgroundPublisher,
    MessageTooLarge,
    describe,
    publish_pipelined,
)
from onboarding.eventbus.warmup import outbox_warm_up

logger = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        *,
        grace: float | None = None,
        batch: int | None = None,
        poll_interval: float | None = None,
    ) -> None:
        self.notify = fast_path() == "notify"
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
        # Notify mode: a thread LISTENs and hands each committed message to a publisher.
        self._listener: threading.Thread | None = None
        self._stop_listening = threading.Event()
        self._publisher = None
        self._scan_now: asyncio.Event | None = None
        self.listening = threading.Event()  # set once LISTEN first succeeded (or failed)
        self.scanned = threading.Event()  # set once the first scan is over
        self.published = 0

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
        try:
            grace = await self._lead(once=once)
            while grace is not None and not self.stopper.stopped:
                metrics.relay_tick()
                if not await self._orm(self._lock.held):  # another relay may be active now
                    grace = await self._lead(once=once)
                    continue
                await metrics.relay_backlog_refresh(self._orm)  # METRICS_PORT, every few seconds
                try:
                    count = await self.flush_batch(grace=grace)
                except Exception as exc:
                    if once:  # a one-shot flush reports failure instead of waiting for ever
                        raise (self.stopper.error or exc) from None
                    self.scanned.set()
                    delay = backoff.next()
                    logger.warning("relay batch failed, retrying in %.1fs: %s", delay, exc)
                    await self.stopper.sleep(delay)
                    continue
                backoff.reset()
                self.scanned.set()
                if count < self.batch:
                    if once:
                        break
                    # A notification without its message (too large) asks for a scan at once.
                    grace = 0.0 if await self._idle() else self.grace
        finally:
            await pruner.stop()
            await self._stop_listening_and_publishing()
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

    async def _lead(self, *, once: bool) -> float | None:
        """Wait as a standby until this relay holds the outbox lock, then start afresh.

        Returns the grace period of the first scan, or None when stopped first or, with
        ``once``, when another relay is active (it publishes the backlog; a one-shot flush does
        not wait for it to die).
        """
        await self._stop_listening_and_publishing()  # what a lost lock leaves running
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
                if self.notify and not once:
                    await self._start_listening()
                # Listening, the relay first publishes whatever is waiting, however fresh:
                # commits notified before it listened are lost to it, and nobody else publishes
                # them.
                return 0.0 if self._listener is not None else self.grace
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

    # -- notify mode (PostgreSQL): the fast path ---------------------------------------------

    async def _start_listening(self) -> None:
        # The same publisher as a web process's on-commit path: one wake-up per burst,
        # publish_async pipelined, rows marked after their PubAcks in one UPDATE every 0.5 s
        # (well inside the grace period after which the scan would republish them).
        self._publisher = BackgroundPublisher(on_acked=metrics.relay_published_notify)
        # Connected before the relay listens: the first commit's event need not wait for it.
        await asyncio.get_running_loop().run_in_executor(
            None, self._publisher.start, settings.NATS_REQUEST_TIMEOUT)
        self._scan_now = asyncio.Event()
        # A fresh start (also after stepping down): a thread of an earlier term keeps its event.
        self._stop_listening = threading.Event()
        self.listening.clear()
        self._listener = threading.Thread(
            target=self._listen, args=(asyncio.get_running_loop(),),
            name="outbox-relay-listen", daemon=True,
        )
        self._listener.start()
        # LISTEN before the first scan, so that no commit falls between the two unheard.
        await asyncio.get_running_loop().run_in_executor(None, self.listening.wait, 10)

    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        stop, connection = self._stop_listening, None
        while not stop.is_set():
            try:
                if connection is None:
                    outbox_warm_up()  # before LISTEN: the first notification's check is warm
                    connection = outbox_listen()
                    logger.info("relay: listening for commits")
                    if self.listening.is_set():  # a reconnection: scan what was missed meanwhile
                        loop.call_soon_threadsafe(self._scan_now.set)
                self.listening.set()
                # Returns with what the first packet brought (a burst comes in one), or after half
                # a second without any, to notice a stop; what arrives meanwhile waits in the
                # connection for the next call.
                bodies = [n.payload for n in connection.notifies(timeout=0.5, stop_after=1)]
                if bodies:
                    self._on_notifications(loop, bodies)
            except Exception as exc:
                # Commits notified meanwhile are not lost: the scan on reconnection (or after the
                # grace period) publishes them.
                logger.warning("relay: LISTEN failed (%s); scanning the outbox meanwhile", exc)
                self._close_quietly(connection)
                connection = None
                self.listening.set()
                stop.wait(1.0)
        self._close_quietly(connection)
        connections.close_all()  # this thread's own, opened to check notifications

    def _on_notifications(self, loop: asyncio.AbstractEventLoop, bodies: list[str]) -> None:
        """Publish the notified messages that are exactly their outbox row; scan at once for a
        notification without a readable message (one too large for NOTIFY goes out empty).

        Any role that may connect to the outbox database may NOTIFY on the channel: a message
        is published (and so its row marked) only if its row bears it out, id, Event-Id and
        content (one query per burst). A forged one publishes and marks nothing; the row it
        names, if any, is published by the scan as it is.
        """
        messages, scan = [], False
        for body in bodies:
            try:
                message = message_from_notification(body)
            except Exception:
                logger.warning("relay: unreadable notification %.200r; scanning instead", body)
                message = None
            if message is None:
                scan = True
            else:
                messages.append(message)
        if messages:
            try:
                close_old_connections()
                messages, others = outbox_check_messages(messages)
            except Exception as exc:
                logger.warning("relay: could not check %d notification(s) against the outbox "
                               "(%s); scanning instead", len(messages), exc)
                messages, others, scan = [], [], True
            for message, why in others:
                logger.log(logging.INFO if why == ALREADY_DONE else logging.WARNING,
                           "relay: ignored a notification naming outbox row id=%s: %s",
                           message.row_id, why)
            if messages:
                self._publisher.submit(messages)
        if scan:
            loop.call_soon_threadsafe(self._scan_now.set)

    @staticmethod
    def _close_quietly(connection) -> None:
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    async def _stop_listening_and_publishing(self) -> None:
        if self._listener is None:
            return
        self._stop_listening.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._listener.join, 5)
        # Waits for the PubAcks in flight and marks what was acknowledged.
        await loop.run_in_executor(None, self._publisher.close)
        self._listener = self._publisher = None

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
        acked, refused, failed = [], {}, []
        for message, error in zip(messages, outcomes, strict=True):
            if error is None:
                acked.append(message.row_id)
            elif (why := refusal(message, error)) is not None:
                refused[message.row_id] = why
            else:
                failed.append((message.row_id, error))
        await self._orm(outbox_mark_published, row_ids=acked)
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
        if failed:
            metrics.relay_publish_failed(len(failed))
            error = describe(failed[0][1])
            await self._orm(outbox_record_failure, row_ids=[i for i, _ in failed], error=error)
            raise RuntimeError(f"{len(failed)} publish(es) not acknowledged: {error}")
        return len(messages)


def subject_matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: ``*`` stands for one token, a final ``>`` for one or more."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or token not in ("*", tokens[index]):
            return False
    return len(tokens) == len(wanted)


# JetStream's answers about the message itself, which no retry changes.
REFUSING_API_CODES = {10054}  # message size exceeds the stream's max_msg_size


def refusal(message: OutboundMessage, error: BaseException) -> str | None:
    """Why JetStream will never take ``message`` as it is, or None when ``error`` may pass.

    Refused: a subject the stream does not take (``NATS_STREAM_SUBJECTS``, the subjects
    ``setup_jetstream`` gives it), a message over the server's ``max_payload`` or the stream's
    ``max_msg_size``, a subject or header the client rejects. Everything else may pass and
    counts no attempt: NATS down or slow, a stream without a leader or not created yet
    (``NoStreamResponseError`` for a subject the stream is meant to take), a denied publish
    (the server drops it silently: a timeout).
    """
    from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
    from nats.js.errors import APIError

    subjects = settings.NATS_STREAM_SUBJECTS
    if not any(subject_matches(message.subject, pattern) for pattern in subjects):
        return (f"stream {settings.NATS_STREAM} does not take subject {message.subject!r} "
                f"(it takes {', '.join(subjects)}): {describe(error)}")
    if isinstance(error, MessageTooLarge | MaxPayloadError | BadSubjectError | BadHeaderError):
        return describe(error)
    if isinstance(error, APIError) and error.err_code in REFUSING_API_CODES:
        return describe(error)
    return None

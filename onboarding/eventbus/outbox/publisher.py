"""The fast path: publish outbox rows right after their transaction commits.

A sync Django process (runserver, gunicorn's sync workers, a management command) cannot await a
nats-py coroutine, and a nats-py connection belongs to one asyncio loop. So each process gets
one ``BackgroundPublisher``: a daemon thread running a loop with one long-lived connection,
started on first use and started anew in a forked child (gunicorn forks its workers).

Guarantees:
- ``submit`` never blocks on NATS and never raises: the request that committed is not delayed
  or failed by the broker.
- A row is marked published only after JetStream acknowledged it.
- Anything not acknowledged (NATS down, a timeout) is left for the relay, which republishes it
  with the same ``Nats-Msg-Id``; JetStream drops the copy if the first publish did land.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import nats.js.errors
from django.conf import settings
from django.db import close_old_connections, connections

from onboarding.eventbus.nats.connection import close, connect
from onboarding.eventbus.nats.publish import describe, failed, publish_pipelined
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.outbox.store import (
    MARK_COALESCE_SECONDS,
    OutboundMessage,
    outbox_mark_published,
)

logger = logging.getLogger(__name__)

# "No responders" comes back at once while a stream's leadership moves (a node in lame-duck
# mode hands it over, a restarted node rejoins): a few quick retries publish the event within a
# second or two, where leaving it to the relay costs OUTBOX_RELAY_GRACE (5 s). Measured in the
# rehearsal's rolling restart: one user waited 5.7 s for that reason. The retries stay within
# the grace, and a copy the relay sends anyway is dropped by its Nats-Msg-Id.
NO_RESPONDERS_RETRIES = (0.25, 0.5, 1.0)

REFUSED_RETRY_SECONDS = 30


class BackgroundPublisher:
    def __init__(self, *, on_acked: Callable[[int], None] | None = None) -> None:
        # Told how many events JetStream acknowledged, from the publisher thread (the relay's
        # metrics).
        self._on_acked = on_acked
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nc = None
        self._marks: queue.SimpleQueue = queue.SimpleQueue()
        self._connected = asyncio.Event()
        # Messages handed over by request threads, published together by the loop: one wake-up
        # of the loop per burst rather than one task (and one future) per request.
        self._pending: list[OutboundMessage] = []
        self._pending_lock = threading.Lock()
        self._wakeup_scheduled = False
        self._in_flight: set[asyncio.Task] = set()
        self._js = None
        self._closed = False

    # -- called from request threads -------------------------------------------------------

    def submit(self, messages: list[OutboundMessage]) -> None:
        """Schedule ``messages`` for publishing and return at once."""
        if self._closed:
            logger.info("publisher closed; %d event(s) left to the relay", len(messages))
            return
        try:
            self._ensure_started()
            nc = self._nc
            if nc is not None and not nc.is_connected:
                # While disconnected nats-py would buffer the publish and its ack would time
                # out later; the relay is the better owner of these rows.
                logger.info("nats not connected; %d event(s) left to the relay", len(messages))
                return
            with self._pending_lock:
                self._pending.extend(messages)
                if self._wakeup_scheduled:
                    return
                self._wakeup_scheduled = True
            self._loop.call_soon_threadsafe(self._drain_pending)
        except Exception:
            logger.exception("could not schedule publish; the relay will publish")

    def start(self, timeout: float) -> bool:
        """Start the thread now and wait up to ``timeout`` s for its connection; True if it
        connected. For a process that knows it will publish (the relay): its first event then
        does not wait for a NATS connection. Never raises; not connected yet, it goes on trying
        as on first use."""
        try:
            self._ensure_started()
            asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(self._connected.wait(), timeout), self._loop
            ).result(timeout + 1)
        except Exception:
            return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and close the connection (atexit, tests); later submits are no-ops."""
        self._closed = True
        with self._lock:
            if self._pid != os.getpid() or self._loop is None:
                return
            loop, self._pid = self._loop, None
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        except Exception:
            logger.warning("publisher did not shut down cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        self._nc = None
        self._marks.put(None)  # the marker finishes its queue and closes its DB connections
        self._marker.join(timeout)
        # The loop closes on its own thread once stopped: left for the garbage collector at
        # exit, a stopped loop's close met its own socket already closed, and printed a
        # traceback on the way out ("Invalid file descriptor: -1").
        if threading.current_thread() is not self._loop_thread:
            self._loop_thread.join(timeout)

    # -- the publisher thread ---------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # A forked child inherits our attributes but not our threads: start afresh.
            self._nc = self._js = None
            self._marks = queue.SimpleQueue()
            self._connected = asyncio.Event()
            self._pending, self._pending_lock = [], threading.Lock()
            self._wakeup_scheduled = False
            self._in_flight = set()
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._run_loop, name="outbox-publisher",
                                                 daemon=True)
            self._loop_thread.start()
            self._marker = threading.Thread(
                target=self._run_marker, name="outbox-marker", daemon=True
            )
            self._marker.start()
            if self._pid is None:
                atexit.register(self.close)
            self._pid = os.getpid()

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.create_task(self._connect())
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):  # what is left (a connect still retrying)
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()

    async def _connect(self) -> None:
        # connect() itself retries for ever while NATS is unreachable; this loop outlives a
        # refusal (wrong credentials: logged by connect, events left to the relay meanwhile)
        # and unexpected errors. A web process is never stopped for its publisher's sake.
        while self._nc is None:
            try:
                nc = await connect(f"outbox-publisher:{os.getpid()}")
            except NatsAccessError as exc:
                logger.error("%s; events are left to the relay, retrying in %ds",
                             exc, REFUSED_RETRY_SECONDS)
                await asyncio.sleep(REFUSED_RETRY_SECONDS)
                continue
            except Exception:
                logger.exception("publisher could not connect; retrying")
                await asyncio.sleep(1)
                continue
            # One JetStream context for good: each one subscribes its own PubAck inbox.
            self._js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
            self._nc = nc
        self._connected.set()

    def _drain_pending(self) -> None:
        with self._pending_lock:
            messages, self._pending = self._pending, []
            self._wakeup_scheduled = False
        if messages:
            task = self._loop.create_task(self._publish(messages))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _publish(self, messages: list[OutboundMessage]) -> None:
        if self._nc is None:
            # The first events of a process arrive while it is still connecting; they wait a
            # moment for it rather than all going to the relay.
            try:
                await asyncio.wait_for(self._connected.wait(), settings.NATS_REQUEST_TIMEOUT)
            except TimeoutError:
                logger.info("nats not connected yet; %d event(s) left to the relay", len(messages))
                return
        outcomes = await publish_pipelined(
            self._nc, self._js, messages, timeout=settings.NATS_REQUEST_TIMEOUT
        )
        for delay in NO_RESPONDERS_RETRIES:
            again = [i for i, outcome in enumerate(outcomes)
                     if isinstance(outcome, nats.js.errors.NoStreamResponseError)]
            if not again or self._nc.is_closed:
                break
            logger.debug("%d publish(es) found no stream leader (NoStreamResponseError); "
                        "retrying in %.2fs", len(again), delay)
            await asyncio.sleep(delay)
            retried = await publish_pipelined(self._nc, self._js, [messages[i] for i in again],
                                              timeout=settings.NATS_REQUEST_TIMEOUT)
            for index, outcome in zip(again, retried, strict=True):
                outcomes[index] = outcome
        acked = [(m.row_id, outcome.seq) for m, outcome in zip(messages, outcomes, strict=True)
                 if not failed(outcome)]
        if len(acked) < len(messages):
            error = next(outcome for outcome in outcomes if failed(outcome))
            logger.warning("%d publish(es) not acknowledged; the relay will retry them: %s",
                           len(messages) - len(acked), describe(error))
        if acked:
            self._marks.put(acked)
            if self._on_acked is not None:
                self._on_acked(len(acked))

    async def _shutdown(self) -> None:
        # Publish what was handed over and wait for the PubAcks in flight, so that their rows
        # are marked now rather than republished by the relay later.
        self._drain_pending()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=settings.NATS_REQUEST_TIMEOUT)
        if self._nc is not None:
            await close(self._nc)

    # -- the marker thread: the ORM may not run on the event loop thread --------------------

    def _run_marker(self) -> None:
        marks = self._marks
        while True:
            acked = marks.get()
            if acked is None:
                break
            # Wait a moment and coalesce whatever else arrives into one UPDATE (see
            # MARK_COALESCE_SECONDS).
            time.sleep(MARK_COALESCE_SECONDS)
            while not marks.empty():
                more = marks.get()
                if more is None:
                    self._mark(acked)
                    connections.close_all()
                    return
                acked.extend(more)
            self._mark(acked)
        connections.close_all()

    @staticmethod
    def _mark(acked: list[tuple[int, int]]) -> None:
        try:
            close_old_connections()
            outbox_mark_published(acked=acked)
        except Exception:
            # Published but not marked: the relay republishes after its grace period and
            # JetStream drops the duplicate by Nats-Msg-Id (its PubAck gives the sequence of
            # the message it kept).
            logger.exception("could not mark %d published row(s)", len(acked))


# The process's on-commit publisher, built on first use: importing this module (the relay, the
# system checks, a process that never publishes) starts and builds nothing.
_publisher: BackgroundPublisher | None = None
_publisher_lock = threading.Lock()


def get_publisher() -> BackgroundPublisher:
    global _publisher
    if _publisher is None:
        with _publisher_lock:
            if _publisher is None:
                _publisher = BackgroundPublisher()
    return _publisher

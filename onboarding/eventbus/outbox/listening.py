"""The active relay's fast path: a thread that hears each commit and publishes its event at once.

- **notify** (PostgreSQL): each registration's commit is followed by a ``NOTIFY`` carrying its
  message (:mod:`.notify`); the thread ``LISTEN``s, checks a burst of notifications against their
  outbox rows in one query (anyone who may connect to the database may ``NOTIFY``), and hands
  the messages their rows bear out to a :class:`~.publisher.BackgroundPublisher`.
- **wake** (SQLite): each commit sends a datagram naming its row (:mod:`.wake`); the thread
  binds the socket and hands every unpublished row above the last it handed over to the
  publisher.

Either way a hint that never arrives loses nothing: the relay's scan publishes every row still
unpublished after the grace period, and scans at once when the thread asks it to (a
notification without its message, a listener that reconnected).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections, connections

from onboarding.eventbus.outbox.notify import message_from_notification, outbox_listen
from onboarding.eventbus.outbox.publisher import BackgroundPublisher
from onboarding.eventbus.outbox.store import (
    ALREADY_DONE,
    outbox_check_messages,
    outbox_committed_after,
    outbox_last_id,
)
from onboarding.eventbus.outbox.wake import WakeListener, row_ids_of, wake_socket_path
from onboarding.eventbus.runtime import metrics
from onboarding.eventbus.runtime.warmup import outbox_warm_up

logger = logging.getLogger(__name__)


class FastPath:
    """A listening thread and the publisher it feeds, for one term of the relay as the active
    one (a relay that steps down stops it, and starts a new one if it leads again).

    ``request_scan`` (thread-safe) asks the relay's loop for a scan now; ``listening`` is set
    once the thread first listened (or failed to), so that the relay's first scan, which
    follows, misses no commit between the two.
    """

    thread_name = "outbox-relay-listen"

    def __init__(self, *, batch: int, request_scan: Callable[[], None],
                 listening: threading.Event) -> None:
        self.batch = batch
        self.request_scan = request_scan
        self.listening = listening
        self.publisher = BackgroundPublisher(on_acked=self.count_published)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def for_mode(mode: str, **kwargs) -> FastPath:
        return {"notify": NotifyFastPath, "wake": WakeFastPath}[mode](**kwargs)

    def count_published(self, count: int) -> None:
        raise NotImplementedError

    def listen(self) -> None:
        """The thread's body: until ``self._stop`` is set. Must never raise."""
        raise NotImplementedError

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Connected before it listens: the first commit's event need not wait for NATS.
        await loop.run_in_executor(None, self.publisher.start, settings.NATS_REQUEST_TIMEOUT)
        self.listening.clear()
        self._thread = threading.Thread(target=self.listen, name=self.thread_name, daemon=True)
        self._thread.start()
        # Listening before the first scan, so that no commit falls between the two unheard.
        await loop.run_in_executor(None, self.listening.wait, 10)

    async def stop(self) -> None:
        """Stop listening, wait for the PubAcks in flight and mark what was acknowledged."""
        self._stop.set()
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, 5)
        await loop.run_in_executor(None, self.publisher.close)


class NotifyFastPath(FastPath):
    """PostgreSQL: ``LISTEN`` for the commits' notifications."""

    def count_published(self, count: int) -> None:
        metrics.relay_published(count, path="notify")

    def listen(self) -> None:
        stop, connection = self._stop, None
        while not stop.is_set():
            try:
                if connection is None:
                    outbox_warm_up()  # before LISTEN: the first notification's check is warm
                    connection = outbox_listen()
                    logger.info("relay: listening for commits")
                    if self.listening.is_set():  # a reconnection: scan what was missed meanwhile
                        self.request_scan()
                self.listening.set()
                # Returns with what the first packet brought (a burst comes in one), or after
                # half a second without any, to notice a stop; what arrives meanwhile waits in
                # the connection for the next call.
                bodies = [n.payload for n in connection.notifies(timeout=0.5, stop_after=1)]
                if bodies:
                    self._on_notifications(bodies)
            except Exception as exc:
                # Commits notified meanwhile are not lost: the scan on reconnection (or after
                # the grace period) publishes them.
                logger.warning("relay: LISTEN failed (%s); scanning the outbox meanwhile", exc)
                _close_quietly(connection)
                connection = None
                self.listening.set()
                stop.wait(1.0)
        _close_quietly(connection)
        connections.close_all()  # this thread's own, opened to check notifications

    def _on_notifications(self, bodies: list[str]) -> None:
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
                self.publisher.submit(messages)
        if scan:
            self.request_scan()


class WakeFastPath(FastPath):
    """SQLite: bind the wake-up socket and read the rows each burst of wake-ups announces.

    The thread keeps the highest row id it has handed over (or that was there when it started
    listening, which the first scan publishes): a wake-up reads every unpublished row above it.
    SQLite commits one writer at a time, in id order, so a row whose wake-up arrived has every
    row below it committed and visible: a wake-up dropped in a burst costs nothing while another
    follows, and the scan publishes the last ones after the grace period. Only the relay that
    holds the outbox lock runs this, so it alone binds the socket.
    """

    def count_published(self, count: int) -> None:
        metrics.relay_published(count, path="wake")

    def listen(self) -> None:
        stop, listener, last = self._stop, None, 0
        path = wake_socket_path()
        while not stop.is_set():
            try:
                if listener is None:
                    listener = WakeListener(path)
                    close_old_connections()
                    last = outbox_last_id()  # what is below it, the first scan publishes
                    logger.info("relay: listening for wake-ups on %s", path)
                    if self.listening.is_set():  # bound again: scan what was missed meanwhile
                        self.request_scan()
                self.listening.set()
                woken = row_ids_of(listener.receive(timeout=0.5))
                if woken and max(woken) > last:
                    try:
                        last = self._on_wakeups(last, max(woken))
                    except Exception as exc:  # the database, not the socket: keep it bound
                        logger.warning("relay: could not read the woken rows (%s); scanning "
                                       "instead", exc)
                        self.request_scan()
            except Exception as exc:
                logger.warning("relay: wake-up socket %s failed (%s); scanning the outbox "
                               "meanwhile", path, exc)
                if listener is not None:
                    listener.close()
                listener = None
                self.listening.set()
                stop.wait(1.0)
        if listener is not None:
            listener.close()
        connections.close_all()  # this thread's own, opened to read the woken rows

    def _on_wakeups(self, last: int, woken: int) -> int:
        """Hand the unpublished rows above ``last`` to the publisher; return the new mark."""
        close_old_connections()
        while True:
            messages = outbox_committed_after(after_id=last, limit=self.batch)
            if messages:
                self.publisher.submit(messages)
                last = messages[-1].row_id
            if len(messages) < self.batch:
                return max(last, woken)


def _close_quietly(connection) -> None:
    if connection is not None:
        try:
            connection.close()
        except Exception:
            pass

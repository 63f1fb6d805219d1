"""The outbox relay: publishes every outbox row the fast path did not.

Runs as ``manage.py outbox_relay``. It scans unpublished rows older than the grace period (the
fast path usually publishes within milliseconds; the grace keeps the relay from publishing each
event a second time), publishes them pipelined (``publish_async``) in id order with their
original ``Nats-Msg-Id``, and marks them published only after their PubAck. A failure leaves rows
unpublished and the relay backs off and tries again, for ever: an event in the outbox is never
given up on.

Several relays may run at once (say, one per web host): they may publish a row twice, which
JetStream deduplicates within the stream's duplicate window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections, connections

from onboarding.eventbus.connection import close, connect
from onboarding.eventbus.lifecycle import Backoff, Stopper
from onboarding.eventbus.outbox import (
    OutboundMessage,
    fast_path,
    outbox_listen,
    outbox_mark_published,
    outbox_record_failure,
    outbox_unpublished,
)

logger = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        *,
        grace: float | None = None,
        batch: int | None = None,
        poll_interval: float | None = None,
    ) -> None:
        # Woken by NOTIFY, the relay is the fast path itself: nobody else publishes fresh rows,
        # so it need not leave them a grace period.
        self.notify = fast_path() == "notify"
        if grace is None:
            grace = 0.0 if self.notify else settings.OUTBOX_RELAY_GRACE
        self.grace = grace
        self.batch = batch or settings.OUTBOX_RELAY_BATCH
        self.poll_interval = poll_interval or settings.OUTBOX_RELAY_POLL_INTERVAL
        self.stopper = Stopper()
        # One thread for the ORM, so the relay keeps one database connection.
        self._db = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-db")
        self._nc = None
        self._js = None
        self._listener = None  # psycopg connection LISTENing for commits (notify mode)
        self._listen = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay-listen")
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
        connecting = asyncio.ensure_future(connect("outbox-relay"))
        if not await self.stopper.wait_for(connecting):
            return self.published
        self._nc = connecting.result()
        # One JetStream context for the run: each new one subscribes its own PubAck inbox.
        self._js = self._nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        backoff = Backoff(initial=0.5, maximum=10.0)
        if self.notify and not once:
            # LISTEN before the first flush, so that no commit falls between the two unheard.
            await asyncio.get_running_loop().run_in_executor(self._listen, self._listen_wait, 0)
        try:
            while not self.stopper.stopped:
                try:
                    count = await self.flush_batch()
                except Exception as exc:
                    if once:
                        raise  # a one-shot flush reports failure instead of waiting for ever
                    delay = backoff.next()
                    logger.warning("relay batch failed, retrying in %.1fs: %s", delay, exc)
                    await self.stopper.sleep(delay)
                    continue
                backoff.reset()
                if count < self.batch:
                    if once:
                        break
                    await self._idle()
        finally:
            await close(self._nc)
            self._db.submit(connections.close_all).result()
            self._db.shutdown()
            self._listen.submit(self._listen_close).result()
            self._listen.shutdown()
        return self.published

    async def _idle(self) -> None:
        """Wait for the next commit's NOTIFY (notify mode) or the poll interval, or a stop."""
        if not self.notify:
            await self.stopper.sleep(self.poll_interval)
            return
        waiting = asyncio.get_running_loop().run_in_executor(
            self._listen, self._listen_wait, self.poll_interval
        )
        await self.stopper.wait_for(waiting)

    def _listen_wait(self, timeout: float) -> bool:
        """Block until a NOTIFY arrives (True) or ``timeout`` passes; reconnects as needed."""
        try:
            if self._listener is None:
                self._listener = outbox_listen()
            woken = False
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                woken = True
            if woken:
                # Swallow the commits that arrived meanwhile: the next flush reads all their rows
                # at once, and each left queued would only wake a flush that finds nothing.
                for _ in self._listener.notifies(timeout=0):
                    pass
            return woken
        except Exception as exc:
            logger.warning("relay: LISTEN failed (%s); polling meanwhile", exc)
            self._listen_close()
            time.sleep(timeout)
            return False

    def _listen_close(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                pass
            self._listener = None

    async def flush_batch(self) -> int:
        """Publish one batch of due rows; return how many were published."""
        if not self._nc.is_connected:
            raise ConnectionError("not connected to NATS")
        messages: list[OutboundMessage] = await self._orm(
            outbox_unpublished, older_than=self.grace, limit=self.batch
        )
        if not messages:
            return 0
        futures = []
        for message in messages:  # pipelined, in id order, on one connection
            futures.append(
                await self._js.publish_async(
                    message.subject, message.payload, headers=message.headers
                )
            )
        results = await asyncio.gather(
            *(asyncio.wait_for(f, settings.NATS_REQUEST_TIMEOUT * 2) for f in futures),
            return_exceptions=True,
        )
        outcomes = list(zip(messages, results, strict=True))
        acked = [m.row_id for m, r in outcomes if not isinstance(r, BaseException)]
        failed = [(m.row_id, r) for m, r in outcomes if isinstance(r, BaseException)]
        await self._orm(outbox_mark_published, row_ids=acked)
        self.published += len(acked)
        if acked:
            logger.info("relay published %d event(s)", len(acked))
        if failed:
            error = f"{type(failed[0][1]).__name__}: {failed[0][1]}"
            await self._orm(outbox_record_failure, row_ids=[i for i, _ in failed], error=error)
            raise RuntimeError(f"{len(failed)} publish(es) not acknowledged: {error}")
        return len(acked)

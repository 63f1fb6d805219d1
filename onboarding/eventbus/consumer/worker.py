"""A consumer's database threads: the ORM off the event loop, and a cap on how long it waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from django.db import close_old_connections, connections

from onboarding.eventbus.consumer.failures import HandlerTimeout, database_probe
from onboarding.eventbus.consumer.inbox import CommitGate, Incoming, process_events
from onboarding.eventbus.consumer.timeouts import consumer_thread
from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.runtime.lifecycle import Stopper
from onboarding.eventbus.runtime.threads import DaemonThread

logger = logging.getLogger(__name__)


class Worker:
    """A consumer's database threads: one for its work, one for probes.

    The ORM may not run on the event loop, and one thread keeps one connection per database.
    A thread blocked in a database call cannot be interrupted from the loop: what makes the call
    return is the database's own timeouts (``CONSUMER_STATEMENT_TIMEOUT`` and
    ``CONSUMER_LOCK_TIMEOUT`` on PostgreSQL, the busy timeout on SQLite). What makes the loop
    stop *waiting* is :meth:`apply`'s cap, ``CONSUMER_BATCH_TIMEOUT``: the transaction is
    abandoned (it rolls back at its commit, :class:`~.inbox.CommitGate`) and
    the loop hands its messages back. Until the abandoned call returns, the work thread is busy
    and the next call waits for it; the probe has a thread of its own, so it still answers.
    Meanwhile the consumer takes no new work (:attr:`busy`): the rest of a batch in hand is
    handed back for another replica, a dead letter waits for a later delivery, and the loop
    fetches nothing until the thread is free (:meth:`idle`), or stops when told to. A call that
    never returns (a handler hung outside the database) stops this consumer's loop, which
    freezes the heartbeat: the process is stuck, and its supervisor restarts it. A stop never
    waits for the thread: it is a daemon (:class:`~onboarding.eventbus.runtime.threads.
    DaemonThread`), so a SIGTERMed process exits, and the server rolls the abandoned
    transaction back when the connection closes.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._work = DaemonThread(f"consume-{name}", initializer=consumer_thread)
        self._probe = DaemonThread(f"probe-{name}", initializer=consumer_thread)
        self._abandoned: asyncio.Future | None = None

    @property
    def busy(self) -> bool:
        """True while an abandoned transaction still holds the work thread: anything submitted
        now would wait for it, for as long as the database lets it block."""
        return self._abandoned is not None and not self._abandoned.done()

    async def call(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the work thread."""
        await self._abandoned_returned()
        return await self._submit(fn, *args, **kwargs)

    async def call_aside(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the work thread, for work beside the consumer's own (its
        announcements): waits for an abandoned call to return without taking it over, so the
        loop still sees it (:meth:`idle`) and fetches nothing meanwhile."""
        if self._abandoned is not None:
            await asyncio.wait({self._abandoned})
        return await self._submit(fn, *args, **kwargs)

    def _submit(self, fn, /, *args, **kwargs) -> asyncio.Future:
        def run():
            close_old_connections()
            return fn(*args, **kwargs)

        return asyncio.get_running_loop().run_in_executor(self._work, run)

    async def apply(self, spec: ConsumerSpec, items: list[Incoming], timeout: float) -> list:
        """:func:`process_events` on the work thread, given up after ``timeout`` s (0: never).

        Raises :class:`HandlerTimeout` once given up on: the transaction will not commit.
        """
        await self._abandoned_returned()  # not part of this transaction's time
        gate = CommitGate()
        future = self._submit(process_events, spec, items, gate=gate)
        if not timeout:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if not gate.abandon():
                return await future  # it is committing: that is quick, and it counts
            self._abandoned = future
            raise HandlerTimeout(
                f"the transaction of {len(items)} event(s) took longer than {timeout:g}s "
                "(CONSUMER_BATCH_TIMEOUT); abandoned, it rolls back", began=gate.began,
            ) from None

    async def idle(self, stopper: Stopper) -> bool:
        """Wait until no abandoned call holds the work thread; False if a stop came first.

        The loop waits here before fetching: messages fetched now would only wait in hand,
        while another replica could take them. No heartbeat meanwhile, on purpose.
        """
        if self._abandoned is None:
            return True
        returned = asyncio.shield(self._abandoned)  # a stop must not cancel the call itself
        if not await stopper.wait_for(returned):
            return False
        returned.exception()  # the shield's copy of the outcome, retrieved (else asyncio logs it)
        await self._abandoned_returned()
        return True

    async def _abandoned_returned(self) -> None:
        future, self._abandoned = self._abandoned, None
        if future is None:
            return
        await asyncio.wait({future})
        error = future.exception()  # Abandoned at its commit, or the database's timeout
        logger.warning("consumer %s: the abandoned transaction returned and rolled back (%s)",
                       self.name, f"{type(error).__name__}: {error}" if error else "no error")

    async def probe(self, alias: str) -> bool:
        """True if ``alias`` accepts a write transaction now (:func:`database_probe`)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._probe, database_probe, alias)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Close the work thread's connections: now, or, while an abandoned call still holds the
        thread, as soon as that call returns (queued behind it).

        Never blocks the event loop (``shutdown(wait=False)``): a thread still blocked in the
        database ends with the process. Left to the thread's end, its connection would stay
        open as long as the process (an idle session on the server, found by the suite).
        """
        if self._abandoned is None or self._abandoned.done():
            with contextlib.suppress(Exception):
                await self.call(connections.close_all)
        else:
            self._work.submit(connections.close_all)
        self._work.shutdown(wait=False)
        self._probe.shutdown(wait=False, cancel_futures=True)

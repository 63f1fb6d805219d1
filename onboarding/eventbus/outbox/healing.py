"""The active relay's background reconcile: ``RECONCILE_PASS`` every ``RECONCILE_INTERVAL``.

The relay only schedules it, as it does the pruning: one relay per outbox database is active, so
one pass runs at a time, whatever the number of relays. What a pass does belongs to the producer
that owns the users (``accounts.healing``): the event bus does not import it, it is named by a
setting, as Django names its pluggable parts. A pass publishes on the relay's own connection and
uses the database on a thread of its own (its connections closed after each pass), so the
relay's publishing never waits for it. A pass that fails is logged and counted; the next interval
tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections, connections
from django.utils.module_loading import import_string

from onboarding.eventbus.runtime import metrics
from onboarding.eventbus.runtime.threads import DaemonThread

logger = logging.getLogger(__name__)


class BackgroundHealing:
    """``start()`` in the relay's ``run()``, ``await stop()`` in its ``finally``. A pass runs
    only while ``active()`` (the relay holds the outbox lock) and ``connection()`` gives the
    relay's (nc, js)."""

    def __init__(self, *, active: Callable[[], bool], connection: Callable[[], tuple],
                 enabled: bool = True, interval: float | None = None) -> None:
        self.interval = settings.RECONCILE_INTERVAL if interval is None else interval
        self.enabled = enabled and self.interval > 0
        self.active, self.connection = active, connection
        self.passes = 0  # passes that completed
        self.last = None  # what the last completed pass returned (``missing``, ``summary()``)
        self._task: asyncio.Task | None = None

    def start(self) -> BackgroundHealing:
        if self.enabled:
            self._task = asyncio.create_task(self._run(), name="reconcile")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        healing_pass = import_string(settings.RECONCILE_PASS)
        thread = DaemonThread("reconcile")
        loop = asyncio.get_running_loop()

        async def call(fn, /, *args, **kwargs):
            def run():
                close_old_connections()
                return fn(*args, **kwargs)

            return await loop.run_in_executor(thread, run)

        try:
            while True:
                await asyncio.sleep(self.interval)
                if not self.active():
                    continue
                nc, js = self.connection()
                if nc is None or not nc.is_connected:
                    continue
                try:
                    done = await healing_pass(nc, js, call)
                except Exception as exc:
                    metrics.reconcile_pass(done=False)
                    logger.warning("reconcile (background) failed, trying again in %.0fs: "
                                   "%s: %s", self.interval, type(exc).__name__, exc)
                    continue
                finally:
                    with contextlib.suppress(Exception):
                        await call(connections.close_all)  # held idle for an interval, else
                self.passes += 1
                self.last = done
                metrics.reconcile_pass(done=True)
                # Users found never set up are news: a broker forgot events, or a service lost
                # them. Nothing found is routine.
                (logger.warning if done.missing else logger.info)(
                    "reconcile (background): %s", done.summary())
        finally:
            thread.shutdown(wait=False)


"""Small pieces every long-running eventbus process shares: stopping and backing off."""

from __future__ import annotations

import asyncio
import signal
import time


class Backoff:
    """Exponential delays for retrying a failing dependency: initial, 2x, 4x, ... up to max.

    ``next(quick=True)`` is for a failure known to pass within seconds (a JetStream election,
    ``nats.elections.during_election``): for the first ``QUICK_WINDOW`` seconds of failing, it
    waits at most ``QUICK_DELAY``, so the work resumes within a second of the new leader rather
    than up to a whole step later. A failure that outlasts the window is not an election (a
    stream deleted, say): the usual delays apply again, and with them fewer log lines.
    """

    QUICK_DELAY = 1.0
    QUICK_WINDOW = 30.0

    def __init__(self, *, initial: float = 0.5, maximum: float = 30.0) -> None:
        self.initial, self.maximum = initial, maximum
        self._next = initial
        self._failing_since: float | None = None

    def next(self, *, quick: bool = False) -> float:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        delay, self._next = self._next, min(self._next * 2, self.maximum)
        if quick and now - self._failing_since < self.QUICK_WINDOW:
            delay = min(delay, self.QUICK_DELAY)
        return delay

    def reset(self) -> None:
        self._next = self.initial
        self._failing_since = None


class Stopper:
    """A stop request that can come from a signal, another thread or the loop itself.

    Loops check ``stopped`` between units of work and sleep through ``sleep``, which wakes up
    early on stop: SIGTERM or SIGINT ends the process after the work in hand, never in its middle.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._requested = False
        self.error: BaseException | None = None

    def bind(self) -> None:
        """Attach to the running loop (call first thing inside it)."""
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        if self._requested:
            self._event.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM or SIGINT stops; once stopping, further ones are ignored.

        A repeated signal (a supervisor that repeats SIGTERM; honcho sends SIGTERM after the
        terminal's SIGINT) must not kill the process in the middle of its clean exit: asyncio
        puts the default handlers back when its loop closes, and so does the interpreter for
        Python handlers as it exits, but it leaves an ignored signal ignored. SIGKILL still
        ends a stop that hangs.
        """

        def on_signal(*_):
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    @property
    def stopped(self) -> bool:
        return self._requested

    def stop(self) -> None:
        """Request a stop; safe from any thread."""
        self._requested = True
        if self._loop is not None and self._event is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:
                pass  # the loop already finished

    def fail(self, error: BaseException) -> None:
        """Stop because of ``error``, which the loop's owner raises once stopped (NATS refused
        us, say: a process that retried for ever would look alive while doing nothing)."""
        self.error = error
        self.stop()

    async def sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            pass

    async def wait_for(self, future: asyncio.Future, timeout: float | None = None) -> bool:
        """Wait for ``future`` unless a stop (or the timeout) comes first; True if it finished.

        Whatever did not finish is cancelled, also when this wait is itself cancelled: a waiter
        left behind on every idle period would pile up for the life of the process.
        """
        stop = asyncio.ensure_future(self._event.wait())
        try:
            done, _ = await asyncio.wait(
                {future, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            future.cancel()
            raise
        finally:
            stop.cancel()
        if future in done:
            return True
        future.cancel()
        return False

"""Opening NATS connections the same way everywhere: the one place that connects to NATS.

Every process connects through :func:`connect`, with the options its own settings give
(:mod:`.options`). A server that is unreachable is retried for ever; one that refuses the
process ends it at once (:mod:`.refusals`).

nats-py reports each failed attempt through ``error_cb``; without one it prints to stderr, and
with a naive one a NATS outage logs twice a second, so the callback here logs a repeated error
at most once every ``_REPEAT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable

from nats.aio.client import Client as NATS

from onboarding.eventbus.nats.options import connect_options, display_url
from onboarding.eventbus.nats.refusals import NatsAccessError, refusal_reason

logger = logging.getLogger(__name__)

# Each connection's state as its callbacks see it (connected, closing, refused), kept beside the
# client rather than on it: nothing here writes into nats-py's objects.
_states: weakref.WeakKeyDictionary[NATS, dict] = weakref.WeakKeyDictionary()

_REPEAT_SECONDS = 30.0
# Before a process first connects, a server that is not listening yet is normal for this long.
_STARTUP_QUIET_SECONDS = 10.0


def _callbacks(name: str, state: dict, refuse: Callable[[str], None]) -> dict:
    last_logged: dict[str, float] = {}
    started = time.monotonic()

    async def error_cb(exc: Exception) -> None:
        if state["closing"]:
            return  # a connection given up on (refused) or being closed: nothing to report
        reason = refusal_reason(exc)
        if reason is not None:
            refuse(reason)
            return
        key = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if (not state["connected"] and isinstance(exc, OSError)
                and now - started < _STARTUP_QUIET_SECONDS):
            # Processes started together with their server (make run, a deploy) find nothing
            # listening for a moment: say so once, quietly; a server still absent warns below.
            if not last_logged:
                last_logged["startup"] = now
                logger.info("nats %s: waiting for a server at %s", name, display_url())
            return
        if now - last_logged.get(key, -_REPEAT_SECONDS) >= _REPEAT_SECONDS:
            last_logged[key] = now
            logger.warning("nats %s: %s", name, key)

    async def disconnected_cb() -> None:
        if not state["closing"]:
            logger.warning("nats %s: disconnected", name)

    async def reconnected_cb() -> None:
        last_logged.clear()
        logger.info("nats %s: reconnected", name)

    async def closed_cb() -> None:
        # Reconnecting for ever, the client only closes by itself on a server error it deems
        # final (an expired JWT, say), without telling error_cb: the process can do nothing more.
        if not state["closing"]:
            nc = state["nc"]() if state.get("nc") else None
            last = nc.last_error if nc is not None else None
            refuse(refusal_reason(last) or f"the connection was closed: {last}")

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
    }


async def connect(
    name: str, *, on_refused: Callable[[NatsAccessError], None] | None = None
) -> NATS:
    """Connect to ``settings.NATS_URL``; waits (retrying) until a server answers.

    Raises :class:`NatsAccessError` at once if the server refuses this client or the settings
    cannot work. A refusal after the connection is up (a permission denied, credentials revoked
    on reconnect) is logged once and handed to ``on_refused``, which should end the process;
    a process that passes none (the web's publisher) leaves its events to the relay.
    """
    options = connect_options()
    shown = display_url()
    state: dict = {"closing": False, "refused": None, "connected": False}
    refused: asyncio.Future = asyncio.get_running_loop().create_future()

    def refuse(reason: str) -> None:
        error = NatsAccessError(f"NATS at {shown} refused {name}: {reason}")
        first = state["refused"] is None
        state["refused"] = error
        if not refused.done():
            refused.set_result(error)
            return  # still connecting: connect() raises it
        if on_refused is not None:
            on_refused(error)  # it ends the process, and says why
        elif first:
            logger.error("%s", error)

    nc = NATS()
    state["nc"] = weakref.ref(nc)  # a strong one would keep nc alive in _states for ever
    connecting = asyncio.ensure_future(
        nc.connect(
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            **options,
            **_callbacks(name, state, refuse),
        )
    )
    try:
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        await _abandon(nc, state)
        raise
    if not connecting.done():
        connecting.cancel()
        await _abandon(nc, state)
        raise refused.result()
    try:
        connecting.result()
    except Exception as exc:
        reason = refusal_reason(exc)
        if reason is None:
            raise
        raise NatsAccessError(f"NATS at {shown} refused {name}: {reason}") from exc
    state["connected"] = True
    if not refused.done():
        refused.set_result(None)  # from now on refusals go to on_refused
    _states[nc] = state  # lets close() silence the expected "disconnected"
    return nc


async def _abandon(nc: NATS, state: dict) -> None:
    state["closing"] = True
    try:
        await asyncio.wait_for(nc.close(), 2)
    except Exception:
        pass  # never connected: nothing to release


async def connect_within(name: str, timeout: float, **kwargs) -> NATS:
    """Connect, or raise ``TimeoutError`` if no server answers within ``timeout`` seconds."""
    return await asyncio.wait_for(connect(name, **kwargs), timeout)


@contextlib.asynccontextmanager
async def session(name: str, *, timeout: float):
    """A connection for a short command; a refusal ends the body at once as NatsAccessError.

    Without this, a denied JetStream request would only time out, and the command would report
    a timeout instead of what the server refused.
    """
    task = asyncio.current_task()
    nc = await connect_within(name, timeout, on_refused=lambda error: task.cancel())
    try:
        yield nc
    except BaseException:
        # Our cancel, or what became of it: a request's own wait_for turns a cancel that meets
        # its timeout into TimeoutError.
        error = _states[nc]["refused"]
        if error is None:
            raise
        if task.cancelling():
            task.uncancel()  # the cancel was ours: an enclosing timeout must not see it
        raise error from None
    finally:
        await close(nc)


async def close(nc: NATS, *subscriptions) -> None:
    """Close cleanly: unsubscribe pull subscriptions first, or ``drain`` can hang 30 s."""
    _states.get(nc, {})["closing"] = True
    for sub in subscriptions:
        try:
            await sub.unsubscribe()
        except Exception:  # already gone with the connection; nothing to release
            pass
    try:
        await asyncio.wait_for(nc.flush(timeout=1), 2)
    except Exception:
        pass  # acks still buffered are lost; those messages are redelivered (and deduplicated)
    await nc.close()

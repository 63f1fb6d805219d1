"""Opening NATS connections the same way everywhere.

Every connection reconnects for ever (``max_reconnect_attempts=-1``): a NATS restart must never
be fatal to a long-running process. nats-py reports each failed attempt through ``error_cb``;
without one it prints to stderr, and with a naive one a NATS outage logs twice a second, so the
callback here logs a repeated error at most once every ``_REPEAT_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats
from django.conf import settings

logger = logging.getLogger(__name__)

_REPEAT_SECONDS = 30.0


def _callbacks(name: str, state: dict) -> dict:
    last_logged: dict[str, float] = {}

    async def error_cb(exc: Exception) -> None:
        key = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - last_logged.get(key, -_REPEAT_SECONDS) >= _REPEAT_SECONDS:
            last_logged[key] = now
            logger.warning("nats %s: %s", name, key)

    async def disconnected_cb() -> None:
        if not state["closing"]:
            logger.warning("nats %s: disconnected", name)

    async def reconnected_cb() -> None:
        last_logged.clear()
        logger.info("nats %s: reconnected", name)

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
    }


async def connect(name: str) -> nats.NATS:
    """Connect to ``settings.NATS_URL``; waits (retrying) until a server answers."""
    state = {"closing": False}
    nc = await nats.connect(
        servers=[url.strip() for url in settings.NATS_URL.split(",")],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=2,
        **_callbacks(name, state),
    )
    nc._onboarding_state = state  # lets close() silence the expected "disconnected"
    return nc


async def connect_within(name: str, timeout: float) -> nats.NATS:
    """Connect, or raise ``TimeoutError`` if no server answers within ``timeout`` seconds."""
    return await asyncio.wait_for(connect(name), timeout)


async def close(nc: nats.NATS, *subscriptions) -> None:
    """Close cleanly: unsubscribe pull subscriptions first, or ``drain`` can hang 30 s."""
    getattr(nc, "_onboarding_state", {})["closing"] = True
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

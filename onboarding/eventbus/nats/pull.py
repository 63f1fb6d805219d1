"""A pull subscription's ``fetch``, without nats-py's per-message task, timer and uuid4.

nats-py's ``PullSubscription.fetch(batch)`` collects a batch by calling
``Subscription.next_msg()`` once per message, and each call mints a ``uuid4``, creates a task
and a ``wait_for`` timer, and goes once round the event loop (a ``select`` system call) even
when the message is already queued. For a consumer draining a backlog that was the largest
single cost outside the database (docs/benchmarks.md, "The drain's profile"). :func:`fetch`
speaks the same protocol with the same pull requests and the same answers — what the earlier
requests left in the subscription's queue first, then one ``no_wait`` request, then, if that
found nothing, one request that waits until ``timeout`` — but takes what is already queued
without waiting, and waits for the rest under one deadline per fetch.

It reads nats-py's subscription internals (the pending queue and its byte count, the pull
request's subject and inbox, the connection), all through :mod:`.compat`:
``compat.pull_supported`` says whether this nats-py has them, and the runner falls back to
nats-py's own ``fetch`` if not. ``tests/test_fetching.py`` runs both against a real server with
the same scenarios.
"""

from __future__ import annotations

import asyncio
import json
import time

import nats.errors
import nats.js.errors
from nats.js import api

from onboarding.eventbus.nats import compat

STATUS = api.Header.STATUS
# Statuses that end a pull request without being an error: no messages (404), its time is up
# (408), or a conflict (409: the durable's leader changed, too many requests waiting...), which
# nats-py treats as temporary too. The next fetch asks again.
OVER = (api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT, api.StatusCode.CONFLICT)


async def fetch(psub, batch: int, timeout: float) -> list:
    """Up to ``batch`` messages of ``psub``, as ``psub.fetch(batch, timeout=timeout)`` returns.

    Raises ``TimeoutError`` if no message came within ``timeout``
    seconds, ``ConnectionClosedError`` once the connection is closed, and nats-py's ``APIError``
    for an error status with no message in hand (a deleted durable, say).
    """
    if batch < 1 or timeout <= 0:
        raise ValueError("fetch: batch must be ≥ 1 and timeout > 0")
    started = time.monotonic()
    msgs: list = []
    # What earlier pull requests delivered after their fetch returned is taken first.
    while len(msgs) < batch:
        msg = _queued(psub)
        if msg is None:
            break
        if not _status(msg):
            msgs.append(msg)
    if len(msgs) == batch:
        return msgs
    # One request that answers at once: what the durable has, up to what is missing, then
    # "no messages". Without `expires` when something is in hand, or the server would hold it.
    request = {"batch": batch - len(msgs), "no_wait": True}
    if not msgs:
        request["expires"] = _expires(timeout)
    await _request(psub, request)
    await _collect(psub, msgs, batch, started, timeout)
    if msgs:
        return msgs
    # Nothing there: one request that waits for messages until the fetch's own deadline.
    expires = _expires(_remaining(started, timeout))
    if expires <= 0:
        raise TimeoutError
    await _request(psub, {"batch": batch, "expires": expires})
    await _collect(psub, msgs, batch, started, timeout)
    # A request can end early with nothing (a 409: the durable's max_waiting or max_batch
    # exceeded, its leader moving): the rest of the fetch's time is waited out, as nats-py does,
    # so that a loop that fetches again at once does not spin. A message that comes meanwhile
    # (what a request left behind) ends the wait.
    while not msgs and _remaining(started, timeout) > 0:
        await _collect(psub, msgs, batch, started, timeout)
    if msgs:
        return msgs
    raise TimeoutError


# The server ends a request this long before the fetch gives up, so that its "request timeout"
# (408) arrives while the fetch still waits, not as a stale status at the start of the next one.
EXPIRES_MARGIN = 0.05


def _expires(seconds: float) -> int:
    """A pull request's ``expires`` (ns) for a fetch that waits ``seconds`` more."""
    margin = EXPIRES_MARGIN if seconds > 4 * EXPIRES_MARGIN else 0.0001
    return int((seconds - margin) * 1_000_000_000)


async def _collect(psub, msgs: list, batch: int, started: float, timeout: float) -> None:
    """Add what this request delivers to ``msgs`` until it ends, the batch is full or the fetch's
    time is up."""
    while len(msgs) < batch:
        msg = _queued(psub)
        if msg is None:
            remaining = _remaining(started, timeout)
            if remaining <= 0:
                break
            try:
                msg = await _next(psub, remaining)
            except TimeoutError:
                break
        status = _status(msg)
        if not status:
            msgs.append(msg)
        elif status == api.StatusCode.CONTROL_MESSAGE:
            continue  # an idle heartbeat: the request is alive
        elif status in OVER:
            break
        elif not msgs:
            raise nats.js.errors.APIError.from_msg(msg)
        else:
            break  # an error after messages: return those; the next fetch meets it again


def take_queued(psub) -> list:
    """Everything already in ``psub``'s queue (messages and statuses), taken out of it: what a
    stopping consumer hands back. Needs only the queue, so it serves nats-py's own fetch too."""
    queue = compat.pending_queue(psub)
    taken = []
    while queue is not None and not queue.empty():
        taken.append(queue.get_nowait())
    return taken


def _queued(psub):
    """The next message already in the subscription's queue, or None; no waiting."""
    queue = compat.pending_queue(psub)
    if queue.empty():
        return None
    msg = queue.get_nowait()
    compat.message_taken(psub, msg)
    return msg


async def _next(psub, timeout: float):
    """The next message, waiting at most ``timeout`` s: one timer, no task of its own."""
    if compat.connection_closed(psub):
        raise nats.errors.ConnectionClosedError
    try:
        async with asyncio.timeout(timeout):
            msg = await compat.pending_queue(psub).get()
    except TimeoutError:
        if compat.connection_closed(psub):
            raise nats.errors.ConnectionClosedError from None
        raise
    compat.message_taken(psub, msg)
    return msg


def _status(msg) -> str | None:
    headers = msg.headers
    return headers.get(STATUS) if headers else None


def _remaining(started: float, timeout: float) -> float:
    return timeout - (time.monotonic() - started)


async def _request(psub, request: dict) -> None:
    await compat.send_pull_request(psub, json.dumps(request).encode())

"""Every access to nats-py's private internals, in one place.

Two hot paths read what nats-py does not expose:

- the pull fetch (:mod:`.pull`) reads a pull subscription's queue of delivered messages and its
  byte count, the subject its pull requests go to and the inbox their answers come back on, and
  the connection they are sent on;
- pipelined publishing (:mod:`.publish`) reads the futures of PubAcks ``publish_async`` has
  registered, to release one whose send raised (nats-py leaves it registered for ever).

The exact pin of ``nats-py`` in requirements.txt is the first guard. The second is here:
:func:`pull_supported` checks, at bind time, every attribute the fetch reads, and the runner
falls back to nats-py's own ``fetch`` (with a warning) on a nats-py that lacks one; the
PubAck futures are read with a default, so a nats-py without them only loses the clean-up.
Nothing else in the project may read a private attribute of nats-py (``tests/test_layout.py``).
"""

from __future__ import annotations

import asyncio


def pull_supported(psub) -> bool:
    """True if the pull subscription ``psub`` has every internal :mod:`.pull` reads."""
    sub = getattr(psub, "_sub", None)
    conn = getattr(sub, "_conn", None)
    return (
        sub is not None
        and isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)
        and isinstance(getattr(sub, "_pending_size", None), int)
        and getattr(sub, "_cb", None) is None  # no callback: messages wait in the queue
        and isinstance(getattr(conn, "is_closed", None), bool)
        and isinstance(getattr(psub, "_nms", None), str)
        and isinstance(getattr(psub, "_deliver", None), str)
        and getattr(psub, "_nc", None) is not None
    )


def pending_queue(psub) -> asyncio.Queue | None:
    """The queue of what the server delivered to ``psub`` and no fetch took yet."""
    return getattr(getattr(psub, "_sub", None), "_pending_queue", None)


def connection_closed(psub) -> bool:
    """Whether the connection ``psub``'s messages arrive on is closed."""
    return psub._sub._conn.is_closed


def message_taken(psub, msg) -> None:
    """Account for ``msg`` taken out of the queue by hand, as ``next_msg()`` would: the queue's
    byte count is what nats-py's slow-consumer limit is measured against."""
    sub = psub._sub
    sub._pending_size -= len(msg.data)
    sub._pending_queue.task_done()


async def send_pull_request(psub, body: bytes) -> None:
    """Publish a pull request for ``psub``'s durable, answers to its inbox."""
    await psub._nc.publish(psub._nms, body, psub._deliver)


def pub_ack_futures(js) -> dict:
    """The PubAck futures ``publish_async`` registered on ``js``, by token (empty if unknown)."""
    return getattr(js, "_publish_async_futures", None) or {}

"""Publishing many messages at once: every PubAck awaited together, none left pending.

The relay's scan, the on-commit publisher and ``reconcile --repair`` all publish this way
(``publish_async`` per message, then every PubAck awaited together), so each of them is
guarded alike: a message over the server's ``max_payload`` never reaches nats-py, and no PubAck
future is left behind, whatever happens.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from onboarding.eventbus.nats import compat


class Publishable(Protocol):
    """What :func:`publish_pipelined` needs of a message (an outbox row, a redelivery...)."""

    subject: str
    payload: bytes
    headers: dict


class MessageTooLarge(Exception):
    """The message exceeds the server's ``max_payload``: never sent (see ``publish_pipelined``)."""


def describe(error: BaseException) -> str:
    """An error in one line, for a log line or a row's ``last_error``."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def wire_size(message: Publishable) -> int:
    """What the server counts against its ``max_payload``: the payload and the header block.

    nats-py checks the payload alone; a message whose headers take it over the limit reaches
    the server, which answers with a protocol error and closes the connection.
    """
    block = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in message.headers.items())
    return len(message.payload) + len((block + "\r\n").encode())


async def publish_pipelined(nc, js, messages: list[Publishable], *, timeout: float) -> list:
    """Publish ``messages`` pipelined (``publish_async``, every PubAck awaited together), in
    order; return, per message, its PubAck if JetStream acknowledged it, else the error (an
    exception instance: ``isinstance(outcome, BaseException)`` tells them apart).

    Never leaves a PubAck future behind: each one is awaited up to ``timeout`` or cancelled,
    whatever happens (a publish that raises, a cancellation). nats-py holds one of its pending
    slots (``publish_async_max_pending``) per future until the future is done, so a future
    dropped while its ack never comes (a silent server, a reply lost with the connection)
    would hold it for ever, and once they are all held, ``publish_async`` waits for ever.
    """
    outcomes: list = [None] * len(messages)
    futures: dict[int, asyncio.Future] = {}
    try:
        for index, message in enumerate(messages):
            size = wire_size(message)
            if size > nc.max_payload:
                outcomes[index] = MessageTooLarge(
                    f"{size} bytes exceed the server's max_payload ({nc.max_payload})"
                )
                continue
            try:
                futures[index] = await _publish_async(js, message)
            except Exception as exc:
                outcomes[index] = exc
        if futures:
            results = await asyncio.gather(
                *(asyncio.wait_for(f, timeout) for f in futures.values()), return_exceptions=True
            )
            for index, result in zip(futures, results, strict=True):
                if isinstance(result, asyncio.TimeoutError | asyncio.CancelledError):
                    result = TimeoutError(f"no PubAck within {timeout:g}s")
                outcomes[index] = result
    finally:
        for future in futures.values():
            if not future.done():
                future.cancel()  # releases its pending slot
    return outcomes


def failed(outcome) -> bool:
    """Whether an outcome of :func:`publish_pipelined` is an error rather than a PubAck."""
    return isinstance(outcome, BaseException)


async def _publish_async(js, message: Publishable) -> asyncio.Future:
    registered = set(compat.pub_ack_futures(js))
    try:
        return await js.publish_async(message.subject, message.payload, headers=message.headers)
    except BaseException:
        # nats-py registers the PubAck's future before it sends, and leaves it registered when
        # the send raises (a closed connection, a subject or header it rejects): nobody could
        # resolve it, and it would hold its pending slot for ever. Nothing else runs between
        # the two, bar a publish_async waiting for a free slot; cancelling one of those too
        # leaves its message to whoever retries it (the relay, a second --repair).
        futures = compat.pub_ack_futures(js)
        for token in set(futures) - registered:
            future = futures.get(token)
            if future is not None and not future.done():
                future.cancel()
        raise

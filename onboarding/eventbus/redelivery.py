"""Re-delivering an event to one consumer only (``manage.py reconcile --repair``).

A redelivery is published on ``replay.<consumer>.<subject>``, the subject only that consumer's
durable filters (as a dead-letter replay is): the other services never see it. Unlike a
dead-letter replay it carries an ``Event-Id`` of its own, because it exists precisely when the
consumer's inbox already holds the original event's id (the defaults were lost after it was
processed) and would skip it as a duplicate. Applying the same fact twice under two ids is safe:
every handler is idempotent by unique constraints (``Subscription``'s contract). It carries no
``Dead-Letter-Id``, so processing it resolves no dead letter (``dead_letter_resolve``).

Publishing is pipelined: a chunk of ``publish_async`` calls, then every PubAck awaited together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from django.conf import settings

from onboarding.contracts import event_headers
from onboarding.eventbus.deadletters import replay_subject


@dataclass(frozen=True)
class Redelivery:
    """One contract event, for one consumer, under its own event id (also its Nats-Msg-Id)."""

    consumer: str
    event: object
    event_id: str

    @property
    def subject(self) -> str:
        return replay_subject(self.consumer, self.event.subject)


class RedeliveryError(Exception):
    """Publishing failed part-way; ``acked`` of the chunk were stored by JetStream before."""

    def __init__(self, message: str, *, acked: int) -> None:
        super().__init__(message)
        self.acked = acked


async def redeliver(js, redeliveries: list[Redelivery]) -> list[bool]:
    """Publish ``redeliveries`` pipelined; per one, True if JetStream stored it, False if it
    dropped it as a duplicate of a message with the same Nats-Msg-Id within its window.

    Raises ``RedeliveryError`` (with how many were acknowledged) if any publish failed or was
    not acknowledged within ``NATS_REQUEST_TIMEOUT``.
    """
    futures = []
    try:
        for item in redeliveries:
            futures.append(await js.publish_async(
                item.subject, item.event.to_json(),
                headers=event_headers(item.event, event_id=item.event_id),
            ))
    except Exception as exc:
        for future in futures:
            future.cancel()
        raise RedeliveryError(f"publish failed: {type(exc).__name__}: {exc}", acked=0) from exc
    results = await asyncio.gather(
        *(asyncio.wait_for(f, settings.NATS_REQUEST_TIMEOUT) for f in futures),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        error = failures[0]
        raise RedeliveryError(
            f"{len(failures)} of {len(results)} publish(es) not acknowledged: "
            f"{type(error).__name__}: {error}",
            acked=len(results) - len(failures),
        )
    return [not ack.duplicate for ack in results]

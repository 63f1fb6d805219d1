"""Re-delivering an event to one consumer only (``manage.py reconcile --repair``).

A redelivery is published on ``replay.<consumer>.<subject>``, the subject only that consumer's
durable filters (as a dead-letter replay is): the other services never see it. Unlike a
dead-letter replay it carries an ``Event-Id`` of its own, because it exists precisely when the
consumer's inbox already holds the original event's id (the defaults were lost after it was
processed) and would skip it as a duplicate. Applying the same fact twice under two ids is safe:
every handler is idempotent by unique constraints (``Subscription``'s contract). It carries no
``Dead-Letter-Id``, so processing it resolves no dead letter (``dead_letter_resolve``).

Publishing is pipelined, through the same :func:`~onboarding.eventbus.nats.publish.
publish_pipelined` as the relay's: a chunk of ``publish_async`` calls, then every PubAck awaited
together, none left pending, a message over the server's ``max_payload`` never sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from django.conf import settings

from onboarding.contracts import event_headers
from onboarding.eventbus.erasing import ledger_record
from onboarding.eventbus.nats.publish import describe, failed, publish_pipelined
from onboarding.eventbus.subjects import replay_subject


@dataclass(frozen=True)
class Redelivery:
    """One contract event, for one consumer, under its own event id (also its Nats-Msg-Id)."""

    consumer: str
    event: object
    event_id: str

    @property
    def subject(self) -> str:
        return replay_subject(self.consumer, self.event.subject)

    @cached_property
    def payload(self) -> bytes:
        return self.event.to_json()

    @cached_property
    def headers(self) -> dict:
        return event_headers(self.event, event_id=self.event_id)


class RedeliveryError(Exception):
    """Publishing failed part-way; ``acked`` of the chunk were stored by JetStream before."""

    def __init__(self, message: str, *, acked: int) -> None:
        super().__init__(message)
        self.acked = acked


async def redeliver(nc, js, redeliveries: list[Redelivery]) -> list:
    """Publish ``redeliveries`` pipelined; per one, its PubAck (``duplicate``: JetStream dropped
    it as a duplicate of a message with the same Nats-Msg-Id within its window, whose ``seq``
    it gives). Record them with :func:`redeliveries_record`, from a thread that may use the ORM.

    Raises ``RedeliveryError`` (with how many were acknowledged) if any publish failed or was
    not acknowledged within ``NATS_REQUEST_TIMEOUT``.
    """
    outcomes = await publish_pipelined(
        nc, js, redeliveries, timeout=settings.NATS_REQUEST_TIMEOUT
    )
    failures = [outcome for outcome in outcomes if failed(outcome)]
    if failures:
        raise RedeliveryError(
            f"{len(failures)} of {len(outcomes)} publish(es) not acknowledged: "
            f"{describe(failures[0])}",
            acked=len(outcomes) - len(failures),
        )
    return outcomes


def redeliveries_record(redeliveries: list[Redelivery], acks: list) -> None:
    """Note where each redelivery sits in the stream, under its event's key: an erasure of the
    user deletes these copies too (they carry the same personal data as the original)."""
    ledger_record(
        (getattr(item.event, "key", ""), ack.stream, ack.seq, item.subject, item.event_id)
        for item, ack in zip(redeliveries, acks, strict=True)
    )

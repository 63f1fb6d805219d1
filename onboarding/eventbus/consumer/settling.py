"""Settling a message: ack after commit, nak with a delay, or store a dead letter and terminate.

Every outcome a consumer decides for a message ends here, once, with its counter and its log
line: a counter and the log line of an event cannot disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings

from onboarding.eventbus.consumer.failures import dead_letter_reason, retry_delay
from onboarding.eventbus.consumer.inbox import Incoming
from onboarding.eventbus.consumer.messages import event_fields, event_id_of
from onboarding.eventbus.deadletters.store import (
    DEAD_LETTER_HEADER,
    dead_letter_resolve,
    dead_letter_store,
)
from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.runtime import metrics
from onboarding.eventbus.subjects import original_subject

logger = logging.getLogger(__name__)
# One line per handled event (EVENT_LOG_LEVEL), with structured fields for JSON logs.
event_logger = logging.getLogger("onboarding.eventbus.events")


@dataclass
class Counts:
    """What one consumer of this process settled: replicas' work adds up."""

    processed: int = 0  # settled messages, duplicates too
    duplicates: int = 0  # of which already in the inbox
    outages: int = 0  # database outages waited out


class Settling:
    """One consumer's way of settling messages (its worker runs the database side)."""

    def __init__(self, spec: ConsumerSpec, worker, counts: Counts) -> None:
        self.spec, self.worker, self.counts = spec, worker, counts

    async def applied(self, ready: list[tuple[object, Incoming]], applied: list[bool],
                      took: float, **log_fields) -> None:
        """Ack what a committed transaction applied, count it, log it, resolve its replays."""
        for msg, _ in ready:
            await msg.ack()  # only now: the transaction has committed
        new = sum(applied)
        self.counts.processed += len(applied)
        self.counts.duplicates += len(applied) - new
        metrics.handled(self.spec.name, processed=new, duplicates=len(applied) - new)
        for (msg, item), is_new in zip(ready, applied, strict=True):
            self._log_handled(msg, item, is_new, took, **log_fields)
        for msg, item in ready:
            if msg.subject != item.subject:  # a replay: its dead letter is resolved
                await self._resolve_dead_letter(msg)

    async def retry_later(self, msg, error: BaseException) -> None:
        """nak with a delay that doubles with each delivery; the last allowed one that failed
        becomes a dead letter."""
        meta = msg.metadata
        delivery, seq, name = meta.num_delivered, meta.sequence.stream, self.spec.name
        metrics.failed(name, permanent=False)
        if delivery >= settings.CONSUMER_MAX_DELIVER:
            logger.error(
                "consumer %s: delivery %d of %d failed, dead-lettering seq=%s: %s: %s",
                name, delivery, settings.CONSUMER_MAX_DELIVER, seq, type(error).__name__, error,
                extra=event_fields(name, msg, "dead_lettered"),
            )
            await self.dead_letter(msg, error)
            return
        delay = retry_delay(delivery)
        logger.warning(
            "consumer %s: delivery %d failed seq=%s, retrying in %.1fs: %s: %s",
            name, delivery, seq, delay, type(error).__name__, error,
            extra=event_fields(name, msg, "retried"),
        )
        metrics.retried(name)
        await msg.nak(delay=delay)

    async def dead_letter(self, msg, error: BaseException) -> None:
        """Store ``msg`` as a dead letter, then terminate it; never terminate one that could not
        be stored (it comes back later instead)."""
        meta, name = msg.metadata, self.spec.name
        if self.worker.busy:
            # Storing it would wait for the abandoned transaction that holds the work thread,
            # with the message in hand. It comes back later, and the first delivery past the
            # last allowed one that fails is dead-lettered (retry_later), with the thread free.
            delay = retry_delay(meta.num_delivered)
            logger.warning(
                "consumer %s: dead letter seq=%s waits: a transaction given up on still holds "
                "the work thread; redelivering in %.1fs", name, meta.sequence.stream, delay,
                extra=event_fields(name, msg, "retried"),
            )
            metrics.retried(name)
            await msg.nak(delay=delay)
            return
        try:
            await self.worker.call(
                dead_letter_store,
                consumer=name, subject=original_subject(name, msg.subject),
                stream=meta.stream, stream_seq=meta.sequence.stream, event_id=event_id_of(msg),
                payload=bytes(msg.data), headers=dict(msg.headers or {}),
                deliveries=meta.num_delivered, error=error,
            )
        except Exception as exc:
            delay = retry_delay(meta.num_delivered)
            logger.error(
                "consumer %s: could not store dead letter seq=%s (%s); redelivering in %.1fs",
                name, meta.sequence.stream, exc, delay,
                extra=event_fields(name, msg, "retried"),
            )
            metrics.retried(name)
            await msg.nak(delay=delay)
            return
        await msg.term()
        metrics.dead_lettered(name, dead_letter_reason(error))

    async def _resolve_dead_letter(self, msg) -> None:
        headers = dict(msg.headers or {})
        try:
            await self.worker.call(dead_letter_resolve, consumer=self.spec.name, headers=headers)
        except Exception as exc:
            # The event is applied and acked; only the bookkeeping failed. Said once, loudly:
            # the dead letter stays open (health check red) until a replay of it goes through.
            letter = headers.get(DEAD_LETTER_HEADER)
            logger.error(
                "consumer %s: replay seq=%s event_id=%s applied, but dead letter %s could not be "
                "marked resolved (%s: %s); it stays open: replay it again to resolve it",
                self.spec.name, msg.metadata.sequence.stream, event_id_of(msg), letter,
                type(exc).__name__, exc,
                extra=event_fields(self.spec.name, msg, "processed", dead_letter_id=letter),
            )

    def _log_handled(self, msg, item: Incoming, applied: bool, took: float, **more) -> None:
        """The line of one acked event; in batch mode ``took`` is its batch's transaction."""
        if not event_logger.isEnabledFor(logging.INFO):
            return  # EVENT_LOG_LEVEL above INFO: not even the fields (docs/benchmarks.md)
        outcome = "processed" if applied else "duplicate"
        fields = event_fields(self.spec.name, msg, outcome, user_id=item.event.key,
                              meta=item.meta, event_id=item.event_id,
                              duration_ms=round(took * 1000, 3), **more)
        # A redelivery says so: how long an event waited (ack_wait after a crash, a nak's
        # delay) shows in the plain lines too, not only in the JSON ones.
        event_logger.info(
            "consumer %s: %s seq=%s event_id=%s user_id=%s in %.1f ms%s", self.spec.name,
            "processed" if applied else "duplicate skipped", fields["stream_seq"],
            fields["event_id"], fields["user_id"], took * 1000,
            f" (delivery {fields['delivery']})" if (fields["delivery"] or 1) > 1 else "",
            extra=fields,
        )

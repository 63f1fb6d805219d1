"""What a consumer does with a fetched batch: one transaction for all of it, one per message when
that fails, and a pause, not a failure, while its database is down.

Both paths run their transaction through :meth:`Handling._transaction` (where an outage is told
from a failure) and settle through :class:`~.settling.Settling` (ack, nak, dead letter).
"""

from __future__ import annotations

import contextlib
import logging
import time

from onboarding.contracts import ContractError, parse_event
from onboarding.eventbus.consumer.failures import (
    DATABASE_ERRORS,
    PERMANENT_ERRORS,
    HandlerTimeout,
    crash_loop,
    is_timeout,
    worth_a_probe,
)
from onboarding.eventbus.consumer.inbox import Incoming
from onboarding.eventbus.consumer.keepalive import keepalive
from onboarding.eventbus.consumer.messages import event_fields, event_id_of, message_ids
from onboarding.eventbus.consumer.settling import Counts, Settling
from onboarding.eventbus.consumer.worker import Worker
from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.runtime import metrics
from onboarding.eventbus.runtime.lifecycle import Backoff, Stopper
from onboarding.eventbus.subjects import original_subject

logger = logging.getLogger(__name__)


class Handling:
    """One consumer's handling of the batches its loop fetches.

    ``per_message``: one transaction per message instead of one per batch. ``batch_timeout``:
    ``CONSUMER_BATCH_TIMEOUT``, the longest the loop waits for one transaction.
    """

    def __init__(self, spec: ConsumerSpec, worker: Worker, stopper: Stopper, counts: Counts, *,
                 per_message: bool, batch_timeout: float) -> None:
        self.spec, self.worker, self.stopper, self.counts = spec, worker, stopper, counts
        self.per_message, self.batch_timeout = per_message, batch_timeout
        self.settle = Settling(spec, worker, counts)

    async def handle_batch(self, msgs: list, ack_wait: float) -> None:
        """Settle every message of ``msgs``, unless a stop comes first, or a transaction given
        up on still holds the work thread: then the rest is handed back at once rather than
        after ack_wait."""
        name = self.spec.name
        unsettled = list(msgs)
        async with keepalive(name, unsettled, ack_wait):
            if not self.per_message and len(unsettled) > 1:
                await self._together(unsettled)
            while unsettled:
                if self.stopper.stopped:
                    await _hand_back(unsettled)
                    return
                if self.worker.busy:
                    # The next message would wait for the abandoned transaction, for as long as
                    # the database lets it block, while the keepalive kept the rest of the batch
                    # from every other replica: a batch held hostage. Hand it back instead; the
                    # loop fetches again once the thread is free (Worker.idle).
                    logger.warning(
                        "consumer %s: a transaction given up on still holds the work thread; "
                        "handing back %d message(s) for another replica: %s",
                        name, len(unsettled), message_ids(unsettled),
                    )
                    await _hand_back(unsettled)
                    return
                metrics.consumer_tick(name)  # one message at a time: each is progress
                if await self._alone(unsettled[0], unsettled):
                    unsettled.pop(0)

    # -- one transaction, whatever its size --------------------------------------------------

    async def _transaction(self, items: list[Incoming], *, mode: str, in_hand: list):
        """Run :func:`~.inbox.process_events` until it commits: (applied flags, seconds it took).

        This is where an outage is told from a failure, for both paths: a database error with a
        database that answers a probe is raised to the caller (this delivery's failure); with
        one that does not, the messages stay in hand and the *same* delivery is retried once the
        database is back, so an outage costs no delivery. None: a stop came during an outage.
        """
        spec = self.spec
        while True:
            started = time.perf_counter()
            try:
                applied = await self.worker.apply(spec, items, self.batch_timeout)
            except (*DATABASE_ERRORS, HandlerTimeout) as exc:
                metrics.handler_timed(spec.name, mode, started)
                if not worth_a_probe(exc) or await self.worker.probe(spec.database):
                    raise
                logger.warning(
                    "consumer %s: database %r unavailable (%s: %s); pausing with %d message(s) "
                    "in hand", spec.name, spec.database, type(exc).__name__, exc, len(in_hand),
                )
                if not await self._await_database():
                    return None
                continue
            except BaseException:
                metrics.handler_timed(spec.name, mode, started)
                raise
            return applied, metrics.handler_timed(spec.name, mode, started)

    async def _await_database(self) -> bool:
        """Probe with backoff until the database is back (True) or a stop comes (False)."""
        spec = self.spec
        self.counts.outages += 1
        backoff = Backoff(initial=0.5, maximum=15.0)
        while not self.stopper.stopped:
            metrics.consumer_tick(spec.name)  # waiting out an outage on purpose: not stuck
            await self.stopper.sleep(backoff.next())
            if await self.worker.probe(spec.database):
                logger.info("consumer %s: database %r is back; resuming", spec.name, spec.database)
                return True
        return False

    # -- a whole batch in one transaction -----------------------------------------------------

    async def _together(self, unsettled: list) -> None:
        """Settle what it can of ``unsettled`` in one transaction; leave the rest in the list.

        Messages that cannot be parsed (or keep killing the consumer) are left out, for the
        one-message path to dead-letter right after. If the transaction fails for any other
        reason than an outage, the batch is left to the one-message-at-a-time path, which
        isolates the culprit.
        """
        name = self.spec.name
        ready: list[tuple[object, Incoming]] = []
        for msg in unsettled:
            meta = msg.metadata
            if crash_loop(meta.num_delivered):
                continue  # the one-message path dead-letters it
            subject = original_subject(name, msg.subject)
            try:
                event = parse_event(subject, msg.data, msg.headers)
            except ContractError:
                continue  # the one-message path dead-letters it, with its own log line
            ready.append((msg, Incoming(event, event_id_of(msg), subject, meta.sequence.stream,
                                        meta)))
        if len(ready) < 2:
            return
        try:
            done = await self._transaction([item for _, item in ready], mode="batch",
                                           in_hand=unsettled)
        except Exception as exc:
            if is_timeout(exc):
                # Most likely a lock or a slow dependency, which one message at a time would
                # wait out once per message: the whole batch goes back, each with its delay.
                logger.warning(
                    "consumer %s: batch of %d timed out (%s: %s); handing it back: %s",
                    name, len(ready), type(exc).__name__, exc,
                    message_ids([msg for msg, _ in ready]),
                )
                for msg, _ in ready:
                    await self.settle.retry_later(msg, exc)
                _forget(unsettled, ready)
                return
            logger.warning("consumer %s: batch of %d failed (%s: %s); retrying one by one",
                           name, len(ready), type(exc).__name__, exc)
            return
        if done is None:
            return  # stopping: handle_batch hands the messages back
        applied, took = done
        _forget(unsettled, ready)
        await self.settle.applied(ready, applied, took, batch_size=len(ready))
        logger.debug(  # the per-event lines say it at INFO
            "consumer %s: processed %d event(s) in one transaction (%d duplicate(s) skipped) "
            "seq %s-%s", name, sum(applied), len(applied) - sum(applied),
            ready[0][1].stream_seq, ready[-1][1].stream_seq,
        )

    # -- one message -------------------------------------------------------------------------

    async def _alone(self, msg, in_hand: list) -> bool:
        """Settle ``msg`` (ack, nak or dead letter); False if a stop came first (unsettled)."""
        name = self.spec.name
        meta = msg.metadata
        seq, event_id = meta.sequence.stream, event_id_of(msg)
        error = crash_loop(meta.num_delivered)
        if error is not None:
            logger.error("consumer %s: dead-lettering seq=%s event_id=%s: %s",
                         name, seq, event_id, error,
                         extra=event_fields(name, msg, "dead_lettered"))
            await self.settle.dead_letter(msg, error)
            return True
        subject = original_subject(name, msg.subject)
        try:
            item = Incoming(parse_event(subject, msg.data, msg.headers), event_id, subject, seq,
                            meta)
            done = await self._transaction([item], mode="message", in_hand=in_hand)
        except PERMANENT_ERRORS as exc:
            metrics.failed(name, permanent=True)
            logger.error(
                "consumer %s: permanent failure, dead-lettering seq=%s event_id=%s: %s: %s",
                name, seq, event_id, type(exc).__name__, exc,
                extra=event_fields(name, msg, "dead_lettered"),
            )
            await self.settle.dead_letter(msg, exc)
            return True
        except Exception as exc:
            await self.settle.retry_later(msg, exc)
            return True
        if done is None:
            return False  # stopping: handle_batch hands the messages back
        applied, took = done
        await self.settle.applied([(msg, item)], applied, took)
        return True


async def _hand_back(msgs: list) -> None:
    """nak each of ``msgs`` with no delay: none of them was tried, so none spends a retry's wait,
    and JetStream may give them to another replica at once."""
    for msg in msgs:
        with contextlib.suppress(Exception):  # unsettled, it comes back after ack_wait anyway
            await msg.nak()
    msgs.clear()


def _forget(unsettled: list, settled: list) -> None:
    """Drop the messages of ``settled`` (message, item) pairs from ``unsettled``, in place."""
    done = {id(msg) for msg, _ in settled}
    unsettled[:] = [msg for msg in unsettled if id(msg) not in done]

"""The generic consumer runner behind ``manage.py consume <app>``.

One runner serves any consumer of the registry; a context contributes only its handlers. For
each consumer it binds the app's durable pull consumer, fetches batches and, per message:

1. parses it against the contract — a message that fails is a *permanent* failure: it is stored
   as a dead letter and terminated, never retried, and the consumer carries on;
2. in one transaction on the context's own database, claims the event in the inbox, then runs
   the handler — a redelivered event is found claimed and skipped, never applied twice;
3. acks only after that transaction committed.

Failures are told apart, because they call for different answers:

- *the database is down* (a database error, and a probe transaction fails too): this is an
  outage, not a bad message. The runner keeps the messages in hand (``in_progress()`` keeps
  them from being redelivered elsewhere), stops fetching, probes with backoff and, once the
  database answers, retries the same delivery. An outage of minutes dead-letters nothing.
- *this message failed* (anything else, or a database error while the database is fine): nak
  with a delay that doubles with each delivery, never a hot loop; the last allowed delivery
  that fails becomes a dead letter. A message that arrives past its allowed deliveries (the
  process died handling it, repeatedly) is dead-lettered without running the handler again.
- *the transaction takes too long* (``CONSUMER_BATCH_TIMEOUT``, or a database timeout): it is
  abandoned and rolls back; its messages are handed back with their retry delay (see
  :class:`~.worker.Worker` for what makes a blocked thread return, and what happens until it does).
- *NATS is unreachable*: fetch fails; the loop backs off and tries again, for ever.
- *settling fails* (an ack, nak, term or in_progress raises): the batch is logged with its ids
  and the loop carries on; JetStream redelivers what was not settled, the inbox skips what
  committed. One consumer's trouble never ends the process, nor the other consumers in it.

Each decision is written once, one module per part of a consumer's life:

- ``runner.py`` (here): the process — connect, one fetch loop per consumer, stop;
- ``handling.py``: a fetched batch — in one transaction, else one message at a time, pausing
  through an outage;
- ``settling.py``: ack, nak with a delay, dead letter — with the counters and log lines;
- ``keepalive.py``: ``in_progress()`` for the messages in hand;
- ``worker.py``: the database threads (the ORM may not run on the event loop, and one thread
  keeps one database connection), and the cap on how long the loop waits for them;
- ``inbox.py``: the inbox claim and the handlers' transaction (synchronous, tested without
  NATS);
- ``failures.py``: which failure calls for which answer; ``timeouts.py``: what makes a hung
  database call return.

On SIGTERM/SIGINT the message in hand is finished, the rest of the batch is nak'ed back at once
for another worker, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from django.conf import settings

from onboarding.eventbus.consumer.handling import Handling
from onboarding.eventbus.consumer.messages import message_ids
from onboarding.eventbus.consumer.pending import watch_pending
from onboarding.eventbus.consumer.settling import Counts
from onboarding.eventbus.consumer.worker import Worker
from onboarding.eventbus.nats import compat, pull
from onboarding.eventbus.nats.connection import close, connect
from onboarding.eventbus.nats.elections import during_election
from onboarding.eventbus.nats.provisioning import missing_subjects
from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.runtime import metrics, pruning
from onboarding.eventbus.runtime.lifecycle import Backoff, Stopper
from onboarding.eventbus.runtime.warmup import consumer_warm_up

logger = logging.getLogger(__name__)

DURABLE_POLL_SECONDS = 0.5  # how often a consumer looks for its durable until it exists
FETCH_TIMEOUT = 1.0  # seconds; also bounds how long a stop request waits on an idle fetch
COMPANION_STOP_WAIT = 5.0  # seconds a stopping consumer gives its companion to finish


class ConsumerRunner:
    """Runs the given consumers in this process until stopped (SIGTERM/SIGINT or ``stop()``)."""

    def __init__(
        self,
        specs: list[ConsumerSpec],
        *,
        batch: int | None = None,
        per_message: bool | None = None,
        companion=None,
    ) -> None:
        self.specs = specs
        # ``companion(spec, nc, db_call, stopper)``: a coroutine run beside each consumer's loop
        # on the same connection, its database calls on the consumer's work thread. The consume
        # command's publishes the context's announcements (outbox/announcer.py), which this
        # side of the flow does not import.
        self.companion = companion
        self.batch = batch or settings.CONSUMER_FETCH_BATCH
        # Batch mode: a fetched batch commits in one transaction with bulk writes; a failure
        # falls back to one message at a time, so one bad message never fails its batch-mates.
        self.per_message = (
            not settings.CONSUMER_BATCH_TRANSACTIONS if per_message is None else per_message
        )
        self.batch_timeout = settings.CONSUMER_BATCH_TIMEOUT
        self.stopper = Stopper()
        self.counts = {spec.name: Counts() for spec in specs}

    @property
    def processed(self) -> dict[str, int]:
        """Per consumer, the messages this process settled, duplicates too."""
        return {name: counts.processed for name, counts in self.counts.items()}

    @property
    def duplicates(self) -> dict[str, int]:
        """Per consumer, the messages this process found already in the inbox."""
        return {name: counts.duplicates for name, counts in self.counts.items()}

    @property
    def outages(self) -> dict[str, int]:
        return {name: counts.outages for name, counts in self.counts.items()}

    def stop(self) -> None:
        self.stopper.stop()

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        self.stopper.bind()
        if install_signal_handlers:
            self.stopper.install_signal_handlers()
        names = ",".join(spec.name for spec in self.specs)
        connecting = asyncio.ensure_future(
            connect(f"consume:{names}", on_refused=self.stopper.fail)
        )
        if not await self.stopper.wait_for(connecting):
            return
        nc = connecting.result()  # raises NatsAccessError if NATS refused us
        logger.info("consumers started: %s", names)
        subscriptions: list = []
        # Each consumer prunes its own inbox rows and dead letters (EVENTBUS_PRUNE_INTERVAL).
        pruner = pruning.BackgroundPruning(names, pruning.consumers_prune(self.specs)).start()
        try:
            await asyncio.gather(*(self._consume(nc, spec, subscriptions) for spec in self.specs))
        finally:
            await pruner.stop()
            await close(nc, *subscriptions)
            logger.info("consumers stopped: %s", self.totals())
        if self.stopper.error is not None:
            raise self.stopper.error

    def totals(self) -> str:
        """Per consumer, what this process applied and skipped: replicas' work adds up."""
        return ", ".join(
            f"{name} (processed {counts.processed - counts.duplicates}, "
            f"{counts.duplicates} duplicate(s) skipped)"
            for name, counts in self.counts.items()
        )

    # -- fetching ----------------------------------------------------------------------------

    async def _consume(self, nc, spec: ConsumerSpec, subscriptions: list) -> None:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        worker = Worker(spec.name)
        handling = Handling(spec, worker, self.stopper, self.counts[spec.name],
                            per_message=self.per_message, batch_timeout=self.batch_timeout)
        ack_wait = 30.0
        backoff = Backoff(initial=0.5, maximum=10.0)
        psub = fetch = None
        waiting_for_durable = False
        pending = watch_pending(js, spec.name, spec.durable)  # METRICS_PORT only
        beside = (asyncio.ensure_future(self.companion(spec, nc, worker.call_aside, self.stopper))
                  if self.companion is not None else None)
        try:
            # Before the first fetch, so that a pull request waiting on the durable means a warm
            # consumer, and its first events do not pay for the first connection (warmup.py).
            await self.stopper.wait_for(
                asyncio.ensure_future(worker.call(consumer_warm_up, spec)))
            heard = -1  # the connection's messages received at the last tick
            while not self.stopper.stopped:
                if not await worker.idle(self.stopper):
                    break
                # Alive means able to work: the server answered since the last turn (a fetch
                # that finds nothing still gets its 408 each second), or the connection is known
                # to be down and is being made again (an outage, waited out on purpose). A
                # connection that died silently answers nothing and is not known to be down:
                # the loop then stops ticking, and the heartbeat and the loop's gauge say so
                # until the pings give the connection up (NATS_PING_INTERVAL).
                received = nc.stats["in_msgs"]
                if received != heard or not nc.is_connected:
                    metrics.consumer_tick(spec.name)
                    heard = received
                try:
                    if psub is None:
                        info = await js.consumer_info(settings.NATS_STREAM, spec.durable)
                        # Keepalives follow the durable's real ack_wait, whatever settings say.
                        ack_wait = info.config.ack_wait or 30.0
                        if info.config.max_deliver not in (None, -1):
                            logger.error(
                                "consumer %s: the durable has max_deliver=%s; a message at that "
                                "limit whose dead letter cannot be stored would be stuck. Run "
                                "`manage.py setup_jetstream`.", spec.name, info.config.max_deliver,
                            )
                        unfiltered = missing_subjects(spec, info.config)
                        if unfiltered:
                            # A durable from before a new event type: it never delivers that
                            # type (a deletion never reaches this service). Loud, not fatal:
                            # the other events still flow while an operator provisions.
                            logger.error(
                                "consumer %s: the durable does not deliver %s; run `manage.py "
                                "setup_jetstream` to bring it up to date", spec.name,
                                ", ".join(unfiltered),
                            )
                        psub = await js.pull_subscribe_bind(
                            spec.durable, stream=settings.NATS_STREAM
                        )
                        subscriptions.append(psub)
                        fetch = self._fetcher(spec, psub)
                    # Returns what is there as soon as something is (measured: p50 7 ms at
                    # 50 events/s); under load, full batches.
                    msgs = await fetch(self.batch, FETCH_TIMEOUT)
                except (TimeoutError, nats.errors.TimeoutError):
                    backoff.reset()
                    continue  # nothing to do (fetch raises a bare asyncio.TimeoutError too)
                except Exception as exc:
                    if psub is None and isinstance(exc, nats.js.errors.NotFoundError):
                        # First boot: the durable (or the stream) is not provisioned yet, normal
                        # while `setup_jetstream` runs beside us (make run). Say so once and poll
                        # briskly. One that disappears after we bound it warns below.
                        if not waiting_for_durable:
                            waiting_for_durable = True
                            logger.info(
                                "consumer %s: waiting for its durable (`manage.py "
                                "setup_jetstream` creates it)", spec.name,
                            )
                        await self.stopper.sleep(DURABLE_POLL_SECONDS)
                        continue
                    delay = backoff.next(quick=during_election(exc))
                    logger.warning(
                        "consumer %s: fetch failed (%s: %s); retrying in %.1fs%s",
                        spec.name, type(exc).__name__, exc, delay,
                        " — has `manage.py setup_jetstream` run?" if psub is None else "",
                    )
                    await self.stopper.sleep(delay)
                    continue
                backoff.reset()
                with metrics.batch(spec.name, len(msgs)):
                    try:
                        await handling.handle_batch(msgs, ack_wait)
                    except Exception as exc:
                        self._log_unsettled(spec, msgs, exc)
        finally:
            if pending is not None:
                pending.cancel()
            if beside is not None:
                # It stops with the stopper; a publish in flight gets a moment to finish.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(beside, COMPANION_STOP_WAIT)
            if psub is not None:
                await self._hand_back(psub)
            await worker.close()

    @staticmethod
    def _fetcher(spec: ConsumerSpec, psub):
        """``fetch(batch, timeout)`` for ``psub``: pull.py's, unless this nats-py lacks what it
        needs (then nats-py's own, which costs ~4x the CPU per message: docs/benchmarks.md)."""
        if compat.pull_supported(psub):
            return lambda batch, timeout: pull.fetch(psub, batch, timeout)
        logger.warning("consumer %s: this nats-py's pull subscription is not the one "
                       "onboarding/eventbus/nats/compat.py knows; using its own fetch",
                       spec.name)
        return lambda batch, timeout: psub.fetch(batch, timeout=timeout)

    @staticmethod
    def _log_unsettled(spec: ConsumerSpec, msgs: list, error: BaseException) -> None:
        """A batch whose settling raised (an ack, nak, term or in_progress on a connection that
        dropped, say). Nothing is lost and the consumer carries on: JetStream redelivers what
        was not settled after ack_wait, and the inbox skips what had committed."""
        logger.error(
            "consumer %s: settling a batch of %d failed (%s: %s); JetStream redelivers what was "
            "not settled after ack_wait: %s", spec.name, len(msgs),
            type(error).__name__, error, message_ids(msgs),
            exc_info=not isinstance(error, nats.errors.Error),  # an unexpected one: its trace
        )

    async def _hand_back(self, psub) -> None:
        """Nak what the server delivered that no fetch returned yet, so nothing waits ack_wait.

        A pull request outlives the fetch that returned early; messages it brings queue up in
        the subscription for the next fetch. Stopping, there is no next fetch.
        """
        with contextlib.suppress(Exception):
            await psub.unsubscribe()  # no more deliveries after this
        for msg in pull.take_queued(psub):
            if msg.reply:  # status messages (e.g. "no messages") carry no reply subject
                with contextlib.suppress(Exception):
                    await msg.nak()

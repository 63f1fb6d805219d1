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
  :class:`Worker` for what makes a blocked thread return, and what happens until it does).
- *NATS is unreachable*: fetch fails; the loop backs off and tries again, for ever.
- *settling fails* (an ack, nak, term or in_progress raises): the batch is logged with its ids
  and the loop carries on; JetStream redelivers what was not settled, the inbox skips what
  committed. One consumer's trouble never ends the process, nor the other consumers in it.

Each decision is written once: the inbox claim and the handlers' transaction in ``inbox.py``
(synchronous), which failure calls for which answer in ``failures.py``, and here the loop that
fetches and settles — both paths, a whole batch in one transaction and one message at a time,
run their transaction through :meth:`ConsumerRunner._transaction` (the outage branch) and settle
it through :meth:`ConsumerRunner._settle_applied` (ack, counts, replays).

The ORM runs on one worker thread per consumer (it may not run on the event loop, and one
thread keeps one database connection). On SIGTERM/SIGINT the message in hand is finished, the
rest of the batch is nak'ed back at once for another worker, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import nats.errors
import nats.js.errors
from django.conf import settings
from django.db import close_old_connections, connections
from django.db.backends.signals import connection_created

from onboarding.contracts import EVENT_ID_HEADER, MSG_ID_HEADER, ContractError, parse_event
from onboarding.eventbus import fetching, metrics, pruning
from onboarding.eventbus.connection import close, connect
from onboarding.eventbus.deadletters import (
    DEAD_LETTER_HEADER,
    dead_letter_resolve,
    dead_letter_store,
    original_subject,
    payload_user_id,
)
from onboarding.eventbus.failures import (  # noqa: F401 (importable from here, as before)
    CRASH_LOOP_FACTOR,
    DATABASE_ERRORS,
    PERMANENT_ERRORS,
    HandlerTimeout,
    MaxDeliveriesExceeded,
    PermanentError,
    consumer_thread,
    crash_loop,
    database_probe,
    dead_letter_reason,
    is_timeout,
    retry_delay,
    set_session_timeouts,
    worth_a_probe,
)
from onboarding.eventbus.inbox import (  # noqa: F401
    CommitGate,
    Incoming,
    inbox_claim,
    process_events,
)
from onboarding.eventbus.lifecycle import Backoff, Stopper
from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.warmup import consumer_warm_up

logger = logging.getLogger(__name__)
# One line per handled event (EVENT_LOG_LEVEL), with structured fields for JSON logs.
event_logger = logging.getLogger("onboarding.eventbus.events")

# The consumers' PostgreSQL session timeouts, on the connections their threads open (only).
connection_created.connect(set_session_timeouts, dispatch_uid="eventbus-consumer-timeouts")

DURABLE_POLL_SECONDS = 0.5  # how often a consumer looks for its durable until it exists
FETCH_TIMEOUT = 1.0  # seconds; also bounds how long a stop request waits on an idle fetch


def event_id_of(msg) -> str:
    """The event's stable id: Event-Id, else Nats-Msg-Id, else its place in the stream."""
    headers = msg.headers or {}
    return (
        headers.get(EVENT_ID_HEADER)
        or headers.get(MSG_ID_HEADER)
        or f"{msg.metadata.stream}:{msg.metadata.sequence.stream}"
    )


def message_ids(msgs: list) -> str:
    """The ids of several messages, for one log line about them all."""
    return (f"seq={','.join(str(msg.metadata.sequence.stream) for msg in msgs)} "
            f"event_ids={','.join(event_id_of(msg) for msg in msgs)}")


def event_fields(consumer: str, msg, outcome: str, user_id: str | None = None, *, meta=None,
                 event_id: str | None = None, **more) -> dict:
    """The structured fields of a log line about one message (``extra=``; keys in JSON logs).

    ``meta``, ``event_id``: the message's, if the caller has them (nats-py parses the metadata
    anew at each access).
    """
    meta = meta or msg.metadata
    return {
        "consumer": consumer, "outcome": outcome, "event_id": event_id or event_id_of(msg),
        "user_id": user_id or payload_user_id(bytes(msg.data)) or None,
        "stream_seq": meta.sequence.stream, "delivery": meta.num_delivered, **more,
    }


def _forget(unsettled: list, settled: list) -> None:
    """Drop the messages of ``settled`` (message, item) pairs from ``unsettled``, in place."""
    done = {id(msg) for msg, _ in settled}
    unsettled[:] = [msg for msg in unsettled if id(msg) not in done]


class Worker:
    """A consumer's database threads: one for its work, one for probes.

    The ORM may not run on the event loop, and one thread keeps one connection per database.
    A thread blocked in a database call cannot be interrupted from the loop: what makes the call
    return is the database's own timeouts (``CONSUMER_STATEMENT_TIMEOUT`` and
    ``CONSUMER_LOCK_TIMEOUT`` on PostgreSQL, the busy timeout on SQLite). What makes the loop
    stop *waiting* is :meth:`apply`'s cap, ``CONSUMER_BATCH_TIMEOUT``: the transaction is
    abandoned (it rolls back at its commit, :class:`~onboarding.eventbus.inbox.CommitGate`) and
    the loop hands its messages back. Until the abandoned call returns, the work thread is busy
    and the next call waits for it; the probe has a thread of its own, so it still answers.
    A call that never returns (a handler hung outside the database) stops this consumer's
    loop, which freezes the heartbeat: the process is stuck, and its supervisor restarts it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._work = ThreadPoolExecutor(1, thread_name_prefix=f"consume-{name}",
                                        initializer=consumer_thread)
        self._probe = ThreadPoolExecutor(1, thread_name_prefix=f"probe-{name}",
                                         initializer=consumer_thread)
        self._abandoned: asyncio.Future | None = None

    async def call(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the work thread."""
        await self._abandoned_returned()
        return await self._submit(fn, *args, **kwargs)

    def _submit(self, fn, /, *args, **kwargs) -> asyncio.Future:
        def run():
            close_old_connections()
            return fn(*args, **kwargs)

        return asyncio.get_running_loop().run_in_executor(self._work, run)

    async def apply(self, spec: ConsumerSpec, items: list[Incoming], timeout: float) -> list:
        """:func:`process_events` on the work thread, given up after ``timeout`` s (0: never).

        Raises :class:`HandlerTimeout` once given up on: the transaction will not commit.
        """
        await self._abandoned_returned()  # not part of this transaction's time
        gate = CommitGate()
        future = self._submit(process_events, spec, items, gate=gate)
        if not timeout:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if not gate.abandon():
                return await future  # it is committing: that is quick, and it counts
            self._abandoned = future
            raise HandlerTimeout(
                f"the transaction of {len(items)} event(s) took longer than {timeout:g}s "
                "(CONSUMER_BATCH_TIMEOUT); abandoned, it rolls back", began=gate.began,
            ) from None

    async def idle(self, stopper: Stopper) -> bool:
        """Wait until no abandoned call holds the work thread; False if a stop came first.

        The loop waits here before fetching: messages fetched now would only wait in hand,
        while another replica could take them. No heartbeat meanwhile, on purpose.
        """
        if self._abandoned is None:
            return True
        if not await stopper.wait_for(asyncio.shield(self._abandoned)):
            return False
        await self._abandoned_returned()
        return True

    async def _abandoned_returned(self) -> None:
        future, self._abandoned = self._abandoned, None
        if future is None:
            return
        await asyncio.wait({future})
        error = future.exception()  # Abandoned at its commit, or the database's timeout
        logger.warning("consumer %s: the abandoned transaction returned and rolled back (%s)",
                       self.name, f"{type(error).__name__}: {error}" if error else "no error")

    async def probe(self, alias: str) -> bool:
        """True if ``alias`` accepts a write transaction now (:func:`database_probe`)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._probe, database_probe, alias)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        """Close the work thread's connections, unless it is still held by an abandoned call.

        Never blocks the event loop (``shutdown(wait=False)``): a thread still blocked in the
        database ends with the process.
        """
        if self._abandoned is None or self._abandoned.done():
            with contextlib.suppress(Exception):
                await self.call(connections.close_all)
        self._work.shutdown(wait=False, cancel_futures=True)
        self._probe.shutdown(wait=False, cancel_futures=True)


class ConsumerRunner:
    """Runs the given consumers in this process until stopped (SIGTERM/SIGINT or ``stop()``)."""

    def __init__(
        self,
        specs: list[ConsumerSpec],
        *,
        batch: int | None = None,
        per_message: bool | None = None,
    ) -> None:
        self.specs = specs
        self.batch = batch or settings.CONSUMER_FETCH_BATCH
        # Batch mode: a fetched batch commits in one transaction with bulk writes; a failure
        # falls back to one message at a time, so one bad message never fails its batch-mates.
        self.per_message = (
            not settings.CONSUMER_BATCH_TRANSACTIONS if per_message is None else per_message
        )
        self.batch_timeout = settings.CONSUMER_BATCH_TIMEOUT
        self.stopper = Stopper()
        self.processed = {spec.name: 0 for spec in specs}  # settled messages, duplicates too
        self.duplicates = {spec.name: 0 for spec in specs}  # of which already in the inbox
        self.outages = {spec.name: 0 for spec in specs}
        self._ack_wait: dict[str, float] = {}

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
            f"{name} (processed {count - self.duplicates[name]}, "
            f"{self.duplicates[name]} duplicate(s) skipped)"
            for name, count in self.processed.items()
        )

    # -- fetching ----------------------------------------------------------------------------

    async def _consume(self, nc, spec: ConsumerSpec, subscriptions: list) -> None:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        worker = Worker(spec.name)
        backoff = Backoff(initial=0.5, maximum=10.0)
        psub = fetch = None
        waiting_for_durable = False
        pending = metrics.watch_pending(js, spec.name, spec.durable)  # METRICS_PORT only
        try:
            # Before the first fetch, so that a pull request waiting on the durable means a warm
            # consumer, and its first events do not pay for the first connection (warmup.py).
            await self.stopper.wait_for(
                asyncio.ensure_future(worker.call(consumer_warm_up, spec)))
            while not self.stopper.stopped:
                if not await worker.idle(self.stopper):
                    break
                metrics.consumer_tick(spec.name)
                try:
                    if psub is None:
                        info = await js.consumer_info(settings.NATS_STREAM, spec.durable)
                        # Keepalives follow the durable's real ack_wait, whatever settings say.
                        self._ack_wait[spec.name] = info.config.ack_wait or 30.0
                        if info.config.max_deliver not in (None, -1):
                            logger.error(
                                "consumer %s: the durable has max_deliver=%s; a message at that "
                                "limit whose dead letter cannot be stored would be stuck. Run "
                                "`manage.py setup_jetstream`.", spec.name, info.config.max_deliver,
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
                    delay = backoff.next()
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
                        await self._handle_batch(spec, msgs, worker)
                    except Exception as exc:
                        self._log_unsettled(spec, msgs, exc)
        finally:
            if pending is not None:
                pending.cancel()
            if psub is not None:
                await self._hand_back(psub)
            await worker.close()

    @staticmethod
    def _fetcher(spec: ConsumerSpec, psub):
        """``fetch(batch, timeout)`` for ``psub``: fetching.py's, unless this nats-py lacks what it
        needs (then nats-py's own, which costs ~4x the CPU per message: docs/benchmarks.md)."""
        if fetching.supported(psub):
            return lambda batch, timeout: fetching.fetch(psub, batch, timeout)
        logger.warning("consumer %s: this nats-py's pull subscription is not the one "
                       "onboarding/eventbus/fetching.py knows; using its own fetch", spec.name)
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
        for msg in fetching.take_queued(psub):
            if msg.reply:  # status messages (e.g. "no messages") carry no reply subject
                with contextlib.suppress(Exception):
                    await msg.nak()

    async def _handle_batch(self, spec: ConsumerSpec, msgs: list, worker) -> None:
        unsettled = list(msgs)
        async with self._keepalive(spec, unsettled, self._ack_wait.get(spec.name, 30.0)):
            if not self.per_message and len(unsettled) > 1:
                await self._handle_together(spec, unsettled, worker)
            while unsettled:
                metrics.consumer_tick(spec.name)  # one message at a time: each is progress
                if self.stopper.stopped:
                    # Stopping: hand the rest back now rather than after ack_wait.
                    for msg in unsettled:
                        with contextlib.suppress(Exception):
                            await msg.nak()
                    return
                if await self._handle(spec, unsettled[0], worker, unsettled):
                    unsettled.pop(0)

    @contextlib.asynccontextmanager
    async def _keepalive(self, spec: ConsumerSpec, msgs: list, ack_wait: float):
        """Tell JetStream the messages in hand are still being worked on, every ack_wait/3.

        Without it a slow handler, or a batch waiting out a database outage, would see its
        messages redelivered — to another worker, or to this one after the outage. A beat that
        fails is logged (one line per beat, with the ids) and the work goes on: a redelivery it
        allows is skipped by the inbox if this worker commits first.
        """

        async def beat():
            while True:
                await asyncio.sleep(ack_wait / 3)
                failed, error = [], None
                for msg in list(msgs):
                    try:
                        await msg.in_progress()
                    except Exception as exc:
                        failed.append(msg)
                        error = exc
                if failed:
                    logger.warning(
                        "consumer %s: keepalive (in_progress) failed for %d message(s) in hand "
                        "(%s: %s); JetStream may redeliver them after ack_wait: %s",
                        spec.name, len(failed), type(error).__name__, error, message_ids(failed),
                    )

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()

    # -- one transaction, whatever its size --------------------------------------------------

    async def _transaction(self, spec: ConsumerSpec, worker, items: list[Incoming], *,
                           mode: str, in_hand: list):
        """Run :func:`process_events` until it commits: (applied flags, seconds it took).

        This is where an outage is told from a failure, for both paths: a database error with a
        database that answers a probe is raised to the caller (this delivery's failure); with
        one that does not, the messages stay in hand and the *same* delivery is retried once the
        database is back, so an outage costs no delivery. None: a stop came during an outage.
        """
        while True:
            started = time.perf_counter()
            try:
                applied = await worker.apply(spec, items, self.batch_timeout)
            except (*DATABASE_ERRORS, HandlerTimeout) as exc:
                metrics.handler_timed(spec.name, mode, started)
                if not worth_a_probe(exc) or await worker.probe(spec.database):
                    raise
                logger.warning(
                    "consumer %s: database %r unavailable (%s: %s); pausing with %d message(s) "
                    "in hand", spec.name, spec.database, type(exc).__name__, exc, len(in_hand),
                )
                if not await self._await_database(spec, worker):
                    return None
                continue
            except BaseException:
                metrics.handler_timed(spec.name, mode, started)
                raise
            return applied, metrics.handler_timed(spec.name, mode, started)

    async def _settle_applied(self, spec: ConsumerSpec, worker, ready: list, applied: list,
                              took: float, **log_fields) -> None:
        """Ack what a committed transaction applied, count it, log it, resolve its replays."""
        for msg, _ in ready:
            await msg.ack()  # only now: the transaction has committed
        new = sum(applied)
        self.processed[spec.name] += len(applied)
        self.duplicates[spec.name] += len(applied) - new
        metrics.handled(spec.name, processed=new, duplicates=len(applied) - new)
        for (msg, item), is_new in zip(ready, applied, strict=True):
            self._log_handled(spec, msg, item, is_new, took, **log_fields)
        for msg, item in ready:
            if msg.subject != item.subject:  # a replay: its dead letter is resolved
                await self._resolve_dead_letter(spec, worker, msg)

    async def _resolve_dead_letter(self, spec: ConsumerSpec, worker, msg) -> None:
        headers = dict(msg.headers or {})
        try:
            await worker.call(dead_letter_resolve, consumer=spec.name, headers=headers)
        except Exception as exc:
            # The event is applied and acked; only the bookkeeping failed. Said once, loudly:
            # the dead letter stays open (health check red) until a replay of it goes through.
            letter = headers.get(DEAD_LETTER_HEADER)
            logger.error(
                "consumer %s: replay seq=%s event_id=%s applied, but dead letter %s could not be "
                "marked resolved (%s: %s); it stays open: replay it again to resolve it",
                spec.name, msg.metadata.sequence.stream, event_id_of(msg), letter,
                type(exc).__name__, exc,
                extra=event_fields(spec.name, msg, "processed", dead_letter_id=letter),
            )

    # -- a whole batch in one transaction -----------------------------------------------------

    async def _handle_together(self, spec: ConsumerSpec, unsettled: list, worker) -> None:
        """Settle what it can of ``unsettled`` in one transaction; leave the rest in the list.

        Messages that cannot be parsed (or keep killing the consumer) are left out, for the
        one-message path to dead-letter right after. If the transaction fails for any other
        reason than an outage, the batch is left to the one-message-at-a-time path, which
        isolates the culprit.
        """
        ready: list[tuple[object, Incoming]] = []
        for msg in unsettled:
            meta = msg.metadata
            if crash_loop(meta.num_delivered):
                continue  # the one-message path dead-letters it
            subject = original_subject(spec.name, msg.subject)
            try:
                event = parse_event(subject, msg.data, msg.headers)
            except ContractError:
                continue  # the one-message path dead-letters it, with its own log line
            ready.append((msg, Incoming(event, event_id_of(msg), subject, meta.sequence.stream,
                                        meta)))
        if len(ready) < 2:
            return
        try:
            done = await self._transaction(spec, worker, [item for _, item in ready],
                                           mode="batch", in_hand=unsettled)
        except Exception as exc:
            if is_timeout(exc):
                # Most likely a lock or a slow dependency, which one message at a time would
                # wait out once per message: the whole batch goes back, each with its delay.
                logger.warning(
                    "consumer %s: batch of %d timed out (%s: %s); handing it back: %s",
                    spec.name, len(ready), type(exc).__name__, exc,
                    message_ids([msg for msg, _ in ready]),
                )
                for msg, _ in ready:
                    await self._retry_later(spec, msg, exc, worker)
                _forget(unsettled, ready)
                return
            logger.warning(
                "consumer %s: batch of %d failed (%s: %s); retrying one by one",
                spec.name, len(ready), type(exc).__name__, exc,
            )
            return
        if done is None:
            return  # stopping: the batch handler hands the messages back
        applied, took = done
        _forget(unsettled, ready)
        await self._settle_applied(spec, worker, ready, applied, took, batch_size=len(ready))
        logger.debug(  # the per-event lines say it at INFO
            "consumer %s: processed %d event(s) in one transaction (%d duplicate(s) skipped) "
            "seq %s-%s", spec.name, sum(applied), len(applied) - sum(applied),
            ready[0][1].stream_seq, ready[-1][1].stream_seq,
        )

    # -- one message -------------------------------------------------------------------------

    async def _handle(self, spec: ConsumerSpec, msg, worker, in_hand: list) -> bool:
        """Settle ``msg`` (ack, nak or dead letter); False if a stop came first (unsettled)."""
        meta = msg.metadata
        seq, event_id = meta.sequence.stream, event_id_of(msg)
        error = crash_loop(meta.num_delivered)
        if error is not None:
            logger.error("consumer %s: dead-lettering seq=%s event_id=%s: %s",
                         spec.name, seq, event_id, error,
                         extra=event_fields(spec.name, msg, "dead_lettered"))
            await self._dead_letter(spec, msg, error, worker)
            return True
        subject = original_subject(spec.name, msg.subject)
        try:
            item = Incoming(parse_event(subject, msg.data, msg.headers), event_id, subject, seq,
                            meta)
            done = await self._transaction(spec, worker, [item], mode="message",
                                           in_hand=in_hand)
        except PERMANENT_ERRORS as exc:
            metrics.failed(spec.name, permanent=True)
            logger.error(
                "consumer %s: permanent failure, dead-lettering seq=%s event_id=%s: %s: %s",
                spec.name, seq, event_id, type(exc).__name__, exc,
                extra=event_fields(spec.name, msg, "dead_lettered"),
            )
            await self._dead_letter(spec, msg, exc, worker)
            return True
        except Exception as exc:
            await self._retry_later(spec, msg, exc, worker)
            return True
        if done is None:
            return False  # stopping: the batch handler hands the messages back
        applied, took = done
        await self._settle_applied(spec, worker, [(msg, item)], applied, took)
        return True

    @staticmethod
    def _log_handled(spec: ConsumerSpec, msg, item: Incoming, applied: bool, took: float,
                     **more):
        """The line of one acked event; in batch mode ``took`` is its batch's transaction."""
        if not event_logger.isEnabledFor(logging.INFO):
            return  # EVENT_LOG_LEVEL above INFO: not even the fields (docs/benchmarks.md)
        outcome = "processed" if applied else "duplicate"
        fields = event_fields(spec.name, msg, outcome, user_id=str(item.event.user_id),
                              meta=item.meta, event_id=item.event_id,
                              duration_ms=round(took * 1000, 3), **more)
        event_logger.info(
            "consumer %s: %s seq=%s event_id=%s user_id=%s in %.1f ms", spec.name,
            "processed" if applied else "duplicate skipped", fields["stream_seq"],
            fields["event_id"], fields["user_id"], took * 1000, extra=fields,
        )

    async def _retry_later(self, spec: ConsumerSpec, msg, error: BaseException, worker):
        meta = msg.metadata
        delivery, seq = meta.num_delivered, meta.sequence.stream
        metrics.failed(spec.name, permanent=False)
        if delivery >= settings.CONSUMER_MAX_DELIVER:
            logger.error(
                "consumer %s: delivery %d of %d failed, dead-lettering seq=%s: %s: %s",
                spec.name, delivery, settings.CONSUMER_MAX_DELIVER, seq,
                type(error).__name__, error,
                extra=event_fields(spec.name, msg, "dead_lettered"),
            )
            await self._dead_letter(spec, msg, error, worker)
            return
        delay = retry_delay(delivery)
        logger.warning(
            "consumer %s: delivery %d failed seq=%s, retrying in %.1fs: %s: %s",
            spec.name, delivery, seq, delay, type(error).__name__, error,
            extra=event_fields(spec.name, msg, "retried"),
        )
        metrics.retried(spec.name)
        await msg.nak(delay=delay)

    async def _await_database(self, spec: ConsumerSpec, worker) -> bool:
        """Probe with backoff until the database is back (True) or a stop comes (False)."""
        self.outages[spec.name] += 1
        backoff = Backoff(initial=0.5, maximum=15.0)
        while not self.stopper.stopped:
            metrics.consumer_tick(spec.name)  # waiting out an outage on purpose: not stuck
            await self.stopper.sleep(backoff.next())
            if await worker.probe(spec.database):
                logger.info("consumer %s: database %r is back; resuming", spec.name, spec.database)
                return True
        return False

    async def _dead_letter(self, spec: ConsumerSpec, msg, error: BaseException, worker) -> None:
        meta = msg.metadata
        try:
            await worker.call(
                dead_letter_store,
                consumer=spec.name, subject=original_subject(spec.name, msg.subject),
                stream=meta.stream, stream_seq=meta.sequence.stream, event_id=event_id_of(msg),
                payload=bytes(msg.data), headers=dict(msg.headers or {}),
                deliveries=meta.num_delivered, error=error,
            )
        except Exception as exc:
            # Never terminate a message we could not store: it comes back later instead.
            delay = retry_delay(meta.num_delivered)
            logger.error(
                "consumer %s: could not store dead letter seq=%s (%s); redelivering in %.1fs",
                spec.name, meta.sequence.stream, exc, delay,
                extra=event_fields(spec.name, msg, "retried"),
            )
            metrics.retried(spec.name)
            await msg.nak(delay=delay)
            return
        await msg.term()
        metrics.dead_lettered(spec.name, dead_letter_reason(error))

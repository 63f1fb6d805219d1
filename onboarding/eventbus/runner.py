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
- *NATS is unreachable*: fetch fails; the loop backs off and tries again, for ever.

The ORM runs on one worker thread per consumer (it may not run on the event loop, and one
thread keeps one database connection). On SIGTERM/SIGINT the message in hand is finished, the
rest of the batch is nak'ed back at once for another worker, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from django.conf import settings
from django.db import (
    DataError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
    transaction,
)
from django.utils import timezone

from onboarding.contracts import EVENT_ID_HEADER, MSG_ID_HEADER, ContractError, parse_event
from onboarding.eventbus import metrics, pruning
from onboarding.eventbus.connection import close, connect
from onboarding.eventbus.deadletters import (
    dead_letter_resolve,
    dead_letter_store,
    original_subject,
    payload_user_id,
)
from onboarding.eventbus.lifecycle import Backoff, Stopper
from onboarding.eventbus.models import ProcessedEvent
from onboarding.eventbus.registry import ConsumerSpec

logger = logging.getLogger(__name__)
# One line per handled event (EVENT_LOG_LEVEL), with structured fields for JSON logs.
event_logger = logging.getLogger("onboarding.eventbus.events")

DURABLE_POLL_SECONDS = 0.5  # how often a consumer looks for its durable until it exists
FETCH_TIMEOUT = 1.0  # seconds; also bounds how long a stop request waits on an idle fetch


class PermanentError(Exception):
    """Raised by a handler for an event that can never succeed: dead-lettered at once."""


class MaxDeliveriesExceeded(Exception):
    """The message arrived more often than allowed without being settled."""


# A message delivered this many times CONSUMER_MAX_DELIVER without ever being settled (acked,
# nak'ed or dead-lettered) keeps killing its consumer: it is dead-lettered without running the
# handler again. Deliveries also count restarts and hand-backs on stop, hence the margin; a
# handler that merely fails is dead-lettered after CONSUMER_MAX_DELIVER attempts.
CRASH_LOOP_FACTOR = 3

# Failures a retry cannot fix.
PERMANENT_ERRORS = (ContractError, PermanentError, DataError)
# Failures that may mean the database is unreachable (confirmed by a probe).
DATABASE_ERRORS = (OperationalError, InterfaceError)


def dead_letter_reason(error: BaseException) -> str:
    """The ``reason`` label of a dead letter: why retrying stopped."""
    if isinstance(error, MaxDeliveriesExceeded):
        return "crash_loop"
    return "permanent" if isinstance(error, PERMANENT_ERRORS) else "max_deliver"


def retry_delay(delivery: int) -> float:
    """nak delay after failed delivery number ``delivery`` (1-based): doubling, capped."""
    base, cap = settings.CONSUMER_RETRY_BASE_DELAY, settings.CONSUMER_RETRY_MAX_DELAY
    return min(base * 2 ** (delivery - 1), cap)


def event_id_of(msg) -> str:
    """The event's stable id: Event-Id, else Nats-Msg-Id, else its place in the stream."""
    headers = msg.headers or {}
    return (
        headers.get(EVENT_ID_HEADER)
        or headers.get(MSG_ID_HEADER)
        or f"{msg.metadata.stream}:{msg.metadata.sequence.stream}"
    )


def event_fields(consumer: str, msg, outcome: str, user_id: str | None = None, **more) -> dict:
    """The structured fields of a log line about one message (``extra=``; keys in JSON logs)."""
    meta = msg.metadata
    return {
        "consumer": consumer, "outcome": outcome, "event_id": event_id_of(msg),
        "user_id": user_id or payload_user_id(bytes(msg.data)) or None,
        "stream_seq": meta.sequence.stream, "delivery": meta.num_delivered, **more,
    }


@dataclass(frozen=True)
class Incoming:
    """A parsed message, ready for its handler."""

    event: object
    event_id: str
    subject: str
    stream_seq: int


def process_events(spec: ConsumerSpec, items: list[Incoming]) -> list[bool]:
    """Apply events exactly once for ``spec``, in one transaction; True for each one applied.

    The inbox rows and the handlers' rows commit together in the context's own database, so
    after any crash either both exist or neither does. Events already in the inbox, and
    repeats within ``items``, are skipped; each handler receives the rest in one list.
    """
    alias = spec.database
    with transaction.atomic(using=alias):
        distinct = {item.event_id: item for item in reversed(items)}  # the first of each id
        unclaimed = inbox_claim(alias, spec.name, list(distinct.values()))
        applied = []
        by_subject: dict[str, list] = defaultdict(list)
        for item in items:
            is_new = item.event_id in unclaimed
            unclaimed.discard(item.event_id)  # a repeat within the batch is not new
            applied.append(is_new)
            if is_new:
                by_subject[item.subject].append(item.event)
        for subject, events in by_subject.items():
            handler = spec.handler_for(subject)
            if handler is None:
                raise PermanentError(f"consumer {spec.name} has no handler for {subject}")
            handler(events)
    return applied


INBOX_CHUNK = 500  # rows per inbox statement: 2,500 parameters


def inbox_claim(alias: str, consumer: str, items: list[Incoming]) -> set[str]:
    """Record ``items`` (distinct event ids) in the inbox; return the ids it did not hold yet.

    One statement, ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, instead of a read and then a
    write: half the round trips of a batch's bookkeeping. A concurrent delivery of the same event
    waits on the unique index until this transaction ends, then finds the row and skips it
    (under READ COMMITTED, Django's default). Rows are claimed in event-id order, so two
    overlapping deliveries lock them in the same order and cannot deadlock. Chunks keep any
    configured batch within every engine's limit on query parameters.
    """
    connection = connections[alias]
    claim = _claim_returning if _returning_supported(connection) else _claim_read_then_write
    items = sorted(items, key=lambda item: item.event_id)
    claimed = set()
    for start in range(0, len(items), INBOX_CHUNK):
        claimed |= claim(connection, alias, consumer, items[start : start + INBOX_CHUNK])
    return claimed


def _claim_returning(connection, alias: str, consumer: str, items: list[Incoming]) -> set[str]:
    meta, quote = ProcessedEvent._meta, connection.ops.quote_name
    column = {f.name: quote(f.column) for f in meta.fields}
    names = ("consumer", "event_id", "subject", "stream_seq", "processed_at")
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    row = "(" + ", ".join(["%s"] * len(names)) + ")"
    params = []
    for item in items:
        params += [consumer, item.event_id, item.subject, item.stream_seq, now]
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(column[n] for n in names)}) "
        f"VALUES {', '.join([row] * len(items))} "
        f"ON CONFLICT ({column['consumer']}, {column['event_id']}) DO NOTHING "
        f"RETURNING {column['event_id']}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {event_id for (event_id,) in cursor.fetchall()}


def _claim_read_then_write(connection, alias: str, consumer: str, items: list[Incoming]):
    """SQLite before 3.35 has no RETURNING: read which ids the inbox holds, then insert the rest."""
    inbox = ProcessedEvent.objects.using(alias)
    seen = set(
        inbox.filter(consumer=consumer, event_id__in=[i.event_id for i in items])
        .values_list("event_id", flat=True)
    )
    fresh = [i for i in items if i.event_id not in seen]
    inbox.bulk_create(
        ProcessedEvent(consumer=consumer, event_id=i.event_id, subject=i.subject,
                       stream_seq=i.stream_seq)
        for i in fresh
    )
    return {i.event_id for i in fresh}


def _returning_supported(connection) -> bool:
    return connection.features.can_return_rows_from_bulk_insert


def database_probe(alias: str) -> None:
    """Raise unless ``alias`` accepts a write transaction now.

    On SQLite the transaction begins IMMEDIATE, so it also fails while another process holds
    the write lock — a read would still succeed then, and prove nothing.
    """
    with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")


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
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"consume-{spec.name}")
        backoff = Backoff(initial=0.5, maximum=10.0)
        psub = None
        waiting_for_durable = False
        pending = metrics.watch_pending(js, spec.name, spec.durable)  # METRICS_PORT only
        try:
            while not self.stopper.stopped:
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
                    # Returns what is there as soon as something is (measured: p50 7 ms at
                    # 50 events/s); under load, full batches.
                    msgs = await psub.fetch(self.batch, timeout=FETCH_TIMEOUT)
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
                    await self._handle_batch(spec, msgs, executor)
        finally:
            if pending is not None:
                pending.cancel()
            if psub is not None:
                await self._hand_back(psub)
            await asyncio.get_running_loop().run_in_executor(executor, connections.close_all)
            executor.shutdown()

    async def _hand_back(self, psub) -> None:
        """Nak what the server delivered that no fetch returned yet, so nothing waits ack_wait.

        A pull request outlives the fetch that returned early; messages it brings queue up in
        the subscription for the next fetch. Stopping, there is no next fetch.
        """
        with contextlib.suppress(Exception):
            await psub.unsubscribe()  # no more deliveries after this
        queue = getattr(getattr(psub, "_sub", None), "_pending_queue", None)
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if msg.reply:  # status messages (e.g. "no messages") carry no reply subject
                with contextlib.suppress(Exception):
                    await msg.nak()

    async def _handle_batch(self, spec: ConsumerSpec, msgs: list, executor) -> None:
        unsettled = list(msgs)
        async with self._keepalive(unsettled, self._ack_wait.get(spec.name, 30.0)):
            if not self.per_message and len(unsettled) > 1:
                await self._handle_together(spec, unsettled, executor)
            while unsettled:
                metrics.consumer_tick(spec.name)  # one message at a time: each is progress
                if self.stopper.stopped:
                    # Stopping: hand the rest back now rather than after ack_wait.
                    for msg in unsettled:
                        with contextlib.suppress(Exception):
                            await msg.nak()
                    return
                if await self._handle(spec, unsettled[0], executor, unsettled):
                    unsettled.pop(0)

    @contextlib.asynccontextmanager
    async def _keepalive(self, msgs: list, ack_wait: float):
        """Tell JetStream the messages in hand are still being worked on, every ack_wait/3.

        Without it a slow handler, or a batch waiting out a database outage, would see its
        messages redelivered — to another worker, or to this one after the outage.
        """

        async def beat():
            while True:
                await asyncio.sleep(ack_wait / 3)
                for msg in list(msgs):
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()

    async def _orm(self, executor, fn, /, *args, **kwargs):
        def call():
            close_old_connections()
            return fn(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # -- a whole batch in one transaction -----------------------------------------------------

    async def _handle_together(self, spec: ConsumerSpec, unsettled: list, executor) -> None:
        """Settle what it can of ``unsettled`` in one transaction; leave the rest in the list.

        Messages that cannot be parsed (or keep killing the consumer) are left out, for the
        one-message path to dead-letter right after. If the transaction fails for any other
        reason than an outage, the batch is left to the one-message-at-a-time path, which
        isolates the culprit.
        """
        ready: list[tuple[object, Incoming]] = []
        settled: set[int] = set()
        for msg in unsettled:
            meta = msg.metadata
            subject = original_subject(spec.name, msg.subject)
            if meta.num_delivered > settings.CONSUMER_MAX_DELIVER * CRASH_LOOP_FACTOR:
                continue  # the one-message path dead-letters it
            try:
                event = parse_event(subject, msg.data, msg.headers)
            except ContractError:
                continue  # the one-message path dead-letters it, with its own log line
            ready.append((msg, Incoming(event, event_id_of(msg), subject, meta.sequence.stream)))
        if len(ready) < 2:
            return
        while True:
            started = time.perf_counter()
            try:
                applied = await self._orm(
                    executor, process_events, spec, [item for _, item in ready]
                )
            except DATABASE_ERRORS as exc:
                metrics.handler_timed(spec.name, "batch", started)
                if await self._database_available(spec, executor):
                    return
                logger.warning(
                    "consumer %s: database %r unavailable (%s: %s); pausing with %d message(s) "
                    "in hand", spec.name, spec.database, type(exc).__name__, exc, len(unsettled),
                )
                if not await self._await_database(spec, executor):
                    return
                continue
            except Exception as exc:
                metrics.handler_timed(spec.name, "batch", started)
                logger.warning(
                    "consumer %s: batch of %d failed (%s: %s); retrying one by one",
                    spec.name, len(ready), type(exc).__name__, exc,
                )
                return
            break
        took = metrics.handler_timed(spec.name, "batch", started)
        for msg, _ in ready:
            await msg.ack()  # only now: the transaction has committed
            settled.add(id(msg))
        unsettled[:] = [msg for msg in unsettled if id(msg) not in settled]
        self.processed[spec.name] += len(ready)
        self.duplicates[spec.name] += len(applied) - sum(applied)
        metrics.handled(spec.name, processed=sum(applied), duplicates=len(applied) - sum(applied))
        for (msg, item), is_new in zip(ready, applied, strict=True):
            self._log_handled(spec, msg, item.event, is_new, took, batch_size=len(ready))
        replays = [dict(msg.headers or {}) for msg, item in ready if msg.subject != item.subject]
        for headers in replays:
            with contextlib.suppress(Exception):
                await self._orm(executor, dead_letter_resolve, consumer=spec.name, headers=headers)
        logger.debug(  # the per-event lines above say it at INFO
            "consumer %s: processed %d event(s) in one transaction (%d duplicate(s) skipped) "
            "seq %s-%s", spec.name, sum(applied), len(applied) - sum(applied),
            ready[0][1].stream_seq, ready[-1][1].stream_seq,
        )

    # -- one message -------------------------------------------------------------------------

    async def _handle(self, spec: ConsumerSpec, msg, executor, in_hand: list) -> bool:
        """Settle ``msg`` (ack, nak or dead letter); False if a stop came first (unsettled)."""
        meta = msg.metadata
        seq, delivery = meta.sequence.stream, meta.num_delivered
        event_id = event_id_of(msg)
        subject = original_subject(spec.name, msg.subject)
        limit = settings.CONSUMER_MAX_DELIVER * CRASH_LOOP_FACTOR
        if delivery > limit:
            error = MaxDeliveriesExceeded(
                f"delivered {delivery} times without being settled; the consumer keeps dying "
                "while handling it"
            )
            logger.error("consumer %s: dead-lettering seq=%s event_id=%s: %s",
                         spec.name, seq, event_id, error,
                         extra=event_fields(spec.name, msg, "dead_lettered"))
            await self._dead_letter(spec, msg, error, executor)
            return True
        while True:
            started = None
            try:
                event = parse_event(subject, msg.data, msg.headers)
                started = time.perf_counter()
                (applied,) = await self._orm(
                    executor, process_events, spec, [Incoming(event, event_id, subject, seq)]
                )
            except PERMANENT_ERRORS as exc:
                metrics.handler_timed(spec.name, "message", started)
                metrics.failed(spec.name, permanent=True)
                logger.error(
                    "consumer %s: permanent failure, dead-lettering seq=%s event_id=%s: %s: %s",
                    spec.name, seq, event_id, type(exc).__name__, exc,
                    extra=event_fields(spec.name, msg, "dead_lettered"),
                )
                await self._dead_letter(spec, msg, exc, executor)
                return True
            except DATABASE_ERRORS as exc:
                metrics.handler_timed(spec.name, "message", started)
                if await self._database_available(spec, executor):
                    await self._retry_later(spec, msg, exc, executor)  # this message's problem
                    return True
                logger.warning(
                    "consumer %s: database %r unavailable (%s: %s); pausing with %d message(s) "
                    "in hand", spec.name, spec.database, type(exc).__name__, exc, len(in_hand),
                )
                if not await self._await_database(spec, executor):
                    return False  # stopping: the batch handler hands the messages back
                continue  # the same delivery, again: an outage costs no delivery attempts
            except Exception as exc:
                metrics.handler_timed(spec.name, "message", started)
                await self._retry_later(spec, msg, exc, executor)
                return True
            break
        took = metrics.handler_timed(spec.name, "message", started)
        await msg.ack()  # only now: the transaction has committed
        self.processed[spec.name] += 1
        self.duplicates[spec.name] += not applied
        metrics.handled(spec.name, processed=int(applied), duplicates=int(not applied))
        if msg.subject != subject:  # a replay: its dead letter is resolved
            with contextlib.suppress(Exception):
                await self._orm(executor, dead_letter_resolve, consumer=spec.name,
                                headers=dict(msg.headers or {}))
        self._log_handled(spec, msg, event, applied, took)
        return True

    @staticmethod
    def _log_handled(spec: ConsumerSpec, msg, event, applied: bool, took: float, **more):
        """The line of one acked event; in batch mode ``took`` is its batch's transaction."""
        outcome = "processed" if applied else "duplicate"
        fields = event_fields(spec.name, msg, outcome, user_id=str(event.user_id),
                              duration_ms=round(took * 1000, 3), **more)
        event_logger.info(
            "consumer %s: %s seq=%s event_id=%s user_id=%s in %.1f ms", spec.name,
            "processed" if applied else "duplicate skipped", fields["stream_seq"],
            fields["event_id"], fields["user_id"], took * 1000, extra=fields,
        )

    async def _retry_later(self, spec: ConsumerSpec, msg, error: BaseException, executor):
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
            await self._dead_letter(spec, msg, error, executor)
            return
        delay = retry_delay(delivery)
        logger.warning(
            "consumer %s: delivery %d failed seq=%s, retrying in %.1fs: %s: %s",
            spec.name, delivery, seq, delay, type(error).__name__, error,
            extra=event_fields(spec.name, msg, "retried"),
        )
        metrics.retried(spec.name)
        await msg.nak(delay=delay)

    async def _database_available(self, spec: ConsumerSpec, executor) -> bool:
        try:
            await self._orm(executor, database_probe, spec.database)
        except Exception:
            return False
        return True

    async def _await_database(self, spec: ConsumerSpec, executor) -> bool:
        """Probe with backoff until the database is back (True) or a stop comes (False)."""
        self.outages[spec.name] += 1
        backoff = Backoff(initial=0.5, maximum=15.0)
        while not self.stopper.stopped:
            metrics.consumer_tick(spec.name)  # waiting out an outage on purpose: not stuck
            await self.stopper.sleep(backoff.next())
            if await self._database_available(spec, executor):
                logger.info("consumer %s: database %r is back; resuming", spec.name, spec.database)
                return True
        return False

    async def _dead_letter(self, spec: ConsumerSpec, msg, error: BaseException, executor) -> None:
        meta = msg.metadata
        try:
            await self._orm(
                executor, dead_letter_store,
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

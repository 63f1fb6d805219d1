"""The generic consumer runner behind ``manage.py consume <app>``.

One runner serves any consumer of the registry; a context contributes only its handlers. For
each consumer it binds the app's durable pull consumer, fetches batches and, per message:

1. parses it against the contract — a message that fails is a *permanent* failure: it is stored
   as a dead letter and terminated, never retried, and the consumer carries on;
2. in one transaction on the context's own database, checks the inbox, runs the handler and
   records the event in the inbox — a redelivered event is skipped, never applied twice;
3. acks only after that transaction committed. A failure naks with a growing delay (never a
   hot loop); the last allowed delivery that fails becomes a dead letter.

The ORM runs on one worker thread per consumer (it may not run on the event loop, and one
thread keeps one database connection). Errors from NATS — timeouts, a restart, a missing
consumer — never end the loop: it backs off and carries on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import nats.errors
from django.conf import settings
from django.db import DataError, close_old_connections, connections, transaction
from django.utils import timezone

from onboarding.contracts import MSG_ID_HEADER, ContractError, parse_event
from onboarding.eventbus.connection import close, connect
from onboarding.eventbus.lifecycle import Backoff, Stopper
from onboarding.eventbus.models import DeadLetter, ProcessedEvent
from onboarding.eventbus.registry import ConsumerSpec

logger = logging.getLogger(__name__)

FETCH_TIMEOUT = 1.0  # seconds; also bounds how long a stop request waits on an idle fetch


class PermanentError(Exception):
    """Raised by a handler for an event that can never succeed: dead-lettered at once."""


# Failures a retry cannot fix. Everything else (a lock timeout, a dropped connection, a
# deadlock) is retried with a growing delay.
PERMANENT_ERRORS = (ContractError, PermanentError, DataError)

DEAD_LETTER_DATABASE = "default"


def retry_delay(delivery: int) -> float:
    """nak delay after failed delivery number ``delivery`` (1-based): doubling, capped."""
    base, cap = settings.CONSUMER_RETRY_BASE_DELAY, settings.CONSUMER_RETRY_MAX_DELAY
    return min(base * 2 ** (delivery - 1), cap)


def event_id_of(msg) -> str:
    """The event's stable id: its Nats-Msg-Id, or its stream position if it was sent bare."""
    headers = msg.headers or {}
    return headers.get(MSG_ID_HEADER) or f"{settings.NATS_STREAM}:{msg.metadata.sequence.stream}"


def process_event(spec: ConsumerSpec, *, event, event_id: str, subject: str, stream_seq: int):
    """Apply one event exactly once for ``spec``; return False if it was already processed.

    The inbox row and the handler's rows commit together in the context's own database, so
    after any crash either both exist or neither does.
    """
    handler = spec.handler_for(subject)
    if handler is None:
        raise PermanentError(f"consumer {spec.name} has no handler for {subject}")
    alias = spec.database
    with transaction.atomic(using=alias):
        inbox = ProcessedEvent.objects.using(alias)
        if inbox.filter(consumer=spec.name, event_id=event_id).exists():
            return False
        handler(event)
        # A concurrent delivery of the same event fails here on the unique constraint and
        # rolls back entirely; its retry then finds the inbox row and skips.
        inbox.create(consumer=spec.name, event_id=event_id, subject=subject, stream_seq=stream_seq)
    return True


def dead_letter_store(
    *, consumer: str, msg_subject: str, stream: str, stream_seq: int, event_id: str,
    payload: bytes, headers: dict, deliveries: int, error: BaseException,
) -> DeadLetter:
    """Store (or refresh) the dead letter for one message of one consumer."""
    user_id = ""
    try:
        data = json.loads(payload)
        if isinstance(data, dict) and isinstance(data.get("userId"), str):
            user_id = data["userId"][:64]
    except (ValueError, RecursionError):
        pass
    now = timezone.now()
    fields = {
        "subject": msg_subject,
        "event_id": event_id[:128],
        "user_id": user_id,
        "payload": payload,
        "headers": headers,
        "deliveries": deliveries,
        "error_type": type(error).__name__,
        "error_message": str(error)[:10_000],
        "last_failed_at": now,
    }
    letter, _ = DeadLetter.objects.using(DEAD_LETTER_DATABASE).update_or_create(
        consumer=consumer,
        stream=stream,
        stream_seq=stream_seq,
        defaults=fields,
        create_defaults={**fields, "first_failed_at": now},
    )
    return letter


class ConsumerRunner:
    """Runs the given consumers in this process until stopped (SIGTERM/SIGINT or ``stop()``)."""

    def __init__(self, specs: list[ConsumerSpec], *, batch: int | None = None) -> None:
        self.specs = specs
        self.batch = batch or settings.CONSUMER_FETCH_BATCH
        self.stopper = Stopper()
        self.processed = {spec.name: 0 for spec in specs}

    def stop(self) -> None:
        self.stopper.stop()

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        self.stopper.bind()
        if install_signal_handlers:
            self.stopper.install_signal_handlers()
        names = ",".join(spec.name for spec in self.specs)
        connecting = asyncio.ensure_future(connect(f"consume:{names}"))
        if not await self.stopper.wait_for(connecting):
            return
        nc = connecting.result()
        logger.info("consumers started: %s", names)
        subscriptions: list = []
        try:
            await asyncio.gather(*(self._consume(nc, spec, subscriptions) for spec in self.specs))
        finally:
            await close(nc, *subscriptions)
            logger.info("consumers stopped: %s", names)

    async def _consume(self, nc, spec: ConsumerSpec, subscriptions: list) -> None:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"consume-{spec.name}")
        backoff = Backoff(initial=0.5, maximum=10.0)
        psub = None
        try:
            while not self.stopper.stopped:
                try:
                    if psub is None:
                        await js.consumer_info(settings.NATS_STREAM, spec.durable)
                        psub = await js.pull_subscribe_bind(
                            spec.durable, stream=settings.NATS_STREAM
                        )
                        subscriptions.append(psub)
                    msgs = await psub.fetch(self.batch, timeout=FETCH_TIMEOUT)
                except (TimeoutError, nats.errors.TimeoutError):
                    backoff.reset()
                    continue  # nothing to do (fetch raises a bare asyncio.TimeoutError too)
                except Exception as exc:
                    delay = backoff.next()
                    logger.warning(
                        "consumer %s: fetch failed (%s: %s); retrying in %.1fs%s",
                        spec.name, type(exc).__name__, exc, delay,
                        " — has `manage.py setup_jetstream` run?" if psub is None else "",
                    )
                    await self.stopper.sleep(delay)
                    continue
                backoff.reset()
                for msg in msgs:
                    # A stop request lets the batch in hand finish: every fetched message is
                    # acked or nak'ed before exit, none is left waiting for ack_wait.
                    await self._handle(spec, msg, executor)
        finally:
            await asyncio.get_running_loop().run_in_executor(executor, connections.close_all)
            executor.shutdown()

    async def _orm(self, executor, fn, /, *args, **kwargs):
        def call():
            close_old_connections()
            return fn(*args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(executor, call)

    async def _handle(self, spec: ConsumerSpec, msg, executor) -> None:
        meta = msg.metadata
        seq, delivery = meta.sequence.stream, meta.num_delivered
        event_id = event_id_of(msg)
        try:
            event = parse_event(msg.subject, msg.data, msg.headers)
            applied = await self._orm(
                executor, process_event, spec,
                event=event, event_id=event_id, subject=msg.subject, stream_seq=seq,
            )
        except PERMANENT_ERRORS as exc:
            logger.error(
                "consumer %s: permanent failure, dead-lettering seq=%s event_id=%s: %s: %s",
                spec.name, seq, event_id, type(exc).__name__, exc,
            )
            await self._dead_letter(spec, msg, exc, executor)
            return
        except Exception as exc:
            if delivery >= settings.CONSUMER_MAX_DELIVER:
                logger.error(
                    "consumer %s: delivery %d of %d failed, dead-lettering seq=%s event_id=%s: %s",
                    spec.name, delivery, settings.CONSUMER_MAX_DELIVER, seq, event_id, exc,
                )
                await self._dead_letter(spec, msg, exc, executor)
                return
            delay = retry_delay(delivery)
            logger.warning(
                "consumer %s: delivery %d failed seq=%s event_id=%s, retrying in %.1fs: %s: %s",
                spec.name, delivery, seq, event_id, delay, type(exc).__name__, exc,
            )
            await msg.nak(delay=delay)
            return
        await msg.ack()  # only now: the transaction has committed
        self.processed[spec.name] += 1
        outcome = "processed" if applied else "duplicate skipped"
        logger.info("consumer %s: %s seq=%s event_id=%s", spec.name, outcome, seq, event_id)

    async def _dead_letter(self, spec: ConsumerSpec, msg, error: BaseException, executor) -> None:
        meta = msg.metadata
        try:
            await self._orm(
                executor, dead_letter_store,
                consumer=spec.name, msg_subject=msg.subject, stream=meta.stream,
                stream_seq=meta.sequence.stream, event_id=event_id_of(msg),
                payload=bytes(msg.data), headers=dict(msg.headers or {}),
                deliveries=meta.num_delivered, error=error,
            )
        except Exception as exc:
            # Never terminate a message we could not store: it comes back later instead.
            delay = retry_delay(meta.num_delivered)
            logger.error(
                "consumer %s: could not store dead letter seq=%s (%s); redelivering in %.1fs",
                spec.name, meta.sequence.stream, exc, delay,
            )
            await msg.nak(delay=delay)
            return
        await msg.term()

"""Metrics of the long-running eventbus commands (``consume``, ``outbox_relay``).

Every metric is defined here, once; the consumers and the relay call the small functions below
at the points where an outcome is decided, so a counter and the log line of an event cannot
disagree. ``manage.py consume``/``outbox_relay`` call :func:`start`, which serves Prometheus's
text format on ``METRICS_ADDR:METRICS_PORT/metrics`` when ``METRICS_PORT`` is set (off by
default) and starts the heartbeat file when ``HEARTBEAT_FILE`` is set (:mod:`.liveness`).
Several consumers in one process (``consume --all``) share the one registry and port, told
apart by the ``consumer`` label; several processes on one host need a port each.

What costs I/O is refreshed periodically, not per message, and only when metrics are served
(:func:`refresh_due`): each durable's ``num_pending`` (``consumer_info``,
:mod:`onboarding.eventbus.consumer.pending`) and the outbox backlog (on the relay's scans),
every ``METRICS_REFRESH_INTERVAL`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import time

from django.conf import settings
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from onboarding.eventbus.runtime import liveness

logger = logging.getLogger(__name__)

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                     60, 120)

# -- consumers ---------------------------------------------------------------------------------

EVENTS_HANDLED = Counter(
    "onboarding_consumer_events_handled_total",
    "Events acked after their transaction committed (outcome: processed, or duplicate: already "
    "in the inbox).",
    ["consumer", "outcome"],
)
EVENTS_FAILED = Counter(
    "onboarding_consumer_events_failed_total",
    "Deliveries whose handling failed (kind: permanent — contract, PermanentError, DataError — "
    "or transient); each is then retried or dead-lettered.",
    ["consumer", "kind"],
)
EVENTS_RETRIED = Counter(
    "onboarding_consumer_events_retried_total",
    "Deliveries nak'ed with a delay, to be delivered again.",
    ["consumer"],
)
EVENTS_DEAD_LETTERED = Counter(
    "onboarding_consumer_events_dead_lettered_total",
    "Messages stored as dead letters and terminated (reason: permanent, max_deliver, "
    "crash_loop).",
    ["consumer", "reason"],
)
HANDLER_DURATION = Histogram(
    "onboarding_consumer_handler_duration_seconds",
    "One transaction of the handlers (inbox claim, handlers, commit), failed ones too; mode: "
    "batch (a fetched batch together) or message (one message).",
    ["consumer", "mode"],
    buckets=_DURATION_BUCKETS,
)
BATCH_DURATION = Histogram(
    "onboarding_consumer_batch_duration_seconds",
    "From a fetch returning a batch until every message of it is settled (or handed back).",
    ["consumer"],
    buckets=_DURATION_BUCKETS,
)
BATCH_SIZE = Histogram(
    "onboarding_consumer_batch_size",
    "Messages returned by one fetch.",
    ["consumer"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
PENDING = Gauge(
    "onboarding_consumer_pending_messages",
    "The durable's num_pending: messages not yet delivered to any replica (refreshed every "
    "METRICS_REFRESH_INTERVAL).",
    ["consumer"],
)
ACK_PENDING = Gauge(
    "onboarding_consumer_ack_pending_messages",
    "The durable's num_ack_pending: delivered, not yet settled (all replicas).",
    ["consumer"],
)
ANNOUNCEMENTS_PUBLISHED = Counter(
    "onboarding_consumer_announcements_published_total",
    "The context's own announcements (user.onboarded.<context>, user.erased.<context>) "
    "published by its consumer process and acknowledged (path: commit — at once after the "
    "handler's commit —, or scan).",
    ["consumer", "path"],
)
CONSUMER_LAST_LOOP = Gauge(
    "onboarding_consumer_last_loop_timestamp_seconds",
    "Unix time of the consumer loop's last tick (a fetch, a settled message, an outage probe).",
    ["consumer"],
)

# -- the relay ---------------------------------------------------------------------------------

RELAY_PUBLISHED = Counter(
    "onboarding_relay_published_total",
    "Outbox events published and acknowledged by JetStream (path: scan, or notify — the "
    "PostgreSQL fast path).",
    ["path"],
)
RELAY_PUBLISH_FAILED = Counter(
    "onboarding_relay_publish_failed_total",
    "Scanned outbox events whose publish was not acknowledged (they are retried).",
)
RELAY_ERASURES = Counter(
    "onboarding_relay_erasures_total",
    "Erasures carried out (result: done — the user's earlier messages deleted from the stream "
    "and their outbox rows and dead letters emptied —, or failed: retried on the next round).",
    ["result"],
)
RELAY_BACKLOG = Gauge(
    "onboarding_relay_backlog_events",
    "Unpublished outbox rows (refreshed on the active relay's scans).",
)
RELAY_BACKLOG_AGE = Gauge(
    "onboarding_relay_backlog_age_seconds",
    "Age of the oldest unpublished outbox row; 0 when there is none (refreshed on scans).",
)
RELAY_ACTIVE = Gauge(
    "onboarding_relay_active",
    "1 while this relay holds the outbox lock and publishes, 0 while it stands by.",
)
RELAY_STEPPED_DOWN = Counter(
    "onboarding_relay_stepped_down_total",
    "Times this relay gave up the outbox lock after publishing nothing for RELAY_STALL_SECONDS "
    "(a dead or refused NATS connection), so that a standby that can publish takes over.",
)
RECONCILE_PASSES = Counter(
    "onboarding_reconcile_passes_total",
    "Background reconcile passes of the active relay (RECONCILE_INTERVAL; result: done, or "
    "failed: tried again next interval).",
    ["result"],
)
RECONCILE_MISSING = Counter(
    "onboarding_reconcile_missing_total",
    "Users the background reconcile found a service never set up (older than "
    "RECONCILE_MIN_AGE, not ready in accounts' projection); each was re-delivered its "
    "user.registered, to that service alone.",
    ["service"],
)
RECONCILE_SKIPPED = Counter(
    "onboarding_reconcile_skipped_total",
    "Services a background reconcile pass left for later because their durable still had "
    "events to deliver (catching up; accounts: the projection itself is behind).",
    ["service"],
)
RECONCILE_LAST_PASS = Gauge(
    "onboarding_reconcile_last_pass_timestamp_seconds",
    "Unix time of the background reconcile's last pass that completed.",
)
RELAY_LAST_LOOP = Gauge(
    "onboarding_relay_last_loop_timestamp_seconds",
    "Unix time of the relay loop's last tick (a scan, an idle tick, a standby poll).",
)


# -- serving -----------------------------------------------------------------------------------


class MetricsError(Exception):
    """The metrics server cannot start (the port is taken, say)."""


_started = False
_refreshed: dict[str, float] = {}  # what -> time.monotonic() of its last refresh


def enabled() -> bool:
    return settings.METRICS_PORT is not None


_ROLES = {
    "consumer": (EVENTS_HANDLED, EVENTS_FAILED, EVENTS_RETRIED, EVENTS_DEAD_LETTERED,
                 HANDLER_DURATION, BATCH_DURATION, BATCH_SIZE, PENDING, ACK_PENDING,
                 ANNOUNCEMENTS_PUBLISHED, CONSUMER_LAST_LOOP),
    "relay": (RELAY_PUBLISHED, RELAY_PUBLISH_FAILED, RELAY_ERASURES, RELAY_BACKLOG,
              RELAY_BACKLOG_AGE, RELAY_ACTIVE, RELAY_STEPPED_DOWN, RELAY_LAST_LOOP),
}


def start(role: str) -> None:
    """Serve ``role``'s metrics (METRICS_PORT) and write the heartbeat (HEARTBEAT_FILE), as set.

    Once per process. Only the role's own metrics are served: a consumer reporting
    ``onboarding_relay_active 0`` would look like a relay on standby to an alert. Raises
    MetricsError when the port is taken: a second process on the host with the same
    METRICS_PORT would otherwise run unobserved.
    """
    global _started
    if _started:
        return
    for other, collectors in _ROLES.items():
        if other != role:
            for collector in collectors:
                with contextlib.suppress(KeyError):  # already unregistered
                    REGISTRY.unregister(collector)
    if enabled():
        try:
            start_http_server(settings.METRICS_PORT, addr=settings.METRICS_ADDR)
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {settings.METRICS_ADDR}:{settings.METRICS_PORT}: "
                f"{exc} (processes on one host need a METRICS_PORT each)"
            ) from exc
        logger.info("metrics on http://%s:%s/metrics", settings.METRICS_ADDR,
                    settings.METRICS_PORT)
    if settings.HEARTBEAT_FILE:
        liveness.start_heartbeat(settings.HEARTBEAT_FILE)
    _started = True


def refresh_due(what: str) -> bool:
    """True at most once per METRICS_REFRESH_INTERVAL for ``what`` (and only when serving)."""
    if not enabled():
        return False
    now = time.monotonic()
    if now - _refreshed.get(what, -float("inf")) < settings.METRICS_REFRESH_INTERVAL:
        return False
    _refreshed[what] = now
    return True


# -- called by the consumer runner -------------------------------------------------------------


def consumer_tick(consumer: str) -> None:
    """The consumer's loop made progress, or waits on purpose (:mod:`.liveness`)."""
    CONSUMER_LAST_LOOP.labels(consumer).set(liveness.tick(f"consumer:{consumer}"))


@contextlib.contextmanager
def batch(consumer: str, size: int):
    """Around the handling of one fetched batch: its size, and its duration."""
    BATCH_SIZE.labels(consumer).observe(size)
    started = time.perf_counter()
    try:
        yield
    finally:
        BATCH_DURATION.labels(consumer).observe(time.perf_counter() - started)


def handler_timed(consumer: str, mode: str, started: float | None) -> float:
    """Record one handler transaction that began at ``started`` (perf_counter); its seconds.

    ``started`` None: the transaction never began (the message failed before); nothing to time.
    """
    if started is None:
        return 0.0
    took = time.perf_counter() - started
    HANDLER_DURATION.labels(consumer, mode).observe(took)
    return took


def handled(consumer: str, *, processed: int, duplicates: int) -> None:
    if processed:
        EVENTS_HANDLED.labels(consumer, "processed").inc(processed)
    if duplicates:
        EVENTS_HANDLED.labels(consumer, "duplicate").inc(duplicates)


def failed(consumer: str, *, permanent: bool) -> None:
    EVENTS_FAILED.labels(consumer, "permanent" if permanent else "transient").inc()


def retried(consumer: str) -> None:
    EVENTS_RETRIED.labels(consumer).inc()


def dead_lettered(consumer: str, reason: str) -> None:
    EVENTS_DEAD_LETTERED.labels(consumer, reason).inc()


# -- called by the relay -----------------------------------------------------------------------


def relay_tick() -> None:
    RELAY_LAST_LOOP.set(liveness.tick("relay"))


def relay_active(active: bool) -> None:
    RELAY_ACTIVE.set(1 if active else 0)


def announcements_published(consumer: str, count: int, *, path: str) -> None:
    if count:
        ANNOUNCEMENTS_PUBLISHED.labels(consumer, path).inc(count)


def relay_stepped_down() -> None:
    RELAY_STEPPED_DOWN.inc()


def relay_published(count: int, *, path: str) -> None:
    if count:
        RELAY_PUBLISHED.labels(path).inc(count)


def relay_publish_failed(count: int) -> None:
    RELAY_PUBLISH_FAILED.inc(count)


def relay_erasure(*, done: bool, count: int = 1) -> None:
    RELAY_ERASURES.labels(result="done" if done else "failed").inc(count)


def reconcile_pass(*, done: bool) -> None:
    RECONCILE_PASSES.labels(result="done" if done else "failed").inc()
    if done:
        RECONCILE_LAST_PASS.set(time.time())


def reconcile_missing(service: str, count: int) -> None:
    if count:
        RECONCILE_MISSING.labels(service).inc(count)


def reconcile_skipped(service: str) -> None:
    RECONCILE_SKIPPED.labels(service).inc()


def relay_backlog(count: int, age: float) -> None:
    """The outbox backlog the active relay last read, and its oldest row's age (0: none)."""
    RELAY_BACKLOG.set(count)
    RELAY_BACKLOG_AGE.set(age)


def pending(consumer: str, *, pending: int, ack_pending: int) -> None:
    """The durable's counts, as a consumer's watcher last read them."""
    PENDING.labels(consumer).set(pending)
    ACK_PENDING.labels(consumer).set(ack_pending)

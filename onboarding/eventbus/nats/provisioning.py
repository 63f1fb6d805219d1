"""Create or update the stream and the durable consumers, idempotently.

Run at deploy time by ``manage.py setup_jetstream``, never implicitly at import or start-up.
Updates start from the server's current configuration and change only the fields this project
manages: ``update_stream`` with a fresh ``StreamConfig`` would reset every field left out (it
set ``max_age`` back to unlimited in an experiment).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.subjects import replay_filter


@dataclass(frozen=True)
class Change:
    kind: str  # "stream" or "consumer"
    name: str
    action: str  # "created", "updated" or "unchanged"
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        changed = f" ({', '.join(self.fields)})" if self.fields else ""
        return f"{self.kind} {self.name}: {self.action}{changed}"


def _differs(current, desired) -> bool:
    if isinstance(desired, float) and current is not None:
        return abs(float(current) - desired) > 1e-3
    if isinstance(desired, list):
        return sorted(current or []) != sorted(desired)
    return current != desired


def _apply(config, desired: dict) -> tuple[str, ...]:
    changed = tuple(k for k, v in desired.items() if _differs(getattr(config, k), v))
    for key in changed:
        setattr(config, key, desired[key])
    return changed


def stream_fields() -> dict:
    return {
        "subjects": list(settings.NATS_STREAM_SUBJECTS),
        "max_age": float(settings.NATS_STREAM_MAX_AGE),
        "duplicate_window": float(settings.NATS_DUPLICATE_WINDOW),
        "num_replicas": settings.NATS_STREAM_REPLICAS,
    }


def consumer_fields(spec: ConsumerSpec) -> dict:
    return {
        # The events it handles, and the dead letters replayed to it alone.
        "filter_subject": None,
        "filter_subjects": [*spec.subjects, replay_filter(spec.name)],
        "ack_policy": AckPolicy.EXPLICIT,
        "ack_wait": float(settings.CONSUMER_ACK_WAIT),
        # Unlimited on the server: the runner enforces CONSUMER_MAX_DELIVER itself and turns the
        # last failure into a dead letter. A server-side limit would instead leave the message
        # stuck, unacked and undelivered, whenever that last step could not complete.
        "max_deliver": -1,
        "max_ack_pending": settings.CONSUMER_MAX_ACK_PENDING,
    }


def missing_subjects(spec: ConsumerSpec, config) -> list[str]:
    """The subjects ``spec`` handles that its durable (``config``, a ConsumerConfig) does not
    deliver: a durable provisioned before a new event type (``setup_jetstream`` adds them)."""
    delivered = set(config.filter_subjects or ([config.filter_subject]
                                               if config.filter_subject else []))
    if not delivered:
        return []  # no filter: the whole stream
    return [subject for subject in [*spec.subjects, replay_filter(spec.name)]
            if subject not in delivered]


async def ensure_stream(js) -> Change:
    name = settings.NATS_STREAM
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        # Limits retention: messages stay for max_age whoever has consumed them, so a consumer
        # that was down catches up and a consumer added later can replay from the start.
        await js.add_stream(
            StreamConfig(
                name=name,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                **stream_fields(),
            )
        )
        return Change("stream", name, "created")
    config = info.config
    retention = getattr(config.retention, "value", config.retention)
    if retention != RetentionPolicy.LIMITS.value:
        raise RuntimeError(
            f"stream {name} has {retention} retention; this project needs limits (a broadcast "
            "stream that keeps history). Retention cannot be changed in place."
        )
    changed = _apply(config, stream_fields())
    if not changed:
        return Change("stream", name, "unchanged")
    await js.update_stream(config)
    return Change("stream", name, "updated", changed)


async def ensure_consumer(js, spec: ConsumerSpec) -> Change:
    stream = settings.NATS_STREAM
    try:
        info = await js.consumer_info(stream, spec.durable)
    except NotFoundError:
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=spec.durable,
                # A new consumer starts from the beginning of the retained history.
                deliver_policy=DeliverPolicy.ALL,
                **consumer_fields(spec),
            ),
        )
        return Change("consumer", spec.durable, "created")
    config = info.config
    changed = _apply(config, consumer_fields(spec))
    if not changed:
        return Change("consumer", spec.durable, "unchanged")
    await js.add_consumer(stream, config)  # add_consumer updates a durable's mutable fields
    return Change("consumer", spec.durable, "updated", changed)

"""The transactional outbox's storage: the rows that wait to reach JetStream.

Only the database side lives here: reading the rows due for publishing, marking them published
once JetStream acknowledged them, recording failed attempts. It knows nothing of NATS. Writing an
event and getting it out when its transaction commits is :mod:`onboarding.eventbus.oncommit`;
publishing is :mod:`onboarding.eventbus.publisher` and the relay
(:mod:`onboarding.eventbus.relay`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.db import connections
from django.db.models import F
from django.utils import timezone

from onboarding.eventbus.models import OutboxEvent

# The outbox lives with the producer's data (accounts), in the default database.
OUTBOX_DATABASE = "default"


@dataclass(frozen=True)
class OutboundMessage:
    """What the publisher needs of an outbox row, detached from the ORM (it crosses threads)."""

    row_id: int
    subject: str
    payload: bytes
    headers: dict

    @classmethod
    def from_row(cls, row: OutboxEvent) -> OutboundMessage:
        return cls(
            row_id=row.pk, subject=row.subject, payload=row.payload.encode(), headers=row.headers
        )


def outbox_connection():
    """A new autocommit psycopg connection to the outbox database (PostgreSQL), Django's aside.

    For what must not share Django's connection, which the ORM uses and may close: waiting for
    notifications, holding the relay's session lock. Same parameters: timeouts, keepalives.
    """
    import psycopg

    params = connections[OUTBOX_DATABASE].get_connection_params()
    for django_only in ("cursor_factory", "context"):
        params.pop(django_only, None)
    return psycopg.connect(**params, autocommit=True)


def outbox_unpublished(*, older_than: float, limit: int) -> list[OutboundMessage]:
    """The oldest unpublished rows created at least ``older_than`` seconds ago, in id order."""
    cutoff = timezone.now() - dt.timedelta(seconds=older_than)
    rows = (
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(published_at__isnull=True, created_at__lte=cutoff)
        .order_by("id")
        .values_list("id", "subject", "payload", "headers")[:limit]
    )
    return [
        OutboundMessage(row_id=row_id, subject=subject, payload=payload.encode(), headers=headers)
        for row_id, subject, payload, headers in rows
    ]


# Publishers gather the rows JetStream acknowledged for this long and mark them in one UPDATE:
# one write transaction per event would compete with the registrations themselves (on SQLite,
# for its one write lock). The relay's grace period must be well above it (eventbus.W003).
MARK_COALESCE_SECONDS = 0.5


def outbox_mark_published(*, row_ids: list[int]) -> int:
    """Mark rows whose PubAck arrived. Idempotent: a row already marked keeps its first time."""
    if not row_ids:
        return 0
    return (
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(id__in=row_ids, published_at__isnull=True)
        .update(published_at=timezone.now())
    )


def outbox_record_failure(*, row_ids: list[int], error: str) -> None:
    """Note a failed relay attempt on rows that stay unpublished (shown in the admin)."""
    if row_ids:
        OutboxEvent.objects.using(OUTBOX_DATABASE).filter(id__in=row_ids).update(
            attempts=F("attempts") + 1, last_error=error[:2000]
        )


def outbox_backlog() -> tuple[int, dt.datetime | None]:
    """(number of unpublished rows, creation time of the oldest)."""
    qs = OutboxEvent.objects.using(OUTBOX_DATABASE).filter(published_at__isnull=True)
    oldest = qs.order_by("id").values_list("created_at", flat=True).first()
    return qs.count(), oldest

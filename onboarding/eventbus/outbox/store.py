"""The transactional outbox's storage: the rows that wait to reach JetStream.

Only the database side lives here: reading the rows due for publishing, marking them published
once JetStream acknowledged them, recording failed attempts. It knows nothing of NATS. Writing an
event and getting it out when its transaction commits is :mod:`onboarding.eventbus.outbox.write`;
publishing is :mod:`onboarding.eventbus.outbox.publisher` and the relay
(:mod:`onboarding.eventbus.outbox.relay`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.conf import settings
from django.db import connections, models, transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from onboarding.contracts import EVENT_ID_HEADER
from onboarding.eventbus.models import OUTBOX_DATABASE, OutboxEvent


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


def outbox_connection(*, application_name: str | None = None):
    """A new autocommit psycopg connection to the outbox database (PostgreSQL), Django's aside.

    For what must not share Django's connection, which the ORM uses and may close: waiting for
    notifications, holding the relay's session lock. Same parameters: timeouts, keepalives, the
    process's ``application_name`` unless ``application_name`` names this session's role
    (``relay-listen``) for ``pg_stat_activity``.

    ``RELAY_DIRECT_DATABASE_URL``, when set, says where: these sessions must be the server's
    own (a LISTEN, a session lock), so behind PgBouncer in transaction mode they bypass it while
    the ORM's connections go through it. Its host, port, database, user and password replace
    the outbox database's; the rest (timeouts, keepalives) stays.
    """
    import psycopg

    params = connections[OUTBOX_DATABASE].get_connection_params()
    for django_only in ("cursor_factory", "context", "pool"):
        params.pop(django_only, None)
    if settings.RELAY_DIRECT_DATABASE_URL:
        params.update(direct_params(settings.RELAY_DIRECT_DATABASE_URL))
    if application_name is not None:
        params["application_name"] = application_name
    return psycopg.connect(**params, autocommit=True)


def direct_params(url: str) -> dict:
    """psycopg's connection parameters of a ``postgres://`` URL (only what it says)."""
    import environ

    config = environ.Env.db_url_config(url)
    found = {"host": config.get("HOST"), "port": config.get("PORT"),
             "dbname": config.get("NAME"), "user": config.get("USER"),
             "password": config.get("PASSWORD")}
    return {key: value for key, value in found.items() if value not in (None, "")}


def outbox_unpublished(*, older_than: float, limit: int) -> list[OutboundMessage]:
    """Up to ``limit`` rows due for publishing: unpublished, not set aside, created at least
    ``older_than`` seconds ago.

    Rows JetStream never refused come first, in id order (the order they were written in);
    rows it refused before fill what is left of the batch, in id order too. A batch full of
    rows that will never publish cannot hold back the healthy rows behind them, and each query
    walks the partial index of unpublished rows in id order (no sort of the whole backlog).
    """
    cutoff = timezone.now() - dt.timedelta(seconds=older_than)
    due = OutboxEvent.objects.using(OUTBOX_DATABASE).filter(
        published_at__isnull=True, set_aside_at__isnull=True, created_at__lte=cutoff
    )
    fields = ("id", "subject", "payload", "headers")
    rows = list(due.filter(attempts=0).order_by("id").values_list(*fields)[:limit])
    if len(rows) < limit:
        rows += due.filter(attempts__gt=0).order_by("id").values_list(*fields)[:limit - len(rows)]
    return [
        OutboundMessage(row_id=row_id, subject=subject, payload=payload.encode(), headers=headers)
        for row_id, subject, payload, headers in rows
    ]


def outbox_committed_after(*, after_id: int, limit: int) -> list[OutboundMessage]:
    """Up to ``limit`` rows with an id above ``after_id``, unpublished and not set aside, in id
    order, however fresh: what the relay's wake-ups (SQLite) hand over at once."""
    rows = (
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(id__gt=after_id, published_at__isnull=True, set_aside_at__isnull=True)
        .order_by("id").values_list("id", "subject", "payload", "headers")[:limit]
    )
    return [
        OutboundMessage(row_id=row_id, subject=subject, payload=payload.encode(), headers=headers)
        for row_id, subject, payload, headers in rows
    ]


def outbox_last_id() -> int:
    """The highest outbox row id written so far (0 for an empty outbox)."""
    last = OutboxEvent.objects.using(OUTBOX_DATABASE).order_by("-id").values_list(
        "id", flat=True).first()
    return last or 0


# Why a genuine notification may not match: its row went out another way first (the scan).
ALREADY_DONE = "published or set aside already"


def outbox_check_messages(
    messages: list[OutboundMessage],
) -> tuple[list[OutboundMessage], list[tuple[OutboundMessage, str]]]:
    """Split messages that claim to be outbox rows (a notification's) into those that are
    exactly their row, unpublished and not set aside — same id, ``Event-Id``, subject, payload
    and headers — and the others, each with why. One query for them all.

    Whoever may connect to the outbox database may ``NOTIFY`` on its channel: a message is
    trusted only as far as the row it names bears it out.
    """
    rows = {
        row_id: (str(event_id), subject, payload.encode(), headers, published or set_aside)
        for row_id, event_id, subject, payload, headers, published, set_aside in (
            OutboxEvent.objects.using(OUTBOX_DATABASE)
            .filter(id__in=[m.row_id for m in messages])
            .values_list("id", "event_id", "subject", "payload", "headers", "published_at",
                         "set_aside_at")
        )
    }
    matching, others = [], []
    for message in messages:
        row = rows.get(message.row_id)
        if row is None:
            others.append((message, "no such outbox row"))
        elif message.headers.get(EVENT_ID_HEADER) != row[0]:
            others.append((message, f"Event-Id is not the row's ({row[0]})"))
        elif (message.subject, message.payload, message.headers) != row[1:4]:
            others.append((message, "subject, payload or headers differ from the row's"))
        elif row[4]:
            others.append((message, ALREADY_DONE))
        else:
            matching.append(message)
    return matching, others


# Publishers gather the rows JetStream acknowledged for this long and mark them in one UPDATE:
# one write transaction per event would compete with the registrations themselves (on SQLite,
# for its one write lock). The relay's grace period must be well above it (eventbus.W003).
MARK_COALESCE_SECONDS = 0.5


def outbox_mark_published(*, acked: list[tuple[int, int]]) -> int:
    """Mark rows whose PubAck arrived, given as (row id, stream sequence) pairs: the sequence is
    kept, for an erasure to delete the message by. Idempotent: a row already marked keeps its
    first time and sequence."""
    if not acked:
        return 0
    connection = connections[OUTBOX_DATABASE]
    now = timezone.now()
    if connection.vendor == "postgresql":
        # One statement whatever the batch: the pairs travel as two arrays.
        table = connection.ops.quote_name(OutboxEvent._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} AS o SET published_at = %s, stream_seq = v.seq "
                "FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, seq) "
                "WHERE o.id = v.id AND o.published_at IS NULL",
                [now, [row_id for row_id, _ in acked], [seq for _, seq in acked]],
            )
            return cursor.rowcount
    marked = 0
    for start in range(0, len(acked), MARK_CHUNK):
        chunk = dict(acked[start:start + MARK_CHUNK])
        marked += (
            OutboxEvent.objects.using(OUTBOX_DATABASE)
            .filter(id__in=list(chunk), published_at__isnull=True)
            .update(published_at=now, stream_seq=Case(
                *(When(id=row_id, then=Value(seq)) for row_id, seq in chunk.items()),
                output_field=models.BigIntegerField(),
            ))
        )
    return marked


# Rows per UPDATE where values are bound one by one (SQLite): three parameters a row.
MARK_CHUNK = 300


def outbox_record_failure(*, row_ids: list[int], error: str) -> None:
    """Note a failure that may pass (NATS down, no PubAck in time, a stream without a leader)
    on rows that stay unpublished, for the admin. Not an attempt: counting it would set the
    whole outbox aside during an outage."""
    if row_ids:
        OutboxEvent.objects.using(OUTBOX_DATABASE).filter(id__in=row_ids).update(
            last_error=error[:2000]
        )


@dataclass(frozen=True)
class SetAside:
    """A row the relay stopped trying to publish (for its log line)."""

    row_id: int
    event_id: str
    subject: str
    attempts: int
    error: str


def outbox_record_refusals(*, refusals: dict[int, str], max_attempts: int) -> list[SetAside]:
    """Count one attempt on each row JetStream refused (``{row id: why}``), and set aside those
    refused ``max_attempts`` times: the relay's scan no longer takes them, until an operator
    requeues them (:func:`outbox_requeue`). Returns the rows set aside now.
    """
    if not refusals:
        return []
    rows = OutboxEvent.objects.using(OUTBOX_DATABASE)
    by_error: dict[str, list[int]] = {}
    for row_id, error in refusals.items():
        by_error.setdefault(error[:2000], []).append(row_id)
    with transaction.atomic(using=OUTBOX_DATABASE):
        for error, row_ids in by_error.items():
            rows.filter(id__in=row_ids).update(attempts=F("attempts") + 1, last_error=error)
        # A row published meanwhile (the fast path, another relay) is not set aside.
        spent = rows.filter(
            id__in=list(refusals), attempts__gte=max_attempts,
            set_aside_at__isnull=True, published_at__isnull=True,
        )
        found = [
            SetAside(row_id=i, event_id=str(e), subject=s, attempts=a, error=last)
            for i, e, s, a, last in spent.values_list(
                "id", "event_id", "subject", "attempts", "last_error"
            )
        ]
        rows.filter(id__in=[row.row_id for row in found]).update(set_aside_at=timezone.now())
    return found


def outbox_requeue(*, row_ids: list[int]) -> int:
    """Hand set-aside rows back to the relay, their attempts cleared (once their cause is
    fixed: the stream takes their subject now, say). Returns how many were set aside."""
    if not row_ids:
        return 0
    return (
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(id__in=row_ids, set_aside_at__isnull=False, published_at__isnull=True)
        .update(set_aside_at=None, attempts=0)
    )


def outbox_backlog() -> tuple[int, dt.datetime | None]:
    """(number of rows waiting for the relay, creation time of the oldest); set-aside rows,
    which wait for an operator instead, are counted by :func:`outbox_set_aside_count`."""
    qs = OutboxEvent.objects.using(OUTBOX_DATABASE).filter(
        published_at__isnull=True, set_aside_at__isnull=True
    )
    oldest = qs.order_by("id").values_list("created_at", flat=True).first()
    return qs.count(), oldest


def outbox_set_aside_count() -> int:
    """Rows the relay set aside after JetStream refused them every attempt."""
    return (
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(published_at__isnull=True, set_aside_at__isnull=False)
        .count()
    )

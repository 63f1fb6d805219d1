"""Publishing on commit: how code publishes an event, and the fast path that gets it out.

``outbox_publish_on_commit`` is the only way code publishes an event. It writes the event in the
caller's transaction (the outbox, :mod:`onboarding.eventbus.outbox`); the commit then gets it
out at once (the fast path, ``OUTBOX_FAST_PATH``): on PostgreSQL a ``NOTIFY`` wakes the relay,
which publishes it; on SQLite a datagram on a local socket wakes it (:mod:`onboarding.eventbus.wake`);
with ``publish``, a background thread of the web process publishes it
(:mod:`onboarding.eventbus.publisher`). The relay (``manage.py outbox_relay``) also publishes
whatever is still unpublished — after a crash, or while NATS was down. A rolled-back transaction
publishes nothing, and a row is marked published only once JetStream has acknowledged it.
"""

from __future__ import annotations

import json
import uuid

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from onboarding.contracts import event_headers
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.outbox import OUTBOX_DATABASE, OutboundMessage, outbox_connection
from onboarding.eventbus.publisher import get_publisher
from onboarding.eventbus.wake import wake_relay

NOTIFY_CHANNEL = "onboarding_outbox"

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (default build).
NOTIFY_PAYLOAD_LIMIT = 7900


def outbox_publish_on_commit(*, event) -> OutboxEvent:
    """Record ``event`` in the current transaction; publish it once that transaction commits.

    Must be called inside ``transaction.atomic()`` together with the change the event announces:
    outside one, the event would be published for a change that may still fail.
    """
    if not transaction.get_connection(OUTBOX_DATABASE).in_atomic_block:
        raise RuntimeError("outbox_publish_on_commit() must run inside transaction.atomic()")
    event_id = uuid.uuid4()
    row = OutboxEvent(
        event_id=event_id,
        subject=event.subject,
        payload=event.to_json().decode(),
        headers=event_headers(event, event_id=event_id),
    )
    mode = fast_path()
    if mode == "notify":
        _insert_and_notify(row)
        return row
    row.save(using=OUTBOX_DATABASE, force_insert=True)
    if mode == "wake":
        transaction.on_commit(lambda: wake_relay(row.pk), using=OUTBOX_DATABASE)
    elif mode == "publish":
        message = OutboundMessage.from_row(row)
        transaction.on_commit(lambda: get_publisher().submit([message]), using=OUTBOX_DATABASE)
    return row


def fast_path() -> str | None:
    """How committed events leave at once: "notify", "wake", "publish", or None (relay polling
    only)."""
    if not settings.OUTBOX_PUBLISH_ON_COMMIT:
        return None
    mode = settings.OUTBOX_FAST_PATH
    if mode == "auto":
        vendor = connections[OUTBOX_DATABASE].vendor
        return {"postgresql": "notify", "sqlite": "wake"}.get(vendor, "publish")
    return mode


def _insert_and_notify(row: OutboxEvent) -> None:
    """Insert ``row`` and hand it to the relay when the transaction commits: one round trip.

    PostgreSQL's ``NOTIFY`` is delivered only if the transaction commits, and rides on that
    commit; sent from ``on_commit`` it would be a second round trip and a second transaction,
    whose commit (a NOTIFY takes a transaction id) waits for its own WAL flush. The notification
    carries the whole message, so the relay publishes it without reading the row back; one too
    large for a notification goes out empty, and the relay reads the outbox instead.
    """
    connection = connections[OUTBOX_DATABASE]
    meta, quote = OutboxEvent._meta, connection.ops.quote_name
    column = {f.name: quote(f.column) for f in meta.fields}
    row.created_at = timezone.now()
    headers = json.dumps(row.headers)
    sql = f"""
        WITH inserted AS (
            INSERT INTO {quote(meta.db_table)}
                ({column["event_id"]}, {column["subject"]}, {column["payload"]},
                 {column["headers"]}, {column["created_at"]}, {column["attempts"]},
                 {column["last_error"]})
            VALUES (%(event_id)s, %(subject)s, %(payload)s, %(headers)s::jsonb, %(created_at)s,
                    0, '')
            RETURNING {column["id"]} AS id
        ), message AS (
            SELECT id, json_build_object(
                'id', id, 'subject', %(subject)s::text, 'payload', %(payload)s::text,
                'headers', %(headers)s::jsonb
            )::text AS body FROM inserted
        )
        SELECT id, pg_notify(
            %(channel)s, CASE WHEN octet_length(body) < %(limit)s THEN body ELSE '' END
        ) FROM message
    """
    params = {
        "event_id": row.event_id, "subject": row.subject, "payload": row.payload,
        "headers": headers, "created_at": row.created_at, "channel": NOTIFY_CHANNEL,
        "limit": NOTIFY_PAYLOAD_LIMIT,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row.pk = cursor.fetchone()[0]
    row._state.adding = False
    row._state.db = OUTBOX_DATABASE


def outbox_listen():
    """A new connection to the outbox database, LISTENing for commits."""
    listener = outbox_connection()
    listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return listener


def message_from_notification(body: str) -> OutboundMessage | None:
    """The message a NOTIFY carried, or None if it carried none (too large, say)."""
    if not body:
        return None
    data = json.loads(body)
    row_id, subject, payload, headers = (
        data["id"], data["subject"], data["payload"], data["headers"]
    )
    if not (
        isinstance(row_id, int) and isinstance(subject, str) and isinstance(payload, str)
        and isinstance(headers, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise ValueError("not an outbox message")
    return OutboundMessage(
        row_id=row_id, subject=subject, payload=payload.encode(), headers=headers
    )

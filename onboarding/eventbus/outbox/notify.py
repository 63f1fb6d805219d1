"""The PostgreSQL fast path (``OUTBOX_FAST_PATH=notify``): a ``NOTIFY`` wakes the relay.

The web process does no NATS work: after each registration's commit it sends the whole message
with ``pg_notify()``; the relay ``LISTEN``s (:mod:`.listening`) and publishes it at once. A
notification is only a hint: the relay checks it against its outbox row before publishing, and
the scan publishes whatever a lost notification leaves behind.
"""

from __future__ import annotations

import json
import logging

from django.db import connections, transaction

from onboarding.eventbus.models import OUTBOX_DATABASE, OutboxEvent
from onboarding.eventbus.outbox.hints import after_response
from onboarding.eventbus.outbox.store import OutboundMessage, outbox_connection

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "onboarding_outbox"

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (default build).
NOTIFY_PAYLOAD_LIMIT = 7900


def notify_on_commit(row: OutboxEvent) -> None:
    """Hand ``row`` to the relay once the transaction committed (PostgreSQL's NOTIFY).

    The ``NOTIFY`` is sent after the commit, in a transaction of its own, not in the
    registration's: PostgreSQL serialises the commits of every notifying transaction of the
    whole server (a global lock held through the commit's WAL flush), so a registration that
    notified would wait for every other one's disk flush — its own users', and any other
    application's on the server — instead of sharing one flush with them (group commit). The
    notification's own transaction commits asynchronously (``synchronous_commit`` off for it
    alone: it writes nothing that must survive a crash), so it holds that lock for no flush, and
    costs one round trip, after the response. It carries the whole message, so the relay
    publishes it without reading the row back; one too large for a notification goes out
    empty, and the relay reads the outbox instead. A notification that fails, or is lost with
    the process between the two, delays the event until the relay's scan
    (``OUTBOX_RELAY_GRACE``); it never fails the request.
    """
    transaction.on_commit(lambda: after_response(_notify, row), using=OUTBOX_DATABASE)


def _notify(row: OutboxEvent) -> None:
    """Wake the relay: one statement, its own transaction, committed without a flush. The body
    is built here, after the response, not in the request."""
    try:
        body = json.dumps({"id": row.pk, "subject": row.subject, "payload": row.payload,
                           "headers": row.headers})
        if len(body.encode()) >= NOTIFY_PAYLOAD_LIMIT:
            body = ""
        with connections[OUTBOX_DATABASE].cursor() as cursor:
            cursor.execute(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, %s)",
                [NOTIFY_CHANNEL, body],
            )
    except Exception:  # the registration committed: the relay's scan publishes the row
        logger.warning("could not notify the relay; its scan publishes outbox row id=%s",
                       row.pk, exc_info=True)


def outbox_listen():
    """A new connection to the outbox database, LISTENing for commits."""
    listener = outbox_connection(application_name="relay-listen")
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

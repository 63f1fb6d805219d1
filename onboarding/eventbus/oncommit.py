"""Publishing on commit: how code publishes an event, and the fast path that gets it out.

``outbox_publish_on_commit`` is the only way code publishes an event. It writes the event in the
caller's transaction (the outbox, :mod:`onboarding.eventbus.outbox`); the commit then gets it
out at once (the fast path, ``OUTBOX_FAST_PATH``): on PostgreSQL a ``NOTIFY`` after the commit
wakes the relay, which publishes it; on SQLite a datagram on a local socket wakes it
(:mod:`onboarding.eventbus.wake`); with ``publish``, a background thread of the web process
publishes it (:mod:`onboarding.eventbus.publisher`). The relay (``manage.py outbox_relay``) also
publishes whatever is still unpublished — after a crash, or while NATS was down. A rolled-back
transaction publishes nothing, and a row is marked published only once JetStream has
acknowledged it.
"""

from __future__ import annotations

import functools
import json
import logging
import threading

from django.conf import settings
from django.core.signals import request_finished, request_started
from django.db import connections, transaction
from django.utils import timezone

from onboarding.contracts import event_headers
from onboarding.eventbus.ids import uuid7
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.outbox import OUTBOX_DATABASE, OutboundMessage, outbox_connection
from onboarding.eventbus.publisher import get_publisher
from onboarding.eventbus.wake import wake_relay

try:
    import psycopg  # psycopg 3: the outbox INSERT binds its values server-side (_insert)
except ImportError:  # psycopg2, or SQLite only
    psycopg = None

logger = logging.getLogger(__name__)

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
    event_id = uuid7()  # time-ordered: the inboxes' unique indexes grow at one edge (ids.py)
    row = OutboxEvent(
        event_id=event_id,
        subject=event.subject,
        payload=event.to_json().decode(),
        headers=event_headers(event, event_id=event_id),
    )
    mode = fast_path()
    _insert(row)
    if mode == "notify":
        _notify_on_commit(row)
    elif mode == "wake":
        transaction.on_commit(lambda: after_response(wake_relay, row.pk), using=OUTBOX_DATABASE)
    elif mode == "publish":
        message = OutboundMessage.from_row(row)
        transaction.on_commit(lambda: get_publisher().submit([message]), using=OUTBOX_DATABASE)
    return row


# -- waking the relay once the response is out ---------------------------------------------------

# The hints that wake the relay (a NOTIFY, a datagram) wait, in a request, until its response
# has been sent. Sent at the commit, they would wake the relay — and, for a NOTIFY, cost a round
# trip — while the request still writes its response: on a machine whose cores the relay and
# nats-server share with the web workers, the woken relay takes the core the response needs.
# The event leaves a few hundred microseconds later; the client has its 201 that much sooner.
_request = threading.local()


def after_response(fn, *args) -> None:
    """Call ``fn(*args)`` once the current request's response has been sent (Django's
    ``request_finished``), or at once outside a request (a command, a consumer, a test)."""
    pending = getattr(_request, "pending", None)
    if pending is None:
        fn(*args)
    else:
        pending.append((fn, args))


def _flush_after_response(**kwargs) -> None:
    pending, _request.pending = getattr(_request, "pending", None), None
    for fn, args in pending or ():
        try:
            fn(*args)
        except Exception:  # a hint: the relay's scan makes up for it
            logger.warning("waking the relay failed; its scan publishes the event",
                           exc_info=True)


def _start_request(**kwargs) -> None:
    _flush_after_response()  # a request that never finished (it should not happen) loses none
    _request.pending = []


request_started.connect(_start_request, dispatch_uid="eventbus.oncommit.start")
request_finished.connect(_flush_after_response, dispatch_uid="eventbus.oncommit.flush")


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


# The columns the outbox INSERT writes; ``attempts`` and ``last_error`` start at 0 and "" in
# the statement itself, the others are null.
_INSERTED = ("event_id", "subject", "payload", "headers", "created_at")
_insert_sql: dict[str, tuple[str, bool]] = {}


def _insert(row: OutboxEvent) -> None:
    """INSERT ``row`` with one statement of its own, not through ``Model.save()``: the ORM's
    save (signals, SQL compilation per call) was most of what the event cost the request.

    The values are adapted as the model's fields would adapt them. On PostgreSQL (psycopg 3) the
    statement goes through a server-side binding cursor: the values travel as parameters
    instead of being quoted into the SQL text in Python (Django's client-side binding), about
    40 µs less per registration (docs/benchmarks.md, "Register"). Errors are Django's, as with
    its own cursor.
    """
    connection = connections[OUTBOX_DATABASE]
    if connection.vendor not in _insert_sql:
        meta = OutboxEvent._meta
        quote = connection.ops.quote_name
        returning = connection.features.can_return_columns_from_insert
        _insert_sql[connection.vendor] = (
            f"INSERT INTO {quote(meta.db_table)} "
            f"({', '.join(quote(meta.get_field(name).column) for name in _INSERTED)}, "
            f"{quote(meta.get_field('attempts').column)}, "
            f"{quote(meta.get_field('last_error').column)}) "
            f"VALUES ({', '.join(['%s'] * len(_INSERTED))}, 0, '')"
            + (f" RETURNING {quote(meta.pk.column)}" if returning else ""),
            returning,
        )
    sql, returning = _insert_sql[connection.vendor]
    row.created_at = timezone.now()
    ops = connection.ops
    params = [
        row.event_id if connection.features.has_native_uuid_field else row.event_id.hex,
        row.subject, row.payload, ops.adapt_json_value(row.headers, None),
        ops.adapt_datetimefield_value(row.created_at),
    ]
    if psycopg is not None and isinstance(connection.connection, psycopg.Connection):
        connection.validate_no_broken_transaction()
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            def execute(sql, params, many, context):
                return cursor.execute(sql, params)

            # What Django's cursor would do besides: its execute wrappers (tracing, APM,
            # connection.execute_wrapper()). Not its DEBUG query log.
            for wrapper in reversed(connection.execute_wrappers):
                execute = functools.partial(wrapper, execute)
            execute(sql, params, False, {"connection": connection, "cursor": cursor})
            row.pk = cursor.fetchone()[0]
    else:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row.pk = cursor.fetchone()[0] if returning else cursor.lastrowid
    row._state.adding = False
    row._state.db = OUTBOX_DATABASE


def _notify_on_commit(row: OutboxEvent) -> None:
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

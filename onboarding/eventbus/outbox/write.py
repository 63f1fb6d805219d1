"""Publishing on commit: how code publishes an event, and the fast path that gets it out.

``outbox_publish_on_commit`` is the only way code publishes an event. It writes the event in the
caller's transaction (the outbox, :mod:`.store`); the commit then gets it out at once (the fast
path, ``OUTBOX_FAST_PATH``): on PostgreSQL a ``NOTIFY`` after the commit wakes the relay, which
publishes it (:mod:`.notify`); on SQLite a datagram on a local socket wakes it (:mod:`.wake`);
with ``publish``, a background thread of the web process publishes it (:mod:`.publisher`). The
relay (``manage.py outbox_relay``) also publishes whatever is still unpublished — after a
crash, or while NATS was down. A rolled-back transaction publishes nothing, and a row is marked
published only once JetStream has acknowledged it.
"""

from __future__ import annotations

import functools
import logging

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from onboarding.contracts import event_headers
from onboarding.eventbus.ids import uuid7
from onboarding.eventbus.models import OUTBOX_DATABASE, Erasure, OutboxEvent
from onboarding.eventbus.outbox.hints import after_response
from onboarding.eventbus.outbox.notify import notify_on_commit
from onboarding.eventbus.outbox.publisher import get_publisher
from onboarding.eventbus.outbox.store import OutboundMessage
from onboarding.eventbus.outbox.wake import wake_relay

try:
    import psycopg  # psycopg 3: the outbox INSERT binds its values server-side (_insert)
except ImportError:  # psycopg2, or SQLite only
    psycopg = None

logger = logging.getLogger(__name__)


def outbox_publish_on_commit(*, event, erase: bool = False) -> OutboxEvent:
    """Record ``event`` in the current transaction; publish it once that transaction commits.

    Must be called inside ``transaction.atomic()`` together with the change the event announces:
    outside one, the event would be published for a change that may still fail.

    The row is filed under the event's ``key`` (the user it is about). With ``erase``, the event
    also erases its key from the event bus (:mod:`.erasure`): once it is published, the relay
    deletes the stream's copies of the key's earlier events, and their outbox rows.
    """
    if not transaction.get_connection(OUTBOX_DATABASE).in_atomic_block:
        raise RuntimeError("outbox_publish_on_commit() must run inside transaction.atomic()")
    event_id = uuid7()  # time-ordered: the inboxes' unique indexes grow at one edge (ids.py)
    row = OutboxEvent(
        event_id=event_id,
        subject=event.subject,
        payload=event.to_json().decode(),
        headers=event_headers(event, event_id=event_id),
        key=getattr(event, "key", ""),
    )
    mode = fast_path()
    _insert(row)
    if erase:
        if not row.key:
            raise ValueError(f"{event.subject} has no key to erase")
        Erasure.objects.using(OUTBOX_DATABASE).update_or_create(
            key=row.key,
            # Erasing a key again (its copies sent since) starts over with this event.
            defaults={"event_id": event_id, "requested_at": row.created_at,
                      "stream_erased_at": None},
        )
    if mode == "notify":
        notify_on_commit(row)
    elif mode == "wake":
        transaction.on_commit(lambda: after_response(wake_relay, row.pk), using=OUTBOX_DATABASE)
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


# The columns the outbox INSERT writes; ``attempts`` and ``last_error`` start at 0 and "" in
# the statement itself, the others are null.
_INSERTED = ("event_id", "subject", "payload", "headers", "created_at", "key")
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
        ops.adapt_datetimefield_value(row.created_at), row.key,
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

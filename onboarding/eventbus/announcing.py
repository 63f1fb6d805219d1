"""A context's announcements of the work it did for users, written where that work commits.

A context tells the others what it did in events of its own (``user.onboarded.<context>`` once
it created users' defaults, ``user.erased.<context>`` once it erased them; one announcement for
all the users of a transaction), so that nobody
needs to read its database to know: accounts keeps the readiness the game client polls from
them (``manage.py consume accounts``). :func:`announce` writes them to the context's own outbox
(:class:`~onboarding.eventbus.models.Announcement`), in the transaction that applies the handler,
so an announcement commits with the rows it speaks of or not at all.

A context writes none of this itself, so none can forget it: the consumer's transaction
announces ``user.onboarded`` once a ``user.registered`` handler of a context that declares
``DEFAULTS`` has returned (``consumer/inbox.py``), and :func:`~.erasing.erase_users`, which every
context's ``user.deleted`` service calls, announces ``user.erased``.

The context's ``consume`` process publishes them (``onboarding.eventbus.outbox.announcer``):
after the commit, this module hands the committed messages to it (the fast path, in memory, in
the same process), and its scan publishes whatever that missed (the process died before
publishing, NATS was down). No process listens: nothing is kept in memory, and the scan of
whichever ``consume`` process of the context runs next publishes them.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from onboarding.contracts import (
    MAX_USERS_PER_ANNOUNCEMENT,
    UserErased,
    UserOnboarded,
    event_headers,
    event_type_of,
)
from onboarding.eventbus.ids import uuid7
from onboarding.eventbus.models import Announcement, Tombstone
from onboarding.eventbus.rows import insert_ignoring_conflicts


@dataclass(frozen=True)
class AnnouncedMessage:
    """An announcement as the publisher needs it, detached from the ORM (it crosses threads)."""

    event_id: str
    subject: str
    payload: bytes

    @property
    def headers(self) -> dict:
        """What every event carries (``contracts.event_headers``): from the subject's contract
        version and the event id, so the row keeps none."""
        return event_headers(event_type_of(self.subject), event_id=self.event_id)


_lock = threading.Lock()
_listeners: dict[str, Callable[[], None]] = {}  # context -> wakes its announcer
_committed: dict[str, list[AnnouncedMessage]] = {}  # context -> committed, not yet handed over


def announce(*, context: str, events: Iterable) -> int:
    """Write ``events`` (the context's own announcements) to its outbox in the current
    transaction on its database, in one statement; return how many it wrote. Once that
    transaction commits, this process's announcer (if one listens) publishes them at once;
    else the scan does."""
    alias = settings.CONTEXT_DATABASES[context]
    messages = [_message(event) for event in events]
    if not messages:
        return 0
    insert_ignoring_conflicts(
        Announcement, ("event_id", "subject", "payload"),
        [(m.event_id, m.subject, m.payload.decode()) for m in messages],
        same={"context": context}, using=alias)
    _hand_over_on_commit(context, alias, messages)
    return len(messages)


def _message(event) -> AnnouncedMessage:
    # A time-ordered event id, as every event's (ids.py).
    return AnnouncedMessage(str(uuid7()), event.published_subject, event.to_json())


def _hand_over_on_commit(context: str, alias: str, messages: list[AnnouncedMessage]) -> None:
    transaction.on_commit(lambda: _hand_over(context, messages), using=alias)


def _pieces(user_ids: Iterable[uuid.UUID]) -> list[tuple[uuid.UUID, ...]]:
    """The distinct ``user_ids``, sorted, in pieces of at most MAX_USERS_PER_ANNOUNCEMENT."""
    ordered = sorted(set(user_ids))
    return [tuple(ordered[start:start + MAX_USERS_PER_ANNOUNCEMENT])
            for start in range(0, len(ordered), MAX_USERS_PER_ANNOUNCEMENT)]


def announce_onboarded(*, context: str, user_ids: Iterable[uuid.UUID]) -> int:
    """``user.onboarded.<context>`` for the users whose defaults the caller has just created in
    this transaction, one announcement for all of them. Users the context erased are left out:
    it created nothing for them.

    Every handled batch of registrations comes here, so the usual case is one statement: the
    announcement of them all, inserted unless one of them is erased here. Only when one is (a
    late or replayed registration), or the batch is larger than one announcement, are the
    tombstones read first. They are read in this transaction, after the handler's INSERTs,
    which skipped the same tombstones: an erasure cannot commit one in between, as it waits for
    the tables this transaction wrote to (``erasing.py``)."""
    alias = settings.CONTEXT_DATABASES[context]
    pieces = _pieces(user_ids)
    if not pieces:
        return 0
    now = timezone.now()
    if len(pieces) == 1:
        message = _message(UserOnboarded(service=context, user_ids=pieces[0], onboarded_at=now))
        if _insert_unless_any_erased(context, alias, message, pieces[0]):
            _hand_over_on_commit(context, alias, [message])
            return 1
    erased = set(Tombstone.objects.using(alias).filter(
        context=context, user_id__in=[u for piece in pieces for u in piece])
        .values_list("user_id", flat=True))
    return announce(context=context, events=[
        UserOnboarded(service=context, user_ids=piece, onboarded_at=now)
        for piece in _pieces(u for piece in pieces for u in piece if u not in erased)
    ])


def _insert_unless_any_erased(context: str, alias: str, message: AnnouncedMessage,
                              user_ids: tuple[uuid.UUID, ...]) -> bool:
    """INSERT the announcement unless ``context`` erased any of ``user_ids``, in one statement
    (no ORM: it runs for every handled batch); whether it did."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    field = Announcement._meta.get_field
    user_id = Tombstone._meta.get_field("user_id")
    sql = (f"INSERT INTO {quote(Announcement._meta.db_table)} "
           f"({quote('event_id')}, {quote('context')}, {quote('subject')}, {quote('payload')}, "
           f"{quote('created_at')}) SELECT %s, %s, %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM "
           f"{quote(Tombstone._meta.db_table)} WHERE {quote('context')} = %s AND "
           f"{quote('user_id')} IN ({', '.join(['%s'] * len(user_ids))}))")
    params = [field("event_id").get_db_prep_save(uuid.UUID(message.event_id), connection),
              context, message.subject, message.payload.decode(),
              field("created_at").get_db_prep_save(timezone.now(), connection),
              context, *(user_id.get_db_prep_save(u, connection) for u in user_ids)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount == 1


def announce_erased(*, context: str, user_ids: Iterable[uuid.UUID]) -> int:
    """``user.erased.<context>`` for the users the caller has just erased (and tombstoned) in
    this transaction, one announcement for all of them."""
    now = timezone.now()
    return announce(context=context, events=[
        UserErased(service=context, user_ids=piece, erased_at=now)
        for piece in _pieces(user_ids)
    ])


def listen(context: str, wake: Callable[[], None] | None) -> None:
    """Have ``wake()`` called (from the committing thread) when announcements of ``context``
    commit in this process; ``None`` stops listening and drops what was not taken (the scan
    publishes it)."""
    with _lock:
        if wake is None:
            _listeners.pop(context, None)
            _committed.pop(context, None)
        else:
            _listeners[context] = wake
            _committed.setdefault(context, [])


def take_committed(context: str) -> list[AnnouncedMessage]:
    """The announcements of ``context`` committed since the last call, in commit order."""
    with _lock:
        taken = _committed.get(context) or []
        if taken:
            _committed[context] = []
        return taken


def _hand_over(context: str, messages: list[AnnouncedMessage]) -> None:
    """After the commit: hand the messages to this process's announcer, if one listens."""
    with _lock:
        wake = _listeners.get(context)
        if wake is None:
            return  # nobody publishes at once here: the scan will
        _committed[context].extend(messages)
    wake()

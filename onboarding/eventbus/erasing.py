"""Erasing a user in a context: its rows go, a tombstone stays.

A context's ``user.deleted`` handler calls :func:`erase_users` with the tables that hold the
user's rows. In the consumer's transaction it deletes them and records a
:class:`~onboarding.eventbus.models.Tombstone` per user; the context's INSERTs skip tombstoned
users (``insert_ignoring_conflicts(unless_erased=...)``), so the user stays erased whatever
arrives later: an older ``user.registered`` replayed from a dead letter, a repair sent before, a
second copy of the deletion.

Replicas of one consumer fetch different messages, so a registration and its deletion can be
applied at the same moment by two of them. On PostgreSQL the deletion therefore locks the
tables it erases from (``SHARE ROW EXCLUSIVE``: reads go on, writes wait) before it deletes:
a registration that inserted first commits first and its rows are then deleted; one that
inserts after waits for the deletion's commit, and its statement then sees the tombstone.
SQLite lets one transaction write at a time, which serialises them already.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from django.db import connections, router

from onboarding.eventbus.announcing import announce_erased
from onboarding.eventbus.models import Tombstone
from onboarding.eventbus.rows import insert_ignoring_conflicts

CHUNK = 500  # ids per DELETE: within every engine's limit on query parameters


def erase_users(*, context: str, models: Sequence[type], user_ids: Iterable[uuid.UUID]) -> int:
    """Delete every row of ``models`` (tables with a ``user_id`` column, in ``context``'s
    database) of these users and keep a tombstone of each; return how many rows went.

    Idempotent: erasing a user twice deletes nothing more and keeps the first tombstone. Runs in
    the caller's transaction (the consumer's), so the rows, the tombstones, the inbox row of
    the event and the announcement ``user.erased.<context>`` commit together.
    """
    ids = sorted(set(user_ids))
    if not ids:
        return 0
    alias = router.db_for_write(models[0])
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for model in models:
                cursor.execute(f"LOCK TABLE {connection.ops.quote_name(model._meta.db_table)} "
                               "IN SHARE ROW EXCLUSIVE MODE")
    insert_ignoring_conflicts(Tombstone, ("user_id",), [(user_id,) for user_id in ids],
                              same={"context": context}, using=alias)
    deleted = 0
    for model in models:
        for start in range(0, len(ids), CHUNK):
            deleted += model.objects.using(alias).filter(
                user_id__in=ids[start:start + CHUNK]
            ).delete()[0]
    # Told to the others in the same transaction: accounts' readiness shows the erasure.
    announce_erased(context=context, user_ids=ids)
    return deleted


def tombstoned(*, context: str, user_ids: Iterable[uuid.UUID], using: str) -> dict:
    """{user_id: erased_at} of the users ``context`` erased, among ``user_ids``."""
    ids = list(user_ids)
    found = {}
    for start in range(0, len(ids), CHUNK):
        found.update(
            Tombstone.objects.using(using)
            .filter(context=context, user_id__in=ids[start:start + CHUNK])
            .values_list("user_id", "erased_at")
        )
    return found


def held_user_ids(*, models: Sequence[type], after: uuid.UUID | None, limit: int) -> list:
    """The users that have rows in ``models`` (a context's tables keyed by ``user_id``), in id
    order, the first ``limit`` above ``after``: how ``reconcile`` pages through a context's
    users to find orphans (keyset pagination on the ``user_id`` index, never ``OFFSET``)."""
    found: set = set()
    for model in models:
        rows = model.objects.all()
        if after is not None:
            rows = rows.filter(user_id__gt=after)
        found.update(rows.order_by("user_id").values_list("user_id", flat=True)
                     .distinct()[:limit])
    return sorted(found)[:limit]


# What an erased user's dead letter keeps: where it sat and why it failed in general terms, none
# of the payload (the username, the e-mail) nor of the error's text (which may quote them).
ERASED_PAYLOAD = b""
ERASED_MESSAGE = "(erased with its user)"


def dead_letters_erase(*, user_ids: Sequence[str], erasing_event_ids: Iterable[str] = ()) -> int:
    """Empty the dead letters of erased users and discard the open ones: no replay can bring
    the users back, and no copy of their data stays. Returns how many there were.

    The erasing events' own letters (a service that failed on the deletion) stay as they are:
    they hold no personal data, and they must stay open to be replayed: that service has yet to
    erase the user."""
    from django.utils import timezone

    from onboarding.eventbus.models import DEAD_LETTER_DATABASE, DeadLetter

    keep = [str(event_id) for event_id in erasing_event_ids]
    now = timezone.now()
    emptied = 0
    for start in range(0, len(user_ids), CHUNK):
        letters = DeadLetter.objects.using(DEAD_LETTER_DATABASE).filter(
            user_id__in=user_ids[start:start + CHUNK]).exclude(event_id__in=keep)
        letters.filter(discarded_at__isnull=True, resolved_at__isnull=True).update(
            discarded_at=now, discarded_by="erasure", discard_reason="its user was erased")
        emptied += letters.update(payload=ERASED_PAYLOAD, error_message=ERASED_MESSAGE)
    return emptied


def is_erased(*, key: str, event_id: str | None = None) -> bool:
    """Whether the event bus was asked to erase ``key`` (an erasure is pending or done); with
    ``event_id``, whether that event is one the erasure removes: any of the key's events but
    the erasing one (the deletion a service failed on must stay replayable)."""
    from onboarding.eventbus.models import OUTBOX_DATABASE, Erasure

    if not key:
        return False
    erasures = Erasure.objects.using(OUTBOX_DATABASE).filter(key=key)
    if event_id:
        try:
            erasures = erasures.exclude(event_id=uuid.UUID(str(event_id)))
        except ValueError:
            pass  # not an event id of ours: never the erasing event
    return erasures.exists()


def ledger_record(messages: Iterable[tuple[str, str, int, str, str]]) -> None:
    """Note (key, stream, sequence, subject, event id) of messages published outside the outbox
    (a dead letter's replay, a reconcile repair): an erasure of the key deletes them too."""
    from onboarding.eventbus.models import OUTBOX_DATABASE, PublishedMessage

    rows = [message for message in messages if message[0]]
    insert_ignoring_conflicts(
        PublishedMessage, ("key", "stream", "stream_seq", "subject", "event_id"), rows,
        using=OUTBOX_DATABASE,
    )

"""Erasing a key from the event bus: its messages deleted from the stream, its outbox rows gone.

``outbox_publish_on_commit(event=..., erase=True)`` writes an :class:`~..models.Erasure` beside
the event that announces it (``user.deleted``), in the transaction that erases the user. The
active relay carries it out (:func:`erasures_due`, then :func:`erasure_done`) once that event
is published and no earlier event of the key waits to be: it deletes, by sequence, every message
of the key's earlier events that the stream may still hold — the outbox rows' (their PubAck's
sequence) and the :class:`~..models.PublishedMessage` ledger's (rows pruned from the outbox,
dead-letter replays, reconcile repairs) — then those rows.

JetStream's message delete overwrites the stored message (``no_erase`` is false), on every
replica. A message already gone (aged out by ``NATS_STREAM_MAX_AGE``, deleted by an earlier
attempt) counts as deleted. The erasing event stays on the stream: it carries only the id, and
the services that have not handled it yet need it.

A consumer that was down gets the deletion and never the registration it replaces; the result
is the same (no rows, a tombstone).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import Case, Value, When
from django.utils import timezone
from nats.js.errors import NotFoundError

from onboarding.eventbus.erasing import dead_letters_erase
from onboarding.eventbus.models import OUTBOX_DATABASE, Erasure, OutboxEvent, PublishedMessage

logger = logging.getLogger(__name__)

CHUNK = 500  # ids per statement: within every engine's limit on query parameters
IN_FLIGHT = 64  # message deletes awaited together: one round trip for many, not one each


@dataclass(frozen=True)
class ErasureWork:
    """One erasure, ready to carry out: what to delete from the stream, then from the tables."""

    erasure_id: int
    key: str
    event_id: str  # the erasing event's
    messages: tuple[tuple[str, int], ...]  # (stream, sequence)
    outbox_rows: tuple[int, ...]
    ledger_rows: tuple[int, ...]


def erasures_due(*, limit: int = 200) -> list[ErasureWork]:
    """The pending erasures that can be carried out now, oldest first, in three queries
    whatever their number (the outbox's ``key`` has no index: one scan a round, not one an
    erasure; measured: per-erasure queries doubled the erasure latency at 50 deletions/s).

    One waits while its own event is unpublished (the deletion reaches the stream before what
    it replaces leaves it), or while an earlier event of its key is (its sequence is not known
    yet). A set-aside earlier row never reached the stream: it only goes.
    """
    pending = list(Erasure.objects.using(OUTBOX_DATABASE).filter(
        stream_erased_at__isnull=True).order_by("id")[:limit])
    if not pending:
        return []
    keys = [erasure.key for erasure in pending]
    rows_of: dict[str, list] = defaultdict(list)
    for row in (OutboxEvent.objects.using(OUTBOX_DATABASE).filter(key__in=keys).order_by("id")
                .values_list("key", "id", "event_id", "stream_seq", "published_at",
                             "set_aside_at")):
        rows_of[row[0]].append(row[1:])
    ledger_of: dict[str, list] = defaultdict(list)
    for key, row_id, stream, seq, event_id in (
            PublishedMessage.objects.using(OUTBOX_DATABASE).filter(key__in=keys)
            .values_list("key", "id", "stream", "stream_seq", "event_id")):
        ledger_of[key].append((row_id, stream, seq, event_id))
    found = []
    for erasure in pending:
        rows = rows_of[erasure.key]
        erasing = next((row for row in rows if row[1] == erasure.event_id), None)
        if erasing is not None and erasing[3] is None:
            continue  # the deletion itself is not out yet
        # Its own row may have been pruned already: then every row of the key is earlier.
        earlier = [row for row in rows if erasing is None or row[0] < erasing[0]]
        if any(published is None and set_aside is None
               for _, _, _, published, set_aside in earlier):
            continue  # an earlier event is still on its way to the stream
        ledger = [entry for entry in ledger_of[erasure.key]
                  if entry[3] != str(erasure.event_id)]  # copies of the deletion stay
        messages = {(settings.NATS_STREAM, seq) for _, _, seq, _, _ in earlier if seq}
        messages |= {(stream, seq) for _, stream, seq, _ in ledger}
        found.append(ErasureWork(
            erasure.id, erasure.key, str(erasure.event_id), tuple(sorted(messages)),
            tuple(row[0] for row in earlier), tuple(entry[0] for entry in ledger),
        ))
    return found


def erasures_done(*, works: list[ErasureWork], deleted: list[int]) -> None:
    """Their messages are off the stream: delete the rows that pointed at them, empty the keys'
    dead letters (``dead_letters_erase``: one failing later is emptied as it is stored), note
    the time: a few statements for the whole round."""
    if not works:
        return
    dead_letters_erase(user_ids=[work.key for work in works],
                       erasing_event_ids=[work.event_id for work in works])
    outbox_rows = [row for work in works for row in work.outbox_rows]
    ledger_rows = [row for work in works for row in work.ledger_rows]
    with transaction.atomic(using=OUTBOX_DATABASE):
        for start in range(0, max(len(outbox_rows), len(ledger_rows)), CHUNK):
            OutboxEvent.objects.using(OUTBOX_DATABASE).filter(
                id__in=outbox_rows[start:start + CHUNK]).delete()
            PublishedMessage.objects.using(OUTBOX_DATABASE).filter(
                id__in=ledger_rows[start:start + CHUNK]).delete()
        Erasure.objects.using(OUTBOX_DATABASE).filter(id__in=[w.erasure_id for w in works]).update(
            stream_erased_at=timezone.now(),
            messages_deleted=Case(*(When(id=work.erasure_id, then=Value(count))
                                    for work, count in zip(works, deleted, strict=True)),
                                  default=Value(0)),
        )
    for work, count in zip(works, deleted, strict=True):
        logger.info("erasure of key=%s done: %d stream message(s) and %d outbox row(s) deleted",
                    work.key, count, len(work.outbox_rows))


async def erase_messages(js, works: list[ErasureWork]) -> list[int]:
    """Delete ``works``' messages from the stream, ``IN_FLIGHT`` requests at a time; how many
    each had (gone already counts).

    Raises on anything else (NATS down, no permission): the erasures stay pending, and the next
    round tries again (a message deleted already then counts as gone).
    """
    async def delete(stream: str, seq: int) -> None:
        try:
            await js.delete_msg(stream, seq)
        except NotFoundError:
            pass  # aged out, or deleted by an earlier attempt

    messages = [message for work in works for message in work.messages]
    for start in range(0, len(messages), IN_FLIGHT):
        await asyncio.gather(*(delete(stream, seq)
                               for stream, seq in messages[start:start + IN_FLIGHT]))
    return [len(work.messages) for work in works]

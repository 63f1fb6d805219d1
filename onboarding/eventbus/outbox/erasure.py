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

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from nats.js.errors import NotFoundError

from onboarding.eventbus.erasing import dead_letters_erase
from onboarding.eventbus.models import OUTBOX_DATABASE, Erasure, OutboxEvent, PublishedMessage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErasureWork:
    """One erasure, ready to carry out: what to delete from the stream, then from the tables."""

    erasure_id: int
    key: str
    event_id: str  # the erasing event's
    messages: tuple[tuple[str, int], ...]  # (stream, sequence)
    outbox_rows: tuple[int, ...]
    ledger_rows: tuple[int, ...]


def erasures_due(*, limit: int = 50) -> list[ErasureWork]:
    """The pending erasures that can be carried out now, oldest first.

    One waits while its own event is unpublished (the deletion reaches the stream before what
    it replaces leaves it), or while an earlier event of its key is (its sequence is not known
    yet). A set-aside earlier row never reached the stream: it only goes.
    """
    found = []
    pending = Erasure.objects.using(OUTBOX_DATABASE).filter(
        stream_erased_at__isnull=True).order_by("id")[:limit]
    for erasure in pending:
        rows = list(
            OutboxEvent.objects.using(OUTBOX_DATABASE).filter(key=erasure.key)
            .values_list("id", "event_id", "stream_seq", "published_at", "set_aside_at")
        )
        erasing = next((row for row in rows if row[1] == erasure.event_id), None)
        if erasing is not None and erasing[3] is None:
            continue  # the deletion itself is not out yet
        # Its own row may have been pruned already: then every row of the key is earlier.
        earlier = [row for row in rows if erasing is None or row[0] < erasing[0]]
        if any(published is None and set_aside is None
               for _, _, _, published, set_aside in earlier):
            continue  # an earlier event is still on its way to the stream
        ledger = list(
            PublishedMessage.objects.using(OUTBOX_DATABASE).filter(key=erasure.key)
            .exclude(event_id=str(erasure.event_id))
            .values_list("id", "stream", "stream_seq")
        )
        messages = {(settings.NATS_STREAM, seq) for _, _, seq, _, _ in earlier if seq}
        messages |= {(stream, seq) for _, stream, seq in ledger}
        found.append(ErasureWork(
            erasure.id, erasure.key, str(erasure.event_id), tuple(sorted(messages)),
            tuple(row[0] for row in earlier), tuple(row[0] for row in ledger),
        ))
    return found


def erasure_done(*, work: ErasureWork, deleted: int) -> None:
    """Its messages are off the stream: delete the rows that pointed at them, empty the key's
    dead letters (``dead_letters_erase``: one failing later is emptied as it is stored), note
    the time."""
    dead_letters_erase(user_id=work.key, erasing_event_id=work.event_id)
    with transaction.atomic(using=OUTBOX_DATABASE):
        OutboxEvent.objects.using(OUTBOX_DATABASE).filter(id__in=work.outbox_rows).delete()
        PublishedMessage.objects.using(OUTBOX_DATABASE).filter(id__in=work.ledger_rows).delete()
        Erasure.objects.using(OUTBOX_DATABASE).filter(id=work.erasure_id).update(
            stream_erased_at=timezone.now(), messages_deleted=deleted)
    logger.info("erasure of key=%s done: %d stream message(s) and %d outbox row(s) deleted",
                work.key, deleted, len(work.outbox_rows))


async def erase_messages(js, work: ErasureWork) -> int:
    """Delete ``work``'s messages from the stream; how many there were (gone already counts).

    Raises on anything else (NATS down, no permission): the erasure stays pending, and the next
    round tries again.
    """
    for stream, seq in work.messages:
        try:
            await js.delete_msg(stream, seq)
        except NotFoundError:
            pass  # aged out, or deleted by an earlier attempt
    return len(work.messages)

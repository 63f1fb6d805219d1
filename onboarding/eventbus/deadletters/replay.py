"""Sending dead letters back to their consumer, and to it alone.

Replay publishes the stored message again on ``replay.<consumer>.<subject>``, which only that
consumer's durable subscribes to: the other services, which handled the event, never see it.
The replay keeps the event's ``Event-Id`` (so the consumer's inbox still recognises the event)
under a fresh ``Nats-Msg-Id`` (so JetStream does not drop it as a duplicate of the original),
and names the dead letter in ``Dead-Letter-Id``: processing it resolves the dead letter, failing
again updates the same dead letter with the new error (:mod:`.store`).
"""

from __future__ import annotations

import asyncio
import uuid

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from onboarding.contracts import EVENT_ID_HEADER, MSG_ID_HEADER
from onboarding.eventbus.deadletters.store import DEAD_LETTER_HEADER
from onboarding.eventbus.erasing import is_erased, ledger_record
from onboarding.eventbus.models import DEAD_LETTER_DATABASE, DeadLetter
from onboarding.eventbus.nats.connection import session
from onboarding.eventbus.subjects import replay_subject


async def _publish_replays(letters: list[DeadLetter], replayed: list[int],
                           copies: list[tuple]) -> None:
    async with session("deadletters-replay", timeout=settings.NATS_REQUEST_TIMEOUT * 2) as nc:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        for letter in letters:
            headers = {k: v for k, v in (letter.headers or {}).items() if k != MSG_ID_HEADER}
            headers[MSG_ID_HEADER] = f"replay-{uuid.uuid4()}"
            if letter.event_id:
                headers.setdefault(EVENT_ID_HEADER, letter.event_id)
            headers[DEAD_LETTER_HEADER] = str(letter.id)
            subject = replay_subject(letter.consumer, letter.subject)
            ack = await js.publish(subject, bytes(letter.payload), headers=headers)
            replayed.append(letter.id)  # acknowledged by JetStream
            # A copy of the user's event: an erasure of the user deletes it too.
            copies.append((letter.user_id, ack.stream, ack.seq, subject, letter.event_id))


def dead_letters_replay(*, letters: list[DeadLetter]) -> int:
    """Send each dead letter back to its own consumer only; return how many were sent.

    Sync (admin actions, management commands). Raises if NATS cannot be reached; letters sent
    before a failure are counted and marked.
    """
    # An erased user's dead letters hold nothing to send, and must bring no one back.
    # The deletion itself is not: a service that failed on it has yet to erase the user.
    letters = [letter for letter in letters
               if not is_erased(key=letter.user_id, event_id=letter.event_id)]
    if not letters:
        return 0
    replayed: list[int] = []
    copies: list[tuple] = []
    try:
        asyncio.run(_publish_replays(letters, replayed, copies))
    finally:
        ledger_record(copies)
        if replayed:
            DeadLetter.objects.using(DEAD_LETTER_DATABASE).filter(id__in=replayed).update(
                replays=F("replays") + 1, replayed_at=timezone.now()
            )
    return len(replayed)

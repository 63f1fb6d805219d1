"""Dead letters: the messages a consumer set aside, kept with why (sending them back to that
consumer is :mod:`.replay`).

A message becomes a dead letter when it breaks the contract (at once, no retry), when it fails
its last allowed delivery, or when it arrives with more deliveries than allowed (the consumer
died handling it, again and again). It is stored *before* the original message is terminated,
so there is no moment at which it exists nowhere.

A replay names its dead letter in ``Dead-Letter-Id``: processing it resolves the dead letter
(:func:`dead_letter_resolve`), failing again updates the same dead letter with the new error
(:func:`dead_letter_store`).
"""

from __future__ import annotations

import json

from django.db.models import QuerySet
from django.utils import timezone

from onboarding.eventbus.erasing import ERASED_MESSAGE, ERASED_PAYLOAD, is_erased
from onboarding.eventbus.models import DEAD_LETTER_DATABASE, DeadLetter

DEAD_LETTER_HEADER = "Dead-Letter-Id"


def dead_letter_id(headers: dict | None) -> int | None:
    """The Dead-Letter-Id a replay carries, if it is one a dead letter could have.

    Anyone can publish this header: str.isdigit() also says yes to "²" and "١", which int()
    refuses (the dead letter then could never be stored, and the message came back for ever).
    """
    value = (headers or {}).get(DEAD_LETTER_HEADER) or ""
    if value.isascii() and value.isdigit() and len(value) <= 18:  # a bigint, and int() takes it
        return int(value)
    return None


def payload_user_id(payload: bytes) -> str:
    """The payload's userId when it is readable, else "" (for a message that broke the contract)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return ""
    if isinstance(data, dict) and isinstance(data.get("userId"), str):
        return data["userId"][:64]
    return ""


def storable(text: str) -> str:
    """``text`` as every database can keep it: PostgreSQL refuses NUL in text and JSONB, and
    no driver encodes a lone surrogate. A message that broke the contract may carry both (in a
    header, in its userId); a dead letter that cannot be stored would come back for ever."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def dead_letter_store(
    *,
    consumer: str,
    subject: str,
    stream: str,
    stream_seq: int,
    event_id: str,
    payload: bytes,
    headers: dict,
    deliveries: int,
    error: BaseException,
) -> DeadLetter:
    """Store the dead letter of one message for one consumer (or refresh the existing one).

    A replayed message that fails again updates the dead letter it was replayed from.
    """
    now = timezone.now()
    fields = {
        "deliveries": deliveries,
        "error_type": type(error).__name__,
        "error_message": storable(str(error)[:10_000]),
        "last_failed_at": now,
        "resolved_at": None,
    }
    letters = DeadLetter.objects.using(DEAD_LETTER_DATABASE)
    letter_id = dead_letter_id(headers)
    if letter_id is not None:
        letter = letters.filter(id=letter_id, consumer=consumer).first()
        if letter is not None:
            for name, value in fields.items():
                setattr(letter, name, value)
            letter.save(using=DEAD_LETTER_DATABASE, update_fields=[*fields])
            return letter
    user_id = storable(payload_user_id(payload))
    if is_erased(key=user_id, event_id=event_id):
        # The user was erased meanwhile (a consumer that was down failed on their older event):
        # what is kept is what an erasure leaves of a dead letter, closed.
        payload = ERASED_PAYLOAD
        fields.update(error_message=ERASED_MESSAGE, discarded_at=now, discarded_by="erasure",
                      discard_reason="its user was erased")
    fields.update(
        subject=storable(subject), user_id=user_id, payload=payload,
        headers={storable(str(k)): storable(str(v)) for k, v in (headers or {}).items()},
    )
    letter, _ = letters.update_or_create(
        consumer=consumer,
        stream=stream,
        stream_seq=stream_seq,
        event_id=storable(event_id[:128]),
        defaults=fields,
        create_defaults={**fields, "first_failed_at": now},
    )
    return letter


def dead_letter_resolve(*, consumer: str, headers: dict) -> int:
    """Mark the dead letter a successfully processed replay came from as resolved."""
    letter_id = dead_letter_id(headers)
    if letter_id is None:
        return 0
    return (
        DeadLetter.objects.using(DEAD_LETTER_DATABASE)
        .filter(id=letter_id, consumer=consumer, resolved_at__isnull=True)
        .update(resolved_at=timezone.now())
    )


def dead_letters_open(*, consumer: str | None = None) -> QuerySet[DeadLetter]:
    """Dead letters still waiting for someone: neither resolved by a replay nor discarded."""
    return dead_letters_list(consumer=consumer)


def dead_letters_list(
    *, consumer: str | None = None, resolved: bool = False, discarded: bool = False
) -> QuerySet[DeadLetter]:
    """Dead letters in id order: the open ones, plus resolved and/or discarded ones if asked."""
    letters = DeadLetter.objects.using(DEAD_LETTER_DATABASE)
    if not resolved:
        letters = letters.filter(resolved_at__isnull=True)
    if not discarded:
        letters = letters.filter(discarded_at__isnull=True)
    if consumer:
        letters = letters.filter(consumer=consumer)
    return letters.order_by("id")


def dead_letters_of_user(*, user_id: str) -> QuerySet[DeadLetter]:
    """Every dead letter whose payload named this user, whatever its state."""
    return DeadLetter.objects.using(DEAD_LETTER_DATABASE).filter(user_id=user_id).order_by("id")


def dead_letter_state(letter: DeadLetter) -> str:
    if letter.discarded_at:
        return "discarded"
    if letter.resolved_at:
        return "resolved"
    return "open"


def dead_letters_discard(*, letters: list[DeadLetter], by: str, reason: str = "") -> int:
    """Give up on open dead letters that no replay can fix; return how many were discarded.

    They are kept (what was lost stays on record) but leave the health check, the default
    lists and replay. One UPDATE; resolved or already discarded ones are left as they are.
    """
    ids = [letter.id for letter in letters]
    if not ids:
        return 0
    return (
        DeadLetter.objects.using(DEAD_LETTER_DATABASE)
        .filter(id__in=ids, resolved_at__isnull=True, discarded_at__isnull=True)
        .update(discarded_at=timezone.now(), discarded_by=by[:150], discard_reason=reason)
    )


def dead_letter_as_dict(letter: DeadLetter) -> dict:
    return {
        "id": letter.id,
        "consumer": letter.consumer,
        "stream": letter.stream,
        "stream_seq": letter.stream_seq,
        "subject": letter.subject,
        "event_id": letter.event_id,
        "user_id": letter.user_id,
        "error": f"{letter.error_type}: {letter.error_message}",
        "error_type": letter.error_type,
        "error_message": letter.error_message,
        "deliveries": letter.deliveries,
        "replays": letter.replays,
        "first_failed_at": letter.first_failed_at.isoformat(),
        "last_failed_at": letter.last_failed_at.isoformat(),
        "resolved_at": letter.resolved_at.isoformat() if letter.resolved_at else None,
        "state": dead_letter_state(letter),
        "discarded_at": letter.discarded_at.isoformat() if letter.discarded_at else None,
        "discarded_by": letter.discarded_by,
        "discard_reason": letter.discard_reason,
        "headers": letter.headers,
        "payload": letter.payload_text,
    }

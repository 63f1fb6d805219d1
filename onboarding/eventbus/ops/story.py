"""One user's story through the flow, per service: for people (``manage.py onboarding_status
--user``, the admin's user page).

It reads the user (accounts), the registration's outbox row, each context's inbox and what its
``DEFAULTS`` selector says exists (:mod:`onboarding.readiness`), the dead letters naming the
user, and each durable's ack floor.
"""

from __future__ import annotations

import uuid

from django.contrib.auth import get_user_model

from onboarding.contracts import UserRegistered
from onboarding.eventbus.deadletters.store import dead_letter_state, dead_letters_of_user
from onboarding.eventbus.models import OUTBOX_DATABASE, OutboxEvent, ProcessedEvent
from onboarding.eventbus.ops.durables import read_durables
from onboarding.eventbus.ops.labels import checked_databases, nats_label
from onboarding.eventbus.registry import get_consumers
from onboarding.readiness import user_readiness


class UserStoryError(Exception):
    """The user id asked about is malformed or unknown: a user error, not a failure."""


def parse_user_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        raise UserStoryError(f"not a user id (a UUID expected): {value!r}") from None


def _registration_events(user_id: uuid.UUID) -> list[OutboxEvent]:
    # The payload is the exact compact JSON published (``UserRegistered.to_json``). A LIKE scan
    # of the outbox: fine for one operator's question, not for a hot path.
    needle = f'"userId":"{user_id}"'
    return list(
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(subject=UserRegistered.subject, payload__contains=needle)
        .order_by("id")
    )


def _durable_passed(durable: dict | None, seq: int | None, published: bool) -> bool | None:
    """Whether the durable has acknowledged the event (None: cannot tell)."""
    if durable is None:
        return None
    if seq is not None:
        return (durable["ack_floor_seq"] or 0) >= seq
    # Sequence unknown (no service has handled the event yet): a published event is in the
    # stream, so a durable with nothing pending and nothing unacknowledged has passed it.
    if published and durable["pending"] == 0 and durable["ack_pending"] == 0:
        return True
    return None


def _record(record, user_id: uuid.UUID) -> dict:
    """A record as the story names it, the same on the admin's user page and in
    ``onboarding_status --user``: its own text (a player's name, "HQ level 1"), unless that text
    only repeats the user's id, which the whole story is about: then its kind and primary key."""
    meta = record._meta
    text = str(record)
    if str(user_id) in text:
        text = f"{meta.verbose_name} #{record.pk}"
    return {"model": meta.label_lower, "name": str(meta.verbose_name), "id": record.pk,
            "text": text}


def _dead_letter_summary(letter) -> dict:
    return {
        "id": letter.id,
        "consumer": letter.consumer,
        "state": dead_letter_state(letter),
        "stream_seq": letter.stream_seq,
        "event_id": letter.event_id,
        "error": f"{letter.error_type}: {letter.error_message}"[:500],
        "deliveries": letter.deliveries,
        "replays": letter.replays,
        "last_failed_at": letter.last_failed_at.isoformat(),
    }


def user_story(*, user_id: str | uuid.UUID) -> dict:
    """What happened to one user's registration, per service.

    Per service: the records that exist (from its ``DEFAULTS`` selector), whether its inbox
    holds the event (and at which stream sequence), whether its durable has passed that
    sequence, and the dead letters about the user. The event's stream sequence comes from the
    inboxes or dead letters that recorded it; while none has, a durable with nothing pending
    has passed every published event, and otherwise "passed" is unknown (None).

    Raises :class:`UserStoryError` for a malformed id, or an id that is neither a user nor in
    any registration event.
    """
    uid = user_id if isinstance(user_id, uuid.UUID) else parse_user_id(user_id)
    user = get_user_model().objects.filter(pk=uid).first()
    events = _registration_events(uid)
    if user is None and not events:
        raise UserStoryError(f"unknown user {uid}: no such user and no registration event")
    event = events[-1] if events else None
    event_id = str(event.event_id) if event else None
    consumers = get_consumers()
    readiness = user_readiness(user_id=uid)
    letters = list(dead_letters_of_user(user_id=str(uid)))

    inbox = {}
    for name, spec in consumers.items():
        row = None
        if event_id:
            row = (
                ProcessedEvent.objects.using(spec.database)
                .filter(consumer=name, event_id=event_id)
                .first()
            )
        inbox[name] = row
    seq, seq_source = None, None
    for name, row in inbox.items():
        if row is not None:
            seq, seq_source = row.stream_seq, f"inbox of {name}"
            break
    else:
        for letter in letters:
            if event_id and letter.event_id == event_id and not letter.subject.startswith(
                "replay."
            ):
                seq, seq_source = letter.stream_seq, f"dead letter #{letter.id}"
                break

    stats, nats_error = read_durables(list(consumers), idle_confirm=0)
    published = bool(event and event.published_at)
    services = {}
    for name in consumers:
        found = readiness.get(name)
        durable = stats.get(name)
        row = inbox[name]
        services[name] = {
            "records": [_record(r, uid) for r in found.records] if found else [],
            "missing": found is None,
            "complete": bool(found and found.complete),
            "inbox": {
                "stream_seq": row.stream_seq, "processed_at": row.processed_at.isoformat()
            } if row else None,
            "durable": None if durable is None else {
                "ack_floor_seq": durable["ack_floor_seq"],
                "delivered_seq": durable["delivered_seq"],
                "pending": durable["pending"],
                "ack_pending": durable["ack_pending"],
                "passed": _durable_passed(durable, seq, published),
            },
            "dead_letters": [_dead_letter_summary(x) for x in letters if x.consumer == name],
        }
    open_letters = any(x["state"] == "open" for s in services.values() for x in s["dead_letters"])
    return {
        "user_id": str(uid),
        "user": {"exists": user is not None,
                 "username": user.get_username() if user is not None else None},
        "event": None if event is None else {
            "event_id": event_id,
            "subject": event.subject,
            "created_at": event.created_at.isoformat(),
            "published_at": event.published_at.isoformat() if event.published_at else None,
            "stream_seq": seq,
            "stream_seq_source": seq_source,
            "other_event_ids": [str(e.event_id) for e in events[:-1]],
        },
        "complete": all(s["complete"] for s in services.values()) and not open_letters,
        "services": services,
        "nats": {"server": nats_label(), "reachable": nats_error is None, "error": nats_error},
        "databases": checked_databases(),
    }

"""One user's story through the flow, per service: for people (``manage.py onboarding_status
--user``, the admin's user page, the admin's erasure page).

A user who registered: it reads the user (accounts), the registration's outbox row, each
context's inbox and what its ``DEFAULTS`` selector says exists (:mod:`onboarding.readiness`),
the dead letters naming the user, and each durable's ack floor.

A user who was deleted (an :class:`~onboarding.eventbus.models.Erasure` names them): the same
per service for the ``user.deleted`` event, with the context's tombstone in place of its
defaults: "erased" once it holds one, else "pending" behind its durable, or "dead-lettered".

Only reads. NATS is read before the databases: a durable acknowledges an event only after the
handler's transaction committed, so a durable seen past the event means its rows (inbox,
tombstone) are visible to the reads that follow. A context database that cannot be reached is
reported in that service's entry (``error``), not raised: the other services' story still
holds.
"""

from __future__ import annotations

import uuid

from django.contrib.auth import get_user_model
from django.db import DatabaseError

from onboarding.contracts import UserDeleted, UserRegistered
from onboarding.eventbus.deadletters.store import dead_letter_state, dead_letters_of_user
from onboarding.eventbus.erasing import tombstoned
from onboarding.eventbus.models import (
    OUTBOX_DATABASE,
    Erasure,
    OutboxEvent,
    ProcessedEvent,
    PublishedMessage,
)
from onboarding.eventbus.ops.durables import read_durables
from onboarding.eventbus.ops.labels import checked_databases, nats_label, unreachable
from onboarding.eventbus.registry import ConsumerSpec, get_services
from onboarding.readiness import onboarding_readiness

# What each service did with a deleted user (``services.<name>.state`` of an erasure story).
ERASED = "erased"  # its tombstone is there: its rows are gone and stay gone
PENDING = "pending"  # the deletion has not reached it yet: behind its durable (or the relay)
DEAD_LETTERED = "dead-lettered"  # its handler failed on the deletion: see the dead letter
NOT_ERASED = "not erased"  # its durable passed the deletion, yet no tombstone is there
NOT_SUBSCRIBED = "not subscribed"  # it does not consume user.deleted: nothing erases it there
UNREACHABLE = "unreachable"  # its database did not answer


class UserStoryError(Exception):
    """The user id asked about is malformed or unknown: a user error, not a failure."""


def parse_user_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value).strip())
    except ValueError:
        raise UserStoryError(f"not a user id (a UUID expected): {value!r}") from None


def _registration_events(user_id: uuid.UUID) -> list[OutboxEvent]:
    # Filed under the user's id (the contract's key). ``key`` has no index by design (every
    # registration would pay for it): a scan of a table that pruning keeps to
    # NATS_DUPLICATE_WINDOW, fine for one operator's question, not for a hot path.
    return list(
        OutboxEvent.objects.using(OUTBOX_DATABASE)
        .filter(key=str(user_id), subject=UserRegistered.subject)
        .order_by("id")
    )


def _durable_passed(durable: dict | None, seq: int | None, published: bool) -> bool | None:
    """Whether the durable has acknowledged the event (None: cannot tell)."""
    if durable is None:
        return None
    if seq is not None:
        return (durable["ack_floor_seq"] or 0) >= seq
    # Sequence unknown (not published yet, or pruned and recorded nowhere): a published event
    # is in the stream, so a durable with nothing pending and nothing unacknowledged has passed
    # it.
    if published and durable["pending"] == 0 and durable["ack_pending"] == 0:
        return True
    return None


def _durable_summary(durable: dict | None, seq: int | None, published: bool) -> dict | None:
    if durable is None:
        return None
    return {
        "ack_floor_seq": durable["ack_floor_seq"],
        "delivered_seq": durable["delivered_seq"],
        "pending": durable["pending"],
        "ack_pending": durable["ack_pending"],
        "passed": _durable_passed(durable, seq, published),
    }


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


def _context_reads(spec: ConsumerSpec, user_id: uuid.UUID, event_id: str | None,
                   *, erased: bool) -> dict:
    """What one context's own database says of the user: its defaults, its inbox row for the
    event, and (``erased``) its tombstone. A database that does not answer gives ``error``."""
    alias = spec.database
    try:
        found = onboarding_readiness(user_ids=[user_id], services=[spec.name]).get(
            spec.name, {}).get(user_id)
        row = None
        if event_id:
            row = (ProcessedEvent.objects.using(alias)
                   .filter(consumer=spec.name, event_id=event_id).first())
        erased_at = None
        if erased:
            erased_at = tombstoned(context=spec.name, user_ids=[user_id], using=alias).get(
                user_id)
    except DatabaseError as exc:
        return {"found": None, "inbox": None, "erased_at": None,
                "error": unreachable(alias, exc)}
    return {"found": found, "inbox": row, "erased_at": erased_at, "error": None}


def _stream_seq(reads: dict, letters: list, event_id: str | None,
                known: tuple[int | None, str | None] = (None, None)):
    """(the event's stream sequence, where it was read), from ``known`` (the outbox's PubAck,
    the ledger), else the first inbox that recorded it, else a dead letter of the original
    message (a replay sits at a sequence of its own)."""
    if known[0] is not None:
        return known
    for name, read in reads.items():
        if read["inbox"] is not None:
            return read["inbox"].stream_seq, f"inbox of {name}"
    for letter in letters:
        if event_id and letter.event_id == event_id and not letter.subject.startswith("replay."):
            return letter.stream_seq, f"dead letter #{letter.id}"
    return None, None


def user_story(*, user_id: str | uuid.UUID) -> dict:
    """What happened to one user, per service: their registration's story, or, once they are
    deleted (an ``Erasure`` names them), their erasure's (:func:`_erasure_story`).

    Both have the same keys: ``user_id``, ``user``, ``erasure`` (None for a registration),
    ``event`` (the registration, or the ``user.deleted`` event), ``complete``, ``services``,
    ``nats``, ``databases``.

    Raises :class:`UserStoryError` for a malformed id, or an id that is neither a user, nor in
    any registration event, nor erased.
    """
    uid = user_id if isinstance(user_id, uuid.UUID) else parse_user_id(user_id)
    user = get_user_model().objects.filter(pk=uid).first()
    erasure = Erasure.objects.using(OUTBOX_DATABASE).filter(key=str(uid)).first()
    if erasure is not None:
        return _erasure_story(uid, user, erasure)
    return _registration_story(uid, user)


def _registration_story(uid: uuid.UUID, user) -> dict:
    """Per service: the records that exist (from its ``DEFAULTS`` selector), whether its inbox
    holds the event (and at which stream sequence), whether its durable has passed that
    sequence, and the dead letters about the user. The event's stream sequence is the PubAck's,
    kept on the outbox row; before it is published, the one an inbox or dead letter recorded
    (a replay); while none has, "passed" is unknown (None)."""
    events = _registration_events(uid)
    if user is None and not events:
        raise UserStoryError(f"unknown user {uid}: no such user and no registration event")
    event = events[-1] if events else None
    event_id = str(event.event_id) if event else None
    consumers = get_services()  # not accounts' own consumer
    stats, nats_error = read_durables(list(consumers), idle_confirm=0)  # first: see the module
    reads = {name: _context_reads(spec, uid, event_id, erased=False)
             for name, spec in consumers.items()}
    letters = list(dead_letters_of_user(user_id=str(uid)))
    pub_ack = (event.stream_seq, "PubAck in the outbox") if event else (None, None)
    seq, seq_source = _stream_seq(reads, letters, event_id, pub_ack)

    published = bool(event and event.published_at)
    services = {}
    for name in consumers:
        read = reads[name]
        found, row = read["found"], read["inbox"]
        services[name] = {
            "records": [_record(r, uid) for r in found.records] if found else [],
            "missing": found is None and read["error"] is None,
            "complete": bool(found and found.complete),
            "inbox": {
                "stream_seq": row.stream_seq, "processed_at": row.processed_at.isoformat()
            } if row else None,
            "durable": _durable_summary(stats.get(name), seq, published),
            "dead_letters": [_dead_letter_summary(x) for x in letters if x.consumer == name],
            "error": read["error"],
        }
    open_letters = any(x["state"] == "open" for s in services.values() for x in s["dead_letters"])
    return {
        "user_id": str(uid),
        "user": {"exists": user is not None,
                 "username": user.get_username() if user is not None else None},
        "erasure": None,
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


def _deletion_event(erasure: Erasure) -> tuple[dict, bool, tuple[int | None, str | None]]:
    """The ``user.deleted`` event of an erasure: (its summary, whether it is published, its
    stream sequence and where it was read). Its outbox row stays until pruning (the relay's
    erasure deletes only the key's earlier rows); pruning files its sequence in the ledger."""
    row = OutboxEvent.objects.using(OUTBOX_DATABASE).filter(event_id=erasure.event_id).first()
    if row is not None and row.stream_seq is not None:
        known = (row.stream_seq, "PubAck in the outbox")
    else:
        ledger = (PublishedMessage.objects.using(OUTBOX_DATABASE)
                  .filter(key=erasure.key, event_id=str(erasure.event_id))
                  .order_by("-id").first())
        known = (ledger.stream_seq, "ledger of published messages") if ledger else (None, None)
    # Pruning deletes only published rows: a row that is gone was published.
    published = row is None or row.published_at is not None
    summary = {
        "event_id": str(erasure.event_id),
        "subject": row.subject if row is not None else UserDeleted.subject,
        "created_at": row.created_at.isoformat() if row is not None else None,
        "published_at": (row.published_at.isoformat() if row is not None and row.published_at
                         else None),
        "published": published,
        "in_outbox": row is not None,
        "set_aside": bool(row is not None and row.set_aside_at),
    }
    return summary, published, known


def _erasure_state(spec: ConsumerSpec, read: dict, durable: dict | None,
                   letter: dict | None) -> str:
    if read["error"]:
        return UNREACHABLE
    if read["erased_at"] is not None:
        return ERASED
    if spec.handler_for(UserDeleted.subject) is None:
        return NOT_SUBSCRIBED
    if letter is not None and letter["state"] != "resolved":
        return DEAD_LETTERED
    if durable is not None and durable["passed"] is True:
        return NOT_ERASED
    return PENDING


def _erasure_story(uid: uuid.UUID, user, erasure: Erasure) -> dict:
    """A deleted user: when the deletion was asked, whether the relay erased the stream's copies
    of their earlier events, and per service whether it erased them (its tombstone, with when),
    or is still behind the ``user.deleted`` event (its durable's ack floor below the event's
    stream sequence; the relay, while the event waits in the outbox), or failed on it (a dead
    letter). Complete once the stream and every service are erased."""
    event_id = str(erasure.event_id)
    event, published, known = _deletion_event(erasure)
    consumers = get_services()  # not accounts' own consumer
    stats, nats_error = read_durables(list(consumers), idle_confirm=0)  # first: see the module
    reads = {name: _context_reads(spec, uid, event_id, erased=True)
             for name, spec in consumers.items()}
    letters = list(dead_letters_of_user(user_id=str(uid)))
    seq, seq_source = _stream_seq(reads, letters, event_id, known)
    event.update(stream_seq=seq, stream_seq_source=seq_source)

    services = {}
    for name, spec in consumers.items():
        read = reads[name]
        found, row = read["found"], read["inbox"]
        durable = _durable_summary(stats.get(name), seq, published)
        mine = [_dead_letter_summary(x) for x in letters if x.consumer == name]
        deletion_letter = next((x for x in mine if x["event_id"] == event_id), None)
        state = _erasure_state(spec, read, durable, deletion_letter)
        services[name] = {
            "state": state,
            "erased_at": read["erased_at"].isoformat() if read["erased_at"] else None,
            # What it still holds of the user (nothing, once erased).
            "records": [_record(r, uid) for r in found.records] if found else [],
            "inbox": {
                "stream_seq": row.stream_seq, "processed_at": row.processed_at.isoformat()
            } if row else None,
            "durable": durable,
            "dead_letters": mine,
            "error": read["error"],
        }
    stream_erased = erasure.stream_erased_at is not None
    return {
        "user_id": str(uid),
        "user": {"exists": user is not None,
                 "username": user.get_username() if user is not None else None},
        "erasure": {
            "requested_at": erasure.requested_at.isoformat(),
            "event_id": event_id,
            "stream": {
                "erased": stream_erased,
                "erased_at": erasure.stream_erased_at.isoformat() if stream_erased else None,
                "messages_deleted": erasure.messages_deleted,
                # What it waits for: the relay publishes the deletion, then deletes the
                # messages of the user's earlier events by sequence (outbox.erasure).
                "pending": None if stream_erased else "relay",
            },
            "erased_everywhere": all(s["state"] == ERASED for s in services.values()),
        },
        "event": event,
        "complete": stream_erased and all(s["state"] == ERASED for s in services.values()),
        "services": services,
        "nats": {"server": nats_label(), "reachable": nats_error is None, "error": nats_error},
        "databases": checked_databases(),
    }

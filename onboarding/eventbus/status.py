"""The health of the event flow, and one user's story through it: for people
(``manage.py onboarding_status [--user ID]``, the admin) and for probes (the exit code).

Everything here only *reads*: each durable's ``consumer_info`` (the monitoring role's one
permission), the outbox and the dead letters (default database), the inboxes (each context's
database) and, for a user, what each context's ``DEFAULTS`` selector says exists
(:mod:`onboarding.readiness`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from urllib.parse import quote

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Count
from django.utils import timezone

from onboarding.contracts import UserRegistered
from onboarding.eventbus.connection import NatsAccessError, display_url
from onboarding.eventbus.deadletters import (
    dead_letter_state,
    dead_letters_list,
    dead_letters_of_user,
    dead_letters_open,
)
from onboarding.eventbus.models import OutboxEvent, ProcessedEvent
from onboarding.eventbus.outbox import OUTBOX_DATABASE, outbox_backlog, outbox_set_aside_count
from onboarding.eventbus.registry import get_consumers
from onboarding.readiness import user_readiness

# Defaults of the health thresholds (each is a flag of ``onboarding_status``).
MAX_OUTBOX_AGE = 60.0
MAX_DEAD_LETTERS = 0
# How long to wait before reading a durable again to confirm that nobody pulls from it.
IDLE_CONFIRM = 1.0
# How long events may sit delivered but unacknowledged, with no client pulling, before the
# durable counts as stuck (its consumer died holding them, or is stuck in an outage).
MAX_UNACKED_AGE = 60.0


class UserStoryError(Exception):
    """The user id asked about is malformed or unknown: a user error, not a failure."""


# -- where we looked --------------------------------------------------------------------------


def database_label(alias: str) -> str:
    """A database as a URL fit for output: engine, host and name, never the password."""
    config = settings.DATABASES[alias]
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    user = quote(config.get("USER") or "")
    host = f"{config.get('HOST') or 'localhost'}:{config.get('PORT') or 5432}"
    return f"postgres://{user + '@' if user else ''}{host}/{config['NAME']}"


def checked_databases() -> dict[str, str]:
    """Each database alias this module reads, once: the default (outbox, dead letters) and
    every context's (its inbox, its defaults)."""
    aliases = [OUTBOX_DATABASE, *(spec.database for spec in get_consumers().values())]
    return {alias: database_label(alias) for alias in dict.fromkeys(aliases)}


def nats_label() -> str:
    try:
        return display_url()
    except NatsAccessError as exc:  # NATS_URL empty: say so rather than fail to report
        return f"({exc})"


# -- durables ---------------------------------------------------------------------------------


def _seq(sequence_info, field: str = "stream_seq") -> int | None:
    return getattr(sequence_info, field, None) if sequence_info is not None else None


def _durable_entry(info) -> dict:
    delivered = info.delivered
    # The durable's last activity: its last delivery or its last ack, whichever is later.
    times = [getattr(x, "last_active", None) for x in (delivered, info.ack_floor)]
    last_active = max((t for t in times if t is not None), default=None)
    return {
        "pending": info.num_pending,
        "ack_pending": info.num_ack_pending,
        "redelivered": info.num_redelivered,
        "waiting": info.num_waiting,
        "delivered_seq": _seq(delivered),
        "ack_floor_seq": _seq(info.ack_floor),
        "last_active": last_active.isoformat() if last_active else None,
    }


def _looks_idle(entry: dict) -> bool:
    """Events wait, yet no pull request is open and nothing is in a client's hands."""
    return entry["pending"] > 0 and entry["waiting"] == 0 and entry["ack_pending"] == 0


async def _read_durables(js, names: list[str]) -> dict[str, dict | None]:
    from nats.js.errors import NotFoundError

    found: dict[str, dict | None] = {}
    for name in names:
        try:
            found[name] = _durable_entry(await js.consumer_info(settings.NATS_STREAM, name))
        except NotFoundError:
            found[name] = None
    return found


async def _durable_stats(names: list[str], *, idle_confirm: float) -> dict[str, dict | None]:
    """Each durable's figures, with ``stalled``: events pending and no client pulling.

    A running consumer always has a pull request open (``num_waiting`` > 0: its fetch waits up
    to a second) or a batch in hand (``num_ack_pending`` > 0), except for the instant between
    acking a batch and fetching the next. So a durable that looks idle is read again after
    ``idle_confirm`` seconds, and called stalled only if it still looks idle and its delivered
    sequence has not moved: a live consumer cannot stay in that instant for a second, while a
    stopped one stays there for ever. Only suspects are read twice, so a healthy check costs
    one read per durable.
    """
    from onboarding.eventbus.connection import session

    async with session("onboarding-status", timeout=settings.NATS_REQUEST_TIMEOUT * 2) as nc:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        stats = await _read_durables(js, names)
        suspects = [n for n, entry in stats.items() if entry is not None and _looks_idle(entry)]
        if suspects and idle_confirm > 0:
            await asyncio.sleep(idle_confirm)
            again = await _read_durables(js, suspects)
            for name in suspects:
                before, now = stats[name], again[name]
                if now is None:
                    stats[name] = None  # deleted in between: reported as missing
                    continue
                now["stalled"] = _looks_idle(now) and now["delivered_seq"] == before[
                    "delivered_seq"
                ]
                stats[name] = now
        for entry in stats.values():
            if entry is not None:
                entry.setdefault("stalled", bool(idle_confirm <= 0 and _looks_idle(entry)))
        return stats


def _read_nats(names: list[str], *, idle_confirm: float) -> tuple[dict, str | None]:
    """(stats per durable, or all None; the error that kept NATS from answering, or None)."""
    try:
        return asyncio.run(_durable_stats(names, idle_confirm=idle_confirm)), None
    except NatsAccessError as exc:
        return dict.fromkeys(names), str(exc)
    except Exception as exc:
        return dict.fromkeys(names), (
            f"NATS unreachable at {nats_label()}: {type(exc).__name__}: {exc}"
        )


# -- the flow's health ------------------------------------------------------------------------


def _stuck(entry: dict, max_unacked_age: float) -> bool:
    if not (entry["ack_pending"] > 0 and entry["waiting"] == 0):
        return False
    if entry["last_active"] is None:
        return True
    quiet = (timezone.now() - dt.datetime.fromisoformat(entry["last_active"])).total_seconds()
    return quiet > max_unacked_age


def onboarding_status(
    *,
    max_outbox_age: float = MAX_OUTBOX_AGE,
    max_pending: int | None = None,
    max_dead_letters: int = MAX_DEAD_LETTERS,
    idle_confirm: float = IDLE_CONFIRM,
    max_unacked_age: float = MAX_UNACKED_AGE,
    count_processed: bool = False,
) -> dict:
    """Collect per-consumer and outbox figures and decide whether the flow is healthy.

    Unhealthy: NATS unreachable or refusing; a durable missing; a durable with events pending
    and no client pulling (see :func:`_durable_stats`); a durable whose events have sat
    delivered but unacknowledged, with no client pulling, for more than ``max_unacked_age``
    seconds (JetStream counts a dead client's messages as ack-pending until some client
    pulls again, so rule one alone would miss a consumer killed with a batch in hand); more
    than ``max_dead_letters`` open dead letters of a consumer (discarded ones do not count);
    the oldest unpublished outbox event older than ``max_outbox_age`` seconds; any outbox
    event the relay set aside (JetStream refused it every attempt); with
    ``max_pending``, a consumer lagging by more. ``count_processed`` adds each inbox's row
    count (a COUNT per context database).
    """
    consumers_by_name = get_consumers()
    names = list(consumers_by_name)
    problems: list[str] = []
    stats, nats_error = _read_nats(names, idle_confirm=idle_confirm)
    if nats_error:
        problems.append(nats_error)
    dead = dict(
        # order_by(): the list's id order would otherwise join the GROUP BY (one group a row).
        dead_letters_open().order_by().values("consumer").annotate(n=Count("id"))
        .values_list("consumer", "n")
    )
    discarded = dict(
        dead_letters_list(discarded=True, resolved=True).filter(discarded_at__isnull=False)
        .order_by().values("consumer").annotate(n=Count("id")).values_list("consumer", "n")
    )
    consumers = {}
    for name in names:
        entry = dict(stats.get(name) or {})
        entry["dead_letters"] = dead.get(name, 0)
        entry["discarded_dead_letters"] = discarded.get(name, 0)
        entry["durable"] = "unknown" if nats_error else (
            "missing" if stats.get(name) is None else "present"
        )
        entry["database"] = consumers_by_name[name].database
        if count_processed:
            entry["processed"] = (
                ProcessedEvent.objects.using(entry["database"]).filter(consumer=name).count()
            )
        consumers[name] = entry
        if entry["durable"] == "missing":
            problems.append(f"consumer {name}: durable missing (run manage.py setup_jetstream)")
        if entry.get("stalled"):
            problems.append(
                f"consumer {name}: {entry['pending']} event(s) pending and no client pulling "
                f"(is `manage.py consume {name}` running?)"
            )
        if entry["dead_letters"] > max_dead_letters:
            problems.append(
                f"consumer {name}: {entry['dead_letters']} open dead letter(s) "
                f"(manage.py deadletters list --consumer {name})"
            )
        entry["stuck"] = entry.get("pending") is not None and _stuck(entry, max_unacked_age)
        if entry["stuck"]:
            problems.append(
                f"consumer {name}: {entry['ack_pending']} event(s) delivered but unacknowledged "
                f"for over {max_unacked_age:g}s and no client pulling (its consumer died "
                "holding them, or is stuck in a database outage)"
            )
        if max_pending is not None and entry.get("pending", 0) > max_pending:
            problems.append(f"consumer {name}: {entry['pending']} pending > {max_pending}")
    backlog, oldest = outbox_backlog()
    age = (timezone.now() - oldest).total_seconds() if oldest else None
    if age is not None and age > max_outbox_age:
        problems.append(
            f"outbox: oldest unpublished event is {age:.0f}s old (> {max_outbox_age:g}s; "
            "is `manage.py outbox_relay` running?)"
        )
    set_aside = outbox_set_aside_count()
    if set_aside:
        problems.append(
            f"outbox: {set_aside} event(s) set aside after JetStream refused them "
            f"{settings.OUTBOX_MAX_ATTEMPTS} time(s) (admin: Outbox events, state \"Set aside\": "
            "fix the cause, then requeue them)"
        )
    return {
        "healthy": not problems,
        "problems": problems,
        "consumers": consumers,
        "outbox": {"backlog": backlog, "oldest_age_seconds": age, "set_aside": set_aside},
        "nats": {"server": nats_label(), "stream": settings.NATS_STREAM,
                 "reachable": nats_error is None},
        "databases": checked_databases(),
        "thresholds": {
            "max_outbox_age": max_outbox_age, "max_pending": max_pending,
            "max_dead_letters": max_dead_letters, "idle_confirm": idle_confirm,
            "max_unacked_age": max_unacked_age,
        },
    }


# -- one user's story -------------------------------------------------------------------------


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


def _record(record) -> dict:
    meta = record._meta
    return {"model": meta.label_lower, "name": str(meta.verbose_name), "id": record.pk,
            "text": str(record)}


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

    stats, nats_error = _read_nats(list(consumers), idle_confirm=0)
    published = bool(event and event.published_at)
    services = {}
    for name in consumers:
        found = readiness.get(name)
        durable = stats.get(name)
        row = inbox[name]
        services[name] = {
            "records": [_record(r) for r in found.records] if found else [],
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

"""The health of the event flow: for people (``manage.py onboarding_status``, the admin's Event
flow page) and for probes (the exit code).

Everything here only *reads*: each durable's ``consumer_info`` (the monitoring role's one
permission), the outbox and the dead letters (default database) and, to count them, the
inboxes (each context's database). One user's story is :mod:`.story`.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count
from django.utils import timezone

from onboarding.eventbus.deadletters.store import dead_letters_list, dead_letters_open
from onboarding.eventbus.models import ProcessedEvent
from onboarding.eventbus.ops.durables import read_durables
from onboarding.eventbus.ops.labels import checked_databases, nats_label, unreachable
from onboarding.eventbus.outbox.announcer import announcements_backlog
from onboarding.eventbus.outbox.store import outbox_backlog, outbox_set_aside_count
from onboarding.eventbus.registry import get_consumers

# Defaults of the health thresholds (each is a flag of ``onboarding_status``).
MAX_OUTBOX_AGE = 60.0
MAX_DEAD_LETTERS = 0
# How long to wait before reading a durable again to confirm that nobody pulls from it.
IDLE_CONFIRM = 1.0
# How long events may sit delivered but unacknowledged, with no client pulling, before the
# durable counts as stuck (its consumer died holding them, or is stuck in an outage).
MAX_UNACKED_AGE = 60.0



def _stuck(entry: dict, max_unacked_age: float) -> bool:
    if not (entry["ack_pending"] > 0 and entry["waiting"] == 0):
        return False
    if entry["last_active"] is None:
        return True
    quiet = (timezone.now() - dt.datetime.fromisoformat(entry["last_active"])).total_seconds()
    return quiet > max_unacked_age


def _announcements(entry: dict, context: str, max_age: float) -> str | None:
    """Put ``context``'s unpublished announcements in its ``entry``; the problem, if any."""
    try:
        waiting, oldest = announcements_backlog(context=context)
    except DatabaseError as exc:
        entry["announcements"] = {"backlog": None, "oldest_age_seconds": None}
        return f"consumer {context}: announcements not read: {unreachable(entry['database'], exc)}"
    age = (timezone.now() - oldest).total_seconds() if oldest else None
    entry["announcements"] = {"backlog": waiting, "oldest_age_seconds": age}
    if age is not None and age > max_age:
        return (f"consumer {context}: oldest unpublished announcement is {age:.0f}s old "
                f"(> {max_age:g}s; is `manage.py consume {context}` running, and may it publish "
                f"user.onboarded.{context}?); users' readiness waits for it")
    return None


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
    and no client pulling (see :mod:`.durables`); a durable whose events have sat
    delivered but unacknowledged, with no client pulling, for more than ``max_unacked_age``
    seconds (JetStream counts a dead client's messages as ack-pending until some client
    pulls again, so rule one alone would miss a consumer killed with a batch in hand); more
    than ``max_dead_letters`` open dead letters of a consumer (discarded ones do not count);
    the oldest unpublished outbox event older than ``max_outbox_age`` seconds; any outbox
    event the relay set aside (JetStream refused it every attempt); a context's oldest
    unpublished announcement older than ``max_outbox_age`` (its ``consume`` process publishes
    them: the client's readiness waits for them), or its database unreachable; with
    ``max_pending``, a consumer lagging by more. ``count_processed`` adds each inbox's row
    count (a COUNT per context database).
    """
    consumers_by_name = get_consumers()
    names = list(consumers_by_name)
    problems: list[str] = []
    stats, nats_error = read_durables(names, idle_confirm=idle_confirm)
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
            try:
                entry["processed"] = (
                    ProcessedEvent.objects.using(entry["database"]).filter(consumer=name).count()
                )
            except DatabaseError as exc:  # the web may not hold this database: said, not a 500
                entry["processed"] = None
                problems.append(f"consumer {name}: inbox not read: "
                                f"{unreachable(entry['database'], exc)}")
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
        if name in settings.BOUNDED_CONTEXTS:  # a context announces what it did (announcing.py)
            problem = _announcements(entry, name, max_outbox_age)
            if problem:
                problems.append(problem)
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

"""The inbox: each event applied once per consumer, in the stream's order, or not at all.

Synchronous ORM code, run on a consumer's worker thread (worker.py) and testable without NATS:
:func:`process_events` takes parsed events (:class:`Incoming`) and, in one transaction on the
context's own database, claims them in the inbox (``ProcessedEvent``) and runs the handlers on
those it did not hold yet.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from django.db import connections, transaction

from onboarding.contracts import UserRegistered
from onboarding.eventbus.announcing import announce_onboarded
from onboarding.eventbus.consumer.failures import Abandoned, PermanentError
from onboarding.eventbus.models import ProcessedEvent
from onboarding.eventbus.registry import ConsumerSpec
from onboarding.eventbus.rows import insert_ignoring_conflicts


@dataclass(frozen=True)
class Incoming:
    """A parsed message, ready for its handler."""

    event: object
    event_id: str
    subject: str
    stream_seq: int
    meta: object = field(default=None, compare=False, repr=False)  # its JetStream metadata


class CommitGate:
    """Settles the race between a transaction reaching its commit and the runner giving up on it.

    Exactly one of :meth:`commit` (the worker thread, at the end of the transaction) and
    :meth:`abandon` (the event loop, when the batch's time is up) wins. A transaction that loses
    rolls back; a runner that loses waits for the commit, which is already under way.

    ``began`` tells the runner where the time went: False, the database never let the
    transaction begin (connecting, or SQLite's write lock held elsewhere: maybe an outage, worth
    a probe); True, it began, and the handlers took the time (on SQLite this thread then holds
    the write lock itself, so a probe would only find its own lock).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "running"
        self.began = False

    def commit(self) -> bool:
        """The transaction is about to commit: True unless the runner gave up on it first."""
        return self._claim("committing", unless="abandoned")

    def abandon(self) -> bool:
        """The runner gives up: True unless the transaction is committing already."""
        return self._claim("abandoned", unless="committing")

    def _claim(self, state: str, *, unless: str) -> bool:
        with self._lock:
            if self._state == unless:
                return False
            self._state = state
            return True


def process_events(
    spec: ConsumerSpec, items: list[Incoming], *, gate: CommitGate | None = None
) -> list[bool]:
    """Apply events exactly once for ``spec``, in one transaction; True for each one applied.

    The inbox rows and the handlers' rows commit together in the context's own database, so
    after any crash either both exist or neither does. Events already in the inbox, and
    repeats within ``items``, are skipped. The rest reach their handlers in the order of
    ``items`` (the stream's) for each key (a user), in as few calls as that allows
    (:func:`handler_runs`): never B's registration after its deletion.

    With a ``gate``, the transaction commits only if the runner has not given up on it
    (:class:`CommitGate`); otherwise it rolls back with :class:`Abandoned`.
    """
    alias = spec.database
    with transaction.atomic(using=alias):
        if gate is not None:
            gate.began = True
        distinct = {item.event_id: item for item in reversed(items)}  # the first of each id
        unclaimed = inbox_claim(alias, spec.name, list(distinct.values()))
        applied, fresh = [], []
        for item in items:
            is_new = item.event_id in unclaimed
            unclaimed.discard(item.event_id)  # a repeat within the batch is not new
            applied.append(is_new)
            if is_new:
                fresh.append(item)
        registered = []
        for subject, run in handler_runs(fresh):
            handler = spec.handler_for(subject)
            if handler is None:
                raise PermanentError(f"consumer {spec.name} has no handler for {subject}")
            handler([item.event for item in run])
            if subject == UserRegistered.subject:
                registered += [item.event.user_id for item in run]
        if registered and spec.defaults is not None:
            # A context that sets users up tells so, in this transaction: its handler returned,
            # so the users' defaults exist (accounts' readiness projection, announcing.py).
            announce_onboarded(context=spec.name, user_ids=registered)
        if gate is not None and not gate.commit():
            raise Abandoned(f"consumer {spec.name}: the runner gave up on this transaction")
    return applied


def handler_runs(items: list[Incoming]) -> list[tuple[str, list[Incoming]]]:
    """The handler calls for ``items``, as ``(subject, items)``: each key's (user's) events in
    stream order, in as few calls as that order allows.

    Events of different keys commute (every handler's rows are keyed by the user), so only a
    key's own changes of subject force a new call: an event goes to phase *n*, where *n* counts
    the changes of subject among its key's earlier events in ``items``, and each phase makes one
    call per subject. A mixed batch of 100 events of 100 users is one call per subject, where
    cutting at every change of subject in the batch made dozens (measured: the mixed drain ran at
    40% of the registrations' rate). ``[deleted(A), registered(B), deleted(B)]`` is still three
    calls: deleted [A] and registered [B], then deleted [B]. An event without a ``key`` keeps the
    stricter order: a new call at every change of subject in the batch.
    """
    keys = [getattr(item.event, "key", None) for item in items]
    # What a subscription names: a subject, or a pattern (``user.onboarded.*``) whose subjects
    # one handler takes together (one service's announcement and another's commute).
    kinds = [getattr(item.event, "subject", item.subject) for item in items]
    if None in keys:
        return [(kind, [item for item, _ in run]) for kind, run in itertools.groupby(
            zip(items, kinds, strict=True), key=lambda pair: pair[1])]
    phases: list[dict[str, list[Incoming]]] = []
    last: dict[str, tuple[int, str]] = {}  # key -> (its phase, its kind) so far
    for item, key, kind in zip(items, keys, kinds, strict=True):
        phase, before = last.get(key, (-1, None))
        if before != kind:
            phase += 1
        last[key] = (phase, kind)
        if phase == len(phases):
            phases.append({})
        phases[phase].setdefault(kind, []).append(item)
    runs: list[tuple[str, list[Incoming]]] = []
    for phase in phases:
        for subject, run in phase.items():
            if runs and runs[-1][0] == subject:
                # The last call of one phase and the first of the next share a subject: one
                # call. Every key in the later phase had its earlier events in earlier calls.
                runs[-1][1].extend(run)
            else:
                runs.append((subject, run))
    return runs


INBOX_CHUNK = 500  # rows per inbox statement: 2,500 parameters


def inbox_claim(alias: str, consumer: str, items: list[Incoming]) -> set[str]:
    """Record ``items`` (distinct event ids) in the inbox; return the ids it did not hold yet.

    One statement, ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, instead of a read and then a
    write: half the round trips of a batch's bookkeeping. A concurrent delivery of the same event
    waits on the unique index until this transaction ends, then finds the row and skips it
    (under READ COMMITTED, Django's default). Rows are claimed in event-id order, so two
    overlapping deliveries lock them in the same order and cannot deadlock. Chunks keep any
    configured batch within every engine's limit on query parameters.
    """
    connection = connections[alias]
    claim = _claim_returning if _returning_supported(connection) else _claim_read_then_write
    items = sorted(items, key=lambda item: item.event_id)
    claimed = set()
    for start in range(0, len(items), INBOX_CHUNK):
        claimed |= claim(connection, alias, consumer, items[start : start + INBOX_CHUNK])
    return claimed


def _claim_returning(connection, alias: str, consumer: str, items: list[Incoming]) -> set[str]:
    return set(insert_ignoring_conflicts(
        ProcessedEvent, ("event_id", "subject", "stream_seq"),
        [(item.event_id, item.subject, item.stream_seq) for item in items],
        same={"consumer": consumer}, using=alias, returning="event_id",
    ))


def _claim_read_then_write(connection, alias: str, consumer: str, items: list[Incoming]):
    """SQLite before 3.35 has no RETURNING: read which ids the inbox holds, then insert the rest."""
    inbox = ProcessedEvent.objects.using(alias)
    seen = set(
        inbox.filter(consumer=consumer, event_id__in=[i.event_id for i in items])
        .values_list("event_id", flat=True)
    )
    fresh = [i for i in items if i.event_id not in seen]
    inbox.bulk_create(
        ProcessedEvent(consumer=consumer, event_id=i.event_id, subject=i.subject,
                       stream_seq=i.stream_seq)
        for i in fresh
    )
    return {i.event_id for i in fresh}


def _returning_supported(connection) -> bool:
    return connection.features.can_return_rows_from_bulk_insert

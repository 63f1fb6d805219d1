"""The consumers' failure policy: what went wrong, and what it calls for.

A consumer (``handling.py``, ``settling.py``) asks these questions of every failed delivery,
in one place each:

- is it *permanent* (a retry cannot fix it)? dead letter at once;
- could it mean the database is down (:func:`worth_a_probe`)? if :func:`database_probe` fails
  too, it is an outage: the messages stay in hand and no delivery is spent;
- did it *time out* (:func:`is_timeout`: the transaction outlived ``CONSUMER_BATCH_TIMEOUT``,
  or the database cancelled one of its statements: ``statement_timeout``, ``lock_timeout``,
  SQLite's busy timeout)? its messages, the whole batch, are handed back with a delay;
- anything else: nak with :func:`retry_delay`, dead letter at the last allowed delivery;
- has the message *come back too often* without being settled (:func:`crash_loop`)? dead letter
  without running the handler again.

What makes a hung database call return at all, the PostgreSQL session timeouts of the
consumers' connections, is :mod:`.timeouts`.
"""

from __future__ import annotations

from django.conf import settings
from django.db import DataError, InterfaceError, OperationalError, connections, transaction

from onboarding.contracts import ContractError


class PermanentError(Exception):
    """Raised by a handler for an event that can never succeed: dead-lettered at once."""


class MaxDeliveriesExceeded(Exception):
    """The message arrived more often than allowed without being settled."""


class HandlerTimeout(Exception):
    """A transaction outlived ``CONSUMER_BATCH_TIMEOUT``: the runner stopped waiting for it.

    ``began``: whether the database had let it begin (see ``inbox.CommitGate``).
    """

    def __init__(self, message: str, *, began: bool) -> None:
        super().__init__(message)
        self.began = began


class Abandoned(Exception):
    """Raised on the worker thread, at commit, by a transaction the runner gave up on: it rolls
    back, because its messages were already handed back to be delivered again."""


# A message delivered this many times CONSUMER_MAX_DELIVER without ever being settled (acked,
# nak'ed or dead-lettered) keeps killing its consumer: it is dead-lettered without running the
# handler again. Deliveries also count restarts and hand-backs on stop, hence the margin; a
# handler that merely fails is dead-lettered after CONSUMER_MAX_DELIVER attempts.
CRASH_LOOP_FACTOR = 3

# Failures a retry cannot fix.
PERMANENT_ERRORS = (ContractError, PermanentError, DataError)
# Failures that may mean the database is unreachable (confirmed by a probe).
DATABASE_ERRORS = (OperationalError, InterfaceError)
# PostgreSQL's query_canceled (statement_timeout) and lock_not_available (lock_timeout).
_TIMEOUT_SQLSTATES = {"57014", "55P03"}

# A probe must answer "is the database there now?" quickly: on SQLite it waits at most this long
# for the write lock, not the 20 s busy timeout of ordinary work. A probe that fails because a
# neighbour held the lock a moment longer costs only a short pause (the outage path spends no
# delivery); one that waited 20 s would let a long lock pass for a healthy database.
PROBE_BUSY_TIMEOUT_MS = 1000


def dead_letter_reason(error: BaseException) -> str:
    """The ``reason`` label of a dead letter: why retrying stopped."""
    if isinstance(error, MaxDeliveriesExceeded):
        return "crash_loop"
    return "permanent" if isinstance(error, PERMANENT_ERRORS) else "max_deliver"


def retry_delay(delivery: int) -> float:
    """nak delay after failed delivery number ``delivery`` (1-based): doubling, capped."""
    base, cap = settings.CONSUMER_RETRY_BASE_DELAY, settings.CONSUMER_RETRY_MAX_DELAY
    return min(base * 2 ** (delivery - 1), cap)


def crash_loop(delivery: int) -> MaxDeliveriesExceeded | None:
    """The error to dead-letter a message with that came back too often unsettled, else None."""
    if delivery <= settings.CONSUMER_MAX_DELIVER * CRASH_LOOP_FACTOR:
        return None
    return MaxDeliveriesExceeded(
        f"delivered {delivery} times without being settled; the consumer keeps dying while "
        "handling it"
    )


def is_timeout(error: BaseException) -> bool:
    """True for a transaction that took too long rather than one that failed on its own."""
    if isinstance(error, HandlerTimeout):
        return True
    if not isinstance(error, OperationalError):
        return False
    cause = error.__cause__
    if getattr(cause, "sqlstate", None) in _TIMEOUT_SQLSTATES:
        return True
    return "database is locked" in str(error)  # SQLite: the busy timeout ran out


def worth_a_probe(error: BaseException) -> bool:
    """Could ``error`` mean the database is down? Then a probe decides between an outage and
    this delivery's failure. A transaction that began and then ran out of time was let in by
    the database: its handlers took the time."""
    if isinstance(error, HandlerTimeout):
        return not error.began
    return isinstance(error, DATABASE_ERRORS)


def database_probe(alias: str) -> None:
    """Raise unless ``alias`` accepts a write transaction now.

    On SQLite the transaction begins IMMEDIATE, so it also fails while another process holds
    the write lock — a read would still succeed then, and prove nothing. Runs on a thread of its
    own (see worker.py), so it answers even while the consumer's worker thread is blocked.
    """
    connection = connections[alias]
    try:
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute(f"PRAGMA busy_timeout = {PROBE_BUSY_TIMEOUT_MS}")
        with transaction.atomic(using=alias), connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        # A fresh connection each time: probes are rare, and connecting is what an outage breaks.
        connection.close()

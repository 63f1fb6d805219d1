"""The consumers' failure policy: what went wrong, and what it calls for.

The runner (``runner.py``) asks these questions of every failed delivery, in one place each:

- is it *permanent* (a retry cannot fix it)? dead letter at once;
- is the database down (a database error, and :func:`database_probe` fails too)? an outage
  keeps the messages in hand and spends no delivery;
- anything else: nak with :func:`retry_delay`, dead letter at the last allowed delivery;
- has the message *come back too often* without being settled (:func:`crash_loop`)? dead letter
  without running the handler again.
"""

from __future__ import annotations

from django.conf import settings
from django.db import DataError, InterfaceError, OperationalError, connections, transaction

from onboarding.contracts import ContractError


class PermanentError(Exception):
    """Raised by a handler for an event that can never succeed: dead-lettered at once."""


class MaxDeliveriesExceeded(Exception):
    """The message arrived more often than allowed without being settled."""


# A message delivered this many times CONSUMER_MAX_DELIVER without ever being settled (acked,
# nak'ed or dead-lettered) keeps killing its consumer: it is dead-lettered without running the
# handler again. Deliveries also count restarts and hand-backs on stop, hence the margin; a
# handler that merely fails is dead-lettered after CONSUMER_MAX_DELIVER attempts.
CRASH_LOOP_FACTOR = 3

# Failures a retry cannot fix.
PERMANENT_ERRORS = (ContractError, PermanentError, DataError)
# Failures that may mean the database is unreachable (confirmed by a probe).
DATABASE_ERRORS = (OperationalError, InterfaceError)


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


def database_probe(alias: str) -> None:
    """Raise unless ``alias`` accepts a write transaction now.

    On SQLite the transaction begins IMMEDIATE, so it also fails while another process holds
    the write lock — a read would still succeed then, and prove nothing.
    """
    with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")

"""Hints that wake the relay (a ``NOTIFY``, a datagram), sent once the response is out.

In a request, the hints wait until its response has been sent (Django's ``request_finished``).
Sent at the commit, they would wake the relay — and, for a ``NOTIFY``, cost a round trip —
while the request still writes its response: on a machine whose cores the relay and
nats-server share with the web workers, the woken relay takes the core the response needs. The
event leaves a few hundred microseconds later; the client has its 201 that much sooner.

A hint that fails is logged, never raised: the relay's scan publishes the row after its grace
period.
"""

from __future__ import annotations

import logging
import threading

from django.core.signals import request_finished, request_started
from django.db import close_old_connections

logger = logging.getLogger(__name__)

_request = threading.local()


def after_response(fn, *args) -> None:
    """Call ``fn(*args)`` once the current request's response has been sent (Django's
    ``request_finished``), or at once outside a request (a command, a consumer, a test)."""
    pending = getattr(_request, "pending", None)
    if pending is None:
        fn(*args)
    else:
        pending.append((fn, args))


def _flush_after_response(**kwargs) -> None:
    pending, _request.pending = getattr(_request, "pending", None), None
    for fn, args in pending or ():
        try:
            fn(*args)
        except Exception:  # a hint: the relay's scan makes up for it
            logger.warning("waking the relay failed; its scan publishes the event",
                           exc_info=True)
    if pending:
        # Django ended the request's connections before this ran (its receiver comes first);
        # a NOTIFY took one again. Ended the same way, or a pooled connection would stay with
        # this thread until its next request (with gthread workers, idle threads emptied the
        # pool: tests/test_pool.py).
        close_old_connections()


def _start_request(**kwargs) -> None:
    _flush_after_response()  # a request that never finished (it should not happen) loses none
    _request.pending = []


request_started.connect(_start_request, dispatch_uid="eventbus.outbox.hints.start")
request_finished.connect(_flush_after_response, dispatch_uid="eventbus.outbox.hints.flush")

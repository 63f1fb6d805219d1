"""What makes a consumer's hung database call return: PostgreSQL session timeouts.

A thread blocked in a database call cannot be interrupted from the event loop. On PostgreSQL
every connection a consumer's threads open gets ``statement_timeout`` and ``lock_timeout``
(``CONSUMER_STATEMENT_TIMEOUT``, ``CONSUMER_LOCK_TIMEOUT``), so the call itself returns with an
error that rolls its transaction back. Only threads the worker marked as its own get them
(:func:`consumer_thread`, the executors' initializer); the web process, management commands and
the relay keep the server's defaults.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.db.backends.signals import connection_created

_consumer_threads = threading.local()


def consumer_thread() -> None:
    """Mark the calling thread as a consumer's (an executor ``initializer``): the connections it
    opens get the consumers' session timeouts, and no other thread's do."""
    _consumer_threads.active = True


def set_session_timeouts(sender, connection, **kwargs) -> None:
    """``connection_created`` receiver: PostgreSQL timeouts on a consumer thread's connections.

    A thread blocked in a database call cannot be interrupted from the event loop; these make the
    call itself return (with an error that rolls the transaction back). The web process keeps
    PostgreSQL's defaults: its transactions are one user and one outbox row, and a request that
    hangs is ended by gunicorn's worker timeout (deploy/gunicorn.conf.py).
    """
    if not getattr(_consumer_threads, "active", False) or connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for name, seconds in (
            ("statement_timeout", settings.CONSUMER_STATEMENT_TIMEOUT),
            ("lock_timeout", settings.CONSUMER_LOCK_TIMEOUT),
        ):
            cursor.execute("SELECT set_config(%s, %s, false)", [name, f"{int(seconds * 1000)}"])


connection_created.connect(set_session_timeouts, dispatch_uid="eventbus-consumer-timeouts")

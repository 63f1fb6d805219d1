"""One active outbox relay per outbox database: an exclusive lock that dies with its holder.

A relay publishes only while it holds this lock; a second relay on the same database waits as a
hot standby and takes over when the holder dies. The lock belongs to the database server or to
the kernel, so a holder that crashes (SIGKILL included) releases it without anyone cleaning up:

- PostgreSQL: a session-level advisory lock, taken on a connection of its own (Django's is the
  ORM's, which may close it at any time). PostgreSQL releases it when that session ends, and the
  session ends when the holder's process dies (its socket closes) or the connection breaks. A
  holder whose connection broke no longer holds the lock, and another relay may hold it already:
  ``held()`` finds that out, and the relay steps down.
- SQLite: ``flock`` on a file next to the database file; the kernel releases it when the process
  dies.

The lock keeps relays from doing the same work twice; it is not what keeps events from being
stored twice. A holder that lost its connection (not its process) may publish until its next
check, a poll interval at most, beside the new holder: JetStream drops the copies by
``Nats-Msg-Id``, as it does for every republished row.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from onboarding.eventbus.models import OUTBOX_DATABASE
from onboarding.eventbus.outbox.store import outbox_connection

logger = logging.getLogger(__name__)

RELAY_LOCK_NAME = "onboarding.outbox_relay"

# PostgreSQL learns that a holder's host vanished (rather than its process: that closes the
# socket at once) only from TCP keepalives, after two hours by the server's defaults. The lock's
# session asks for ~20 s, so that a standby takes over in seconds then too; tcp_user_timeout
# (ms) bounds it as well while the server has data waiting to be acknowledged (keepalives wait
# for that, ~15 minutes of retransmissions).
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 5,
                     "tcp_keepalives_count": 3, "tcp_user_timeout": 20_000}


def relay_lock(*, name: str = RELAY_LOCK_NAME) -> AdvisoryLock | FileLock:
    """The lock that makes one relay the active one on the outbox database (not yet taken)."""
    connection = connections[OUTBOX_DATABASE]
    if connection.vendor == "postgresql":
        return AdvisoryLock(name)
    if connection.vendor == "sqlite":
        return FileLock(Path(f"{connection.settings_dict['NAME']}.relay.lock"))
    raise ImproperlyConfigured(
        f"the outbox relay's lock supports PostgreSQL and SQLite, not {connection.vendor}"
    )


class AdvisoryLock:
    """``pg_try_advisory_lock`` on a dedicated session; PostgreSQL releases it with the session.

    Methods block on the database: call them off the event loop.
    """

    def __init__(self, name: str) -> None:
        # A 64-bit key every relay derives alike from the name; advisory locks are per database,
        # so each outbox database has its own.
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._connection = None
        self._held = False

    def acquire(self) -> bool:
        """Take the lock if it is free; True if held now. Raises if the database is unreachable.

        A standby keeps its connection between attempts: one idle session, not one per second.
        """
        try:
            if self._connection is None:
                self._connection = outbox_connection(application_name="relay-lock")
                for parameter, value in SERVER_KEEPALIVES.items():
                    self._connection.execute(f"SET {parameter} = {int(value)}")
            self._held = self._connection.execute(
                "SELECT pg_try_advisory_lock(%s)", [self.key]
            ).fetchone()[0]
        except Exception:
            self.release()
            raise
        return self._held

    @property
    def holding(self) -> bool:
        """Whether this relay took the lock and has not lost it yet, as far as it knows: no
        database call, safe from any thread (``held()`` is the check that finds a loss)."""
        return self._held

    def held(self) -> bool:
        """Whether the lock is still ours: its session is alive (a lost session released it)."""
        if not self._held:
            return False
        try:
            self._connection.execute("SELECT 1")
            return True
        except Exception as exc:
            logger.warning("relay: lost the outbox lock with its database session: %s", exc)
            self.release()
            return False

    def release(self) -> None:
        """Release the lock by ending its session (which releases it whatever else happened).

        Unlocked explicitly first, while the session answers: the server ends a closed session
        a moment after the client let go, and until then a standby (or a test) that tries the
        lock at once would still find it taken.
        """
        connection, held, self._connection, self._held = self._connection, self._held, None, False
        if connection is not None:
            try:
                if held:
                    connection.execute("SELECT pg_advisory_unlock(%s)", [self.key])
            except Exception:
                pass
            try:
                connection.close()
            except Exception:
                pass


class FileLock:
    """``flock`` on a file beside the SQLite database; the kernel releases it with the process.

    The lock goes with the open file (not the process): two holders in one process exclude each
    other too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def acquire(self) -> bool:
        """Take the lock if it is free; True if held now."""
        if self._file is not None:
            return self.held()
        file = open(self.path, "a")  # created if missing, never truncated
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        self._file = file
        return True

    @property
    def holding(self) -> bool:
        """Whether this relay took the lock and has not lost it yet, as far as it knows."""
        return self._file is not None

    def held(self) -> bool:
        """Whether the lock is still ours: the kernel keeps it while the file is open, but a
        deleted or replaced lock file would let another relay lock a new one beside us."""
        if self._file is None:
            return False
        try:
            current, ours = os.stat(self.path), os.fstat(self._file.fileno())
            if (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino):
                return True
        except OSError:
            pass
        logger.warning("relay: lost the outbox lock: %s was deleted or replaced", self.path)
        self.release()
        return False

    def release(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

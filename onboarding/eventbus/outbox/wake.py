"""The SQLite fast path (``OUTBOX_FAST_PATH=wake``): a local datagram wakes the relay.

SQLite has no ``LISTEN``/``NOTIFY``. In its place, the active relay binds a Unix datagram socket
(``OUTBOX_WAKE_SOCKET``; by default ``<outbox database file>.relay.sock``), and each committed
outbox row sends it one datagram, its row id, from the web process's ``on_commit`` hook. The
relay then reads the rows written since the last it handed over and publishes them at once: the
web process does no NATS work, as on PostgreSQL.

A wake-up is only a hint. Sending never blocks and never raises: with no relay listening (the
socket file is missing, or left behind by a relay that died), or with its queue full, the
datagram is dropped, and the relay's scan publishes the row after ``OUTBOX_RELAY_GRACE`` as it
publishes every row the fast path did not. Only the relay that holds the outbox lock binds the
socket (a standby has none), so wake-ups reach the active relay only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import threading
from pathlib import Path

from django.conf import settings
from django.db import connections

from onboarding.eventbus.models import OUTBOX_DATABASE

logger = logging.getLogger(__name__)

# sun_path holds 108 bytes on Linux, 104 on macOS, the terminating NUL included.
SOCKET_PATH_MAX = 100
# A burst of wake-ups is read at once, up to this many datagrams (the rest wait for the next).
WAKE_BURST = 1000


def wake_socket_path() -> Path:
    """Where the active relay listens for wake-ups; the web processes derive the same path.

    ``OUTBOX_WAKE_SOCKET`` when set, else beside the outbox database file; a path too long for a
    Unix socket becomes one in the temporary folder, named after a hash of the database's path,
    so every process of one checkout still agrees on it.
    """
    key = (settings.OUTBOX_WAKE_SOCKET, connections[OUTBOX_DATABASE].settings_dict["NAME"])
    path = _paths.get(key)  # every committed row asks: derived once per process
    if path is None:
        path = _paths[key] = _derive_socket_path(*key)
    return path


_paths: dict[tuple[str, str], Path] = {}


def _derive_socket_path(configured: str, database_name) -> Path:
    if configured:
        return Path(configured)
    database = os.path.abspath(str(database_name))
    path = Path(f"{database}.relay.sock")
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(database)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"onboarding-relay-{digest}.sock"


class _Sender:
    """One unbound datagram socket per process (gunicorn forks its workers: made anew in each)."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, path: Path, row_id: int) -> bool:
        try:
            with self._lock:
                if self._pid != os.getpid():
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)  # a full queue drops, never waits
                    self._pid = os.getpid()
                self._socket.sendto(str(row_id).encode(), os.fsencode(path))
            return True
        except OSError as exc:
            # No relay (ENOENT, ECONNREFUSED), its queue full (EAGAIN): the scan publishes it.
            logger.debug("relay wake-up not sent (%s); the relay's scan publishes row %s",
                         exc, row_id)
            return False


_sender = _Sender()


def wake_relay(row_id: int) -> bool:
    """Tell the active relay that outbox row ``row_id`` committed. Never blocks, never raises;
    True if the datagram was handed to the kernel."""
    try:
        return _sender.send(wake_socket_path(), row_id)
    except Exception:  # the request committed: a hint that failed is the scan's to make up for
        logger.warning("relay wake-up failed; the relay's scan publishes row %s", row_id,
                       exc_info=True)
        return False


class WakeListener:
    """The active relay's end: a bound datagram socket. Blocking calls: a thread of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            # Only the lock holder binds, so a file already there is a dead relay's: replace it.
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            self._socket.bind(os.fsencode(path))
            self._inode = os.stat(path).st_ino
        except BaseException:
            self._socket.close()
            raise

    def receive(self, timeout: float) -> list[bytes]:
        """The wake-ups of a burst: waits up to ``timeout`` for the first, then takes what is
        queued behind it without waiting. Empty after a timeout."""
        self._socket.settimeout(timeout)
        try:
            bodies = [self._socket.recv(64)]
        except TimeoutError:
            return []
        self._socket.setblocking(False)
        while len(bodies) < WAKE_BURST:
            try:
                bodies.append(self._socket.recv(64))
            except BlockingIOError:
                break
        return bodies

    def close(self) -> None:
        """Close, and remove the socket file if it is still ours (a relay that took over after
        this one lost the lock may have bound its own at the same path)."""
        self._socket.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


def row_ids_of(bodies: list[bytes]) -> list[int]:
    """The row ids the wake-ups name; anything else is ignored (a wake-up is only a hint, and
    the rows are read from the outbox, never from the datagram)."""
    ids = []
    for body in bodies:
        try:
            ids.append(int(body))
        except ValueError:
            logger.warning("relay: ignored an unreadable wake-up %.40r", body)
    return ids

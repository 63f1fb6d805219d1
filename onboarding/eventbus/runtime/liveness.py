"""Liveness of a long-running eventbus process: is every loop of it still moving?

Each loop *ticks* when it makes progress or waits on purpose: a consumer at each fetch
iteration after which the server was heard from, or the connection is known to be down (an empty
fetch returns within a second with the server's 408; a failing one backs off at most 10 s; a
connection that died silently is heard from no more, so the consumer stops ticking), after
each message it settles one at a time, and at each database probe during an outage; the relay
at each scan or idle tick, and every poll while it stands by. A tick also sets the loop's
``*_last_loop_timestamp_seconds`` metric (:mod:`.metrics`). The heartbeat thread sets the mtime
of ``HEARTBEAT_FILE``, every second, to the *oldest* of the loops' last ticks: the last moment
every loop of the process was known to be moving. So a stuck loop — one unit of work (a fetch,
one transaction of a batch or a message, a probe, a back-off sleep) that has not returned —
freezes the file even though the keepalive still tells JetStream the messages are in progress,
and so does an event loop blocked outright. A probe calls the process stuck when the file is
older than the longest legitimate unit of work; 60 s leaves room for the 15 s outage probes and
10 s back-offs (docs/monitoring.md). Until its loops first tick (connecting to NATS, which is
retried for ever like any NATS outage) the process counts as starting, and the heartbeat
advances.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

HEARTBEAT_EVERY = 1.0  # seconds between writes of HEARTBEAT_FILE

_last_tick: dict[str, float] = {}  # loop -> time.time() of its last tick


def tick(loop: str) -> float:
    """``loop`` made progress, or waits on purpose, now; returns now (Unix time)."""
    now = time.time()
    _last_tick[loop] = now
    return now


def start_heartbeat(path: str | Path) -> None:
    """Write ``path`` now and then every second, on a daemon thread of its own."""
    path = Path(path)
    _heartbeat_write(path)
    threading.Thread(target=_heartbeat, args=(path,), name="heartbeat", daemon=True).start()


def _heartbeat(path: Path) -> None:
    while True:
        time.sleep(HEARTBEAT_EVERY)
        _heartbeat_write(path)


def _heartbeat_write(path: Path) -> None:
    """Set the file's mtime to the oldest loop's last tick (now, while no loop has ticked)."""
    ticks = list(_last_tick.values())
    moment = min(ticks) if ticks else time.time()
    try:
        if not path.exists():
            path.touch()
        os.utime(path, (moment, moment))
    except OSError as exc:
        logger.warning("heartbeat: cannot write %s: %s", path, exc)

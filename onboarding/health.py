"""What the web process needs to serve registrations: the checks behind ``/readyz``.

- The default database: accounts, the sessions and tokens, and the outbox every registration
  writes to. (The contexts' databases are their consumers' business; a registration never
  waits on them.)
- NATS, only where this process publishes: with the ``publish`` fast path (SQLite) its own
  publisher thread sends each committed event, so a web process that cannot reach NATS is
  degraded (events wait in the outbox for the relay). With ``notify`` (PostgreSQL) the relay
  publishes and the web process never opens a NATS connection: the check does not either, so
  a NATS outage does not take every web process out of its load balancer.

Each check answers ``None`` (ready) or a short problem for the response; what exactly failed
(host names, driver errors) goes to the log only: the probe is unauthenticated.
"""

from __future__ import annotations

import asyncio
import logging
import os

from django.db import connections

from onboarding.eventbus.models import OUTBOX_DATABASE
from onboarding.eventbus.nats.connection import close, connect_within
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.outbox.write import fast_path

logger = logging.getLogger(__name__)

# A probe must answer before its own timeout (Kubernetes' default is 1 s): a connect that
# takes longer than this is reported as not ready.
NATS_CHECK_TIMEOUT = 1.0


def database_problem() -> str | None:
    """``None`` when the default database answers a query."""
    try:
        with connections[OUTBOX_DATABASE].cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure is "not ready", never a 500
        logger.warning("readyz: the default database cannot be reached: %s: %s",
                       type(exc).__name__, exc)
        return "The default database cannot be reached."
    return None


def nats_problem() -> str | None:
    """``None`` when NATS accepts a connection with this process's settings, within
    ``NATS_CHECK_TIMEOUT``.

    A connection of its own, opened and closed, rather than the publisher's: the publisher
    starts on the first registration, and a fresh process must already know.
    """

    async def probe() -> None:
        nc = await connect_within(f"readyz:{os.getpid()}", NATS_CHECK_TIMEOUT)
        await close(nc)

    try:
        asyncio.run(probe())
    except NatsAccessError as exc:
        logger.warning("readyz: %s", exc)
        return "NATS refused this process's connection."
    except TimeoutError:
        # connect() retries a refused connection until the deadline: the refusals themselves
        # are logged by onboarding.eventbus.nats.connection.
        logger.warning("readyz: NATS did not accept a connection within %ss", NATS_CHECK_TIMEOUT)
        return "NATS cannot be reached."
    except Exception as exc:  # a network or protocol error: not ready
        logger.warning("readyz: NATS cannot be reached: %s: %s", type(exc).__name__, exc)
        return "NATS cannot be reached."
    return None


def publishes_events() -> bool:
    """Whether this process publishes events itself (and so needs NATS)."""
    return fast_path() == "publish"


def readiness_problems() -> tuple[list[str], dict[str, str]]:
    """(the components checked, ``{component: problem}`` for those that are not ready)."""
    checks = {"database": database_problem}
    if publishes_events():
        checks["nats"] = nats_problem
    problems = {name: problem for name, check in checks.items() if (problem := check())}
    return list(checks), problems

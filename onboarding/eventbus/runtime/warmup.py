"""Warming a long-running process up before it says it is ready.

A process's first event used to pay for everything done lazily on first use, on the latency
path of the first registrations after a start (100-500 ms, where later ones take 10-20 ms):
opening the database connection (and, on PostgreSQL, the consumers' session settings), a fresh
server session loading its catalog entries for each table and index it touches, a thread pool
starting its thread, Django compiling its validators' regular expressions. Each process does
this once, here, before it asks for its first message:

- a consumer, on its work thread, before its first fetch — so that a pull request waiting on
  its durable (what ``onboarding_status`` and the bench read as "pulling") means warm;
- the relay, before it LISTENs (:mod:`onboarding.eventbus.outbox.relay`).

Warming never writes, and never fails its process: a database that does not answer now is the
normal outage path's business once work arrives, so a failure is logged and the process goes
on as it would have without warming.
"""

from __future__ import annotations

import logging

from django.apps import apps
from django.db import connections, router

logger = logging.getLogger(__name__)


def touch_tables(alias: str, models) -> None:
    """Open ``alias``'s connection and plan one read of each model's table there.

    Planning a query makes the server session load the table's and its indexes' catalog
    entries (what a first INSERT would otherwise wait for), and reads no rows.
    """
    with connections[alias].cursor() as cursor:
        for model in models:
            table = connections[alias].ops.quote_name(model._meta.db_table)
            cursor.execute(f"SELECT 1 FROM {table} LIMIT 0")


def consumer_warm_up(spec) -> None:
    """A consumer's work thread, before its first fetch: its database connection open, and its
    inbox's and its own app's tables known to the session. Never raises."""
    from onboarding.eventbus.models import ProcessedEvent

    try:
        models = [ProcessedEvent] + [
            model for model in _app_models(spec.name)
            if router.db_for_write(model) == spec.database
        ]
        touch_tables(spec.database, models)
    except Exception as exc:  # the outage path takes over when work arrives
        logger.info("consumer %s: could not warm up its database connection (%s: %s)",
                    spec.name, type(exc).__name__, exc)


def outbox_warm_up() -> None:
    """The relay's notification checks, on the listening thread: the outbox database's
    connection open and the outbox table known to the session. Never raises."""
    from onboarding.eventbus.models import OUTBOX_DATABASE, OutboxEvent

    try:
        touch_tables(OUTBOX_DATABASE, [OutboxEvent])
    except Exception as exc:
        logger.info("relay: could not warm up the outbox connection (%s: %s)",
                    type(exc).__name__, exc)


def _app_models(label: str) -> list:
    try:
        return list(apps.get_app_config(label).get_models())
    except LookupError:  # a consumer whose name is not an app label: its inbox is enough
        return []


def web_warm_up() -> None:
    """A web process, as its WSGI application loads: the URLconf imported (every view, DRF and
    the schema's modules: ~170 ms of CPU, that each worker's first request paid, on the
    same cores as the consumers of the events it produces) with its patterns compiled, and the
    password hashers loaded.

    Opens no connection, starts no thread: safe in gunicorn's master before it forks
    (``preload_app``), where the work is then done once for every worker.
    """
    from django.contrib.auth.hashers import get_hashers
    from django.urls import get_resolver

    get_resolver().reverse_dict  # noqa: B018 - imports the URLconf, compiles every pattern
    get_hashers()

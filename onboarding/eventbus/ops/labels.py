"""Where a report looked, fit for output: the databases and the NATS server, never a password."""

from __future__ import annotations

from urllib.parse import quote

from django.conf import settings

from onboarding.eventbus.models import OUTBOX_DATABASE
from onboarding.eventbus.nats.options import display_url
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.registry import get_consumers


def database_label(alias: str) -> str:
    """A database as a URL fit for output: engine, host and name, never the password."""
    config = settings.DATABASES[alias]
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    user = quote(config.get("USER") or "")
    host = f"{config.get('HOST') or 'localhost'}:{config.get('PORT') or 5432}"
    return f"postgres://{user + '@' if user else ''}{host}/{config['NAME']}"


def unreachable(alias: str, exc: Exception) -> str:
    """One line: which database, and what the driver said (its first line; never a password,
    which neither the label nor libpq's messages carry)."""
    said = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"database {alias} ({database_label(alias)}) unreachable: {type(exc).__name__}: {said}"


def checked_databases() -> dict[str, str]:
    """Each database alias this module reads, once: the default (outbox, dead letters) and
    every context's (its inbox, its defaults)."""
    aliases = [OUTBOX_DATABASE, *(spec.database for spec in get_consumers().values())]
    return {alias: database_label(alias) for alias in dict.fromkeys(aliases)}


def nats_label() -> str:
    try:
        return display_url()
    except NatsAccessError as exc:  # NATS_URL empty: say so rather than fail to report
        return f"({exc})"

"""How the bounded contexts map onto databases.

Each context (players, characters, progression, buildings) owns its data. By default each gets
its own database; several contexts may still be configured onto one physical database, and then
they must share one *alias*: aliases pointing at one database share one ``django_migrations``
table, and ``migrate --database X`` would record another alias's migrations as applied without
creating their tables (see docs/architecture.md). So the settings collapse aliases that point at
the same database, and the router maps each app onto the alias that holds it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SQLITE_ENGINE = "django.db.backends.sqlite3"
POSTGRESQL_ENGINE = "django.db.backends.postgresql"
# PostgreSQL keeps this many bytes of an application_name (NAMEDATALEN - 1) and drops the rest.
APPLICATION_NAME_MAX = 63

# The module in which a bounded context declares what it consumes (onboarding.eventbus.registry).
CONSUMERS_MODULE = "consumers"


def bounded_contexts(installed_apps: list[str]) -> tuple[str, ...]:
    """The labels of the installed apps that ship a ``consumers`` module: the bounded contexts.

    Settings need them before any app is loaded (each context gets a database from
    ``<LABEL>_DATABASE_URL``), so this looks for the module's file without importing anything:
    importing an app package at settings time may need the settings themselves. The label is the
    last part of the entry, as Django's default. What this cannot see (an ``AppConfig`` path, a
    custom label, a ``consumers.py`` without ``SUBSCRIPTIONS``) the system check
    ``eventbus.E010``–``E012`` reports once the apps are loaded.
    """
    return tuple(
        entry.rsplit(".", 1)[-1] for entry in installed_apps
        if _has_module(entry, CONSUMERS_MODULE)
    )


def _has_module(package: str, name: str) -> bool:
    top, *rest = package.split(".")
    try:
        spec = importlib.util.find_spec(top)  # locates a top-level package, imports nothing
    except (ImportError, ValueError):
        return False
    for location in (spec and spec.submodule_search_locations) or ():
        folder = Path(location).joinpath(*rest)
        if (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file():
            return True
    return False


def configure(
    env, *, installed_apps: list[str], sqlite_dir: Path, test_dir: Path, home: str = "accounts"
) -> tuple[tuple[str, ...], dict[str, dict], dict[str, str]]:
    """(BOUNDED_CONTEXTS, DATABASES, CONTEXT_DATABASES) from the environment.

    ``home`` (accounts), Django's own apps and the outbox live in ``DATABASE_URL``. Each other
    context has its own ``<LABEL>_DATABASE_URL``; unset, it follows ``DATABASE_URL`` when that
    is set, else gets its own SQLite file in ``sqlite_dir``. ``home`` may consume too (accounts
    keeps the readiness projection): it is then in ``CONTEXT_DATABASES``, always on ``default``,
    and not in ``BOUNDED_CONTEXTS``, the contexts with a database of their own.
    """
    found = bounded_contexts(installed_apps)
    contexts = tuple(context for context in found if context != home)
    default_url = env.str("DATABASE_URL", default="")
    default = prepare(
        env.db_url_config(default_url or f"sqlite:///{sqlite_dir / 'accounts.sqlite3'}"),
        test_dir=test_dir,
    )
    configs = {}
    for context in contexts:
        url = env.str(f"{context.upper()}_DATABASE_URL", default="") or (
            default_url or f"sqlite:///{sqlite_dir / f'{context}.sqlite3'}"
        )
        configs[context] = prepare(env.db_url_config(url), test_dir=test_dir)
    databases, context_alias = assign(default, configs)
    if home in found:
        context_alias[home] = "default"
    return contexts, databases, context_alias

# WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN so two
# writers queue on the busy timeout instead of failing with "database is locked" on upgrade.
SQLITE_OPTIONS = {
    "timeout": 20,
    # synchronous=FULL: a commit (after which a consumer acks) survives a power cut too.
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL",
    "transaction_mode": "IMMEDIATE",
}


# How long data sent on a PostgreSQL connection may go unacknowledged before the connection is
# given up (libpq's tcp_user_timeout, Linux). Above any pause a healthy network has; far below
# the kernel's ~15 minutes of retransmissions.
TCP_USER_TIMEOUT_MS = 30_000


def prepare(config: dict, *, test_dir: Path) -> dict:
    """Complete a database config parsed from a URL with the options this project relies on."""
    config = dict(config)
    config.setdefault("CONN_MAX_AGE", 60)
    config.setdefault("CONN_HEALTH_CHECKS", True)
    if config["ENGINE"] == POSTGRESQL_ENGINE:
        # A database that stops answering must fail a call, not hang the consumer's only ORM
        # thread: bounded connect, and TCP keepalives to notice a dead peer while waiting for
        # an answer. Keepalives stay silent while sent data waits to be acknowledged (a query
        # sent into a dead link): the kernel retransmits for ~15 minutes (tcp_retries2) unless
        # tcp_user_timeout (ms) bounds it. Measured through a link taken down in a network
        # namespace (tests/test_partitions.py): a query sent into it fails after ~30 s, one
        # waiting for its answer after ~40 s (docs/architecture.md). A URL's query string may
        # override each (`?tcp_user_timeout=10000`).
        config["OPTIONS"] = {
            "connect_timeout": 5,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
            **config.get("OPTIONS", {}),
        }
    if config["ENGINE"] == SQLITE_ENGINE:
        config["CONN_MAX_AGE"] = None  # one file, no network: keep the connection for ever
        config["OPTIONS"] = {**SQLITE_OPTIONS, **config.get("OPTIONS", {})}
        # Django would run SQLite tests in memory, invisible to the consumer threads and
        # processes the tests start; a file next to the others keeps them real.
        name = Path(config["NAME"]).name
        config.setdefault("TEST", {}).setdefault("NAME", str(test_dir / f"test-{name}"))
        # SQLite creates the file, not its folder; the embedded default must just work.
        Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["TEST"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    return config


def name_connections(name: str) -> None:
    """Name the PostgreSQL connections this process opens from now on: ``application_name``,
    which ``pg_stat_activity`` shows beside each session, so an operator can tell which process
    holds a connection slot, a lock or a long transaction.

    ``name`` is the process's role: ``web`` (``onboarding/wsgi.py``: runserver's requests,
    gunicorn's workers), ``relay``, ``consume:players``, else ``manage.py <command>``
    (manage.py). It goes in each PostgreSQL alias's ``OPTIONS``, which Django hands to psycopg
    as connection parameters: named as the session starts, no ``SET`` round trip. Connections
    already open keep the name they had, so an entry point calls this before it opens any.
    The relay's own psycopg sessions take theirs from
    :func:`onboarding.eventbus.outbox.store.outbox_connection` (``relay-listen``,
    ``relay-lock``). SQLite has no server and no session to name.
    """
    from django.conf import settings

    for config in settings.DATABASES.values():
        if config["ENGINE"] == POSTGRESQL_ENGINE:
            # The same dict Django's connection handler reads when it connects.
            config.setdefault("OPTIONS", {})["application_name"] = name[:APPLICATION_NAME_MAX]


def web_connections() -> None:
    """The web process's PostgreSQL connections: a pool per database when
    ``DATABASE_POOL_MAX_SIZE`` is set (gunicorn's gthread workers: threads share a few
    connections rather than one each), and ``WEB_STATEMENT_TIMEOUT`` on every session.

    Like :func:`name_connections`, it edits the aliases' settings before any connection opens
    (onboarding/wsgi.py, as the app loads): safe in gunicorn's master before the fork, since a
    pool opens on a worker's first query, in that worker.
    """
    from django.conf import settings

    for config in settings.DATABASES.values():
        if config["ENGINE"] != POSTGRESQL_ENGINE:
            continue
        options = config.setdefault("OPTIONS", {})
        if settings.WEB_STATEMENT_TIMEOUT:
            timeout = f"-c statement_timeout={int(settings.WEB_STATEMENT_TIMEOUT * 1000)}"
            options["options"] = f"{options.get('options', '')} {timeout}".strip()
        if settings.DATABASE_POOL_MAX_SIZE:
            options["pool"] = {
                "min_size": min(settings.DATABASE_POOL_MIN_SIZE, settings.DATABASE_POOL_MAX_SIZE),
                "max_size": settings.DATABASE_POOL_MAX_SIZE,
                "timeout": settings.DATABASE_POOL_TIMEOUT,
            }
            # Django hands connections back to the pool after each request; it refuses a pool
            # with persistent connections, and checks a connection's health as it takes it.
            config["CONN_MAX_AGE"] = 0
            config["CONN_HEALTH_CHECKS"] = False


_LOOPBACK = {"", "localhost", "127.0.0.1", "::1", "[::1]"}
_DEFAULT_PORTS = {POSTGRESQL_ENGINE: "5432", "django.db.backends.mysql": "3306"}


def identity(config: dict) -> tuple:
    """What makes two configs the same database (and so the same ``django_migrations``).

    Spellings of one server compare equal (``localhost`` and ``127.0.0.1``, a missing port and
    the default one); the user does not matter (two users of one database share its tables),
    but a ``search_path`` in the connection options does (one schema per context is a
    separate set of tables). ``migrate_all`` double-checks the outcome table by table.
    """
    if config["ENGINE"] == SQLITE_ENGINE:
        return (SQLITE_ENGINE, str(Path(config["NAME"]).resolve()))
    host = str(config.get("HOST") or "").lower()
    port = str(config.get("PORT") or _DEFAULT_PORTS.get(config["ENGINE"], ""))
    return (
        config["ENGINE"],
        "loopback" if host in _LOOPBACK else host,
        port,
        config.get("NAME"),
        str((config.get("OPTIONS") or {}).get("options", "")),
    )


def assign(default: dict, contexts: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """Return (DATABASES, alias of each context), one alias per distinct physical database."""
    databases = {"default": default}
    seen = {identity(default): "default"}
    context_alias = {}
    for context, config in contexts.items():
        key = identity(config)
        if key not in seen:
            seen[key] = context
            databases[context] = config
        context_alias[context] = seen[key]
    return databases, context_alias


def bounded_contexts_of(settings_module: str = "onboarding.settings") -> tuple[str, ...]:
    """``BOUNDED_CONTEXTS`` of a settings module, read in a child process.

    For scripts (bench, rehearsal) that must put each context's database URL in the environment
    *before* they set Django up: importing the settings here would freeze them with the
    environment as it is now.
    """
    import os
    import secrets
    import subprocess
    import sys

    code = "import importlib, sys; print(*importlib.import_module(sys.argv[1]).BOUNDED_CONTEXTS)"
    # The settings refuse DEBUG off without a secret key; this child signs nothing.
    env = {"DJANGO_SECRET_KEY": secrets.token_urlsafe(50), **os.environ}
    result = subprocess.run(
        [sys.executable, "-c", code, settings_module], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1], env=env,
    )
    return tuple(result.stdout.split())

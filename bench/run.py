"""Benchmarks of the event pipeline: ``make bench`` (see docs/benchmarks.md).

One engine per run (``--engine sqlite`` or ``--engine postgres``, the latter from
``DATABASE_URL``). Everything it needs is started here and torn down after: a nats-server on a
free port with a temporary store (fsync on every write, as in development), bench databases
(SQLite files in a temporary folder; on PostgreSQL five databases, ``<name>_bench`` for accounts
and ``<name>_bench_<context>`` for each context, as a deployment has them, or with
``--shared-database`` all in ``<name>_bench``), the real ``consume`` / ``outbox_relay``
processes and gunicorn. Only 127.0.0.1 is used; every loop is bounded in count and time.

Scenarios:
  drain     a backlog of N events (``--events``, 5,000; e.g. ``--events 5000,50000``) published
            up front, then drained by the project's four consumers (one process each) and, in
            the same run, by the FastStream peer (bench/peer_faststream.py, four processes) on
            its own durables and emptied tables; the time until every row is visible in the
            databases, polled from outside, against the bare bulk_create ceiling of the same rows
            in batches of the same size (one process, no NATS).
  latency   registrations over HTTP at a steady rate (fast MD5 hasher); time from the 201 to
            the last of the four services' default rows.
  register  the register endpoint with and without event publishing (same hasher, same run);
            ``--hasher argon2`` measures it with the production hasher.
  relay     an outbox backlog of N rows flushed by the relay; events/s.
  grown     PostgreSQL: a 50,000-event drain (``--grown-events``) and the latency, on empty
            tables and on tables prefilled with N users (``--prefill``, 1,000,000: their inbox,
            outbox, accounts and default rows, bench/grown.py), in one run; the fall in drain
            rate, the database server's WAL and buffer traffic per event, and each table's and
            index's size per million users.

Passwords are hashed with MD5 (``DJANGO_PASSWORD_HASHERS``) so that hashing does not hide the
pipeline; per-event INFO logs are off (``LOG_LEVEL=WARNING``), as they would be at volume.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onboarding.databases import bounded_contexts_of  # noqa: E402

# Every registered context gets its bench database and its consumer process (the drain and
# latency figures below read the four starter contexts' models).
CONTEXTS = bounded_contexts_of()
FAST_HASHER = "django.contrib.auth.hashers.MD5PasswordHasher"
HASHERS = {"md5": FAST_HASHER, "argon2": "django.contrib.auth.hashers.Argon2PasswordHasher"}


# -- output -------------------------------------------------------------------------------------


def progress(label: str, done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty() and done not in (0, total):
        return
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(
        f"\r  {label:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {rate:,.0f}/s"
    )
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def median_of(runs: list[dict]) -> dict:
    """Field by field, the median of several runs' results (numbers; anything else: run 1's)."""
    merged = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, dict):
            merged[key] = median_of(values)
        elif isinstance(first, int | float) and not isinstance(first, bool):
            median = statistics.median(values)
            merged[key] = round(median) if isinstance(first, int) else round(median, 3)
        else:
            merged[key] = first
    return merged


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- environment --------------------------------------------------------------------------------


def bench_databases(engine: str, workdir: Path, shared: bool = False) -> dict[str, str]:
    """Database URLs for the bench, never the developer's own.

    PostgreSQL: five databases by default, as a deployment has them — ``<name>_bench`` for
    accounts (``<name>`` from ``DATABASE_URL``) and ``<name>_bench_<context>`` for each context
    (or ``<its own name>_bench`` when ``<CONTEXT>_DATABASE_URL`` is set); with ``shared``, every
    context in ``<name>_bench``. All are dropped and created afresh.
    """
    if engine == "sqlite":
        urls = {"DATABASE_URL": f"sqlite:///{workdir / 'accounts.sqlite3'}"}
        for context in CONTEXTS:
            urls[f"{context.upper()}_DATABASE_URL"] = f"sqlite:///{workdir / context}.sqlite3"
        return urls
    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith("postgres"):
        raise SystemExit("--engine postgres needs DATABASE_URL=postgres://...")
    parsed = urlparse(base)
    urls = {"DATABASE_URL": parsed._replace(path=parsed.path + "_bench").geturl()}
    for context in CONTEXTS:
        key = f"{context.upper()}_DATABASE_URL"
        own = os.environ.get(key)
        if own:
            own_parsed = urlparse(own)
            urls[key] = own_parsed._replace(path=own_parsed.path + "_bench").geturl()
        elif shared:
            urls[key] = urls["DATABASE_URL"]
        else:
            urls[key] = parsed._replace(path=f"{parsed.path}_bench_{context}").geturl()
    for url in set(urls.values()):
        recreate_postgres_database(url)
    return urls


def databases_label(engine: str, urls: dict[str, str]) -> str:
    """What the output says about where the data lives."""
    distinct = len(set(urls.values()))
    kind = ("PostgreSQL database", "PostgreSQL databases") if engine == "postgres" else (
        "SQLite file", "SQLite files")
    if distinct == 1:
        return f"one shared {kind[0]}"
    if distinct == len(CONTEXTS) + 1:
        return f"{distinct} {kind[1]} (accounts + one per context)"
    return f"{distinct} {kind[1]}"


def setup_django(engine: str, workdir: Path, nats_url: str, shared: bool = False,
                 hasher: str = FAST_HASHER) -> dict:
    """Point this process (and the environment of what it starts) at the bench databases and
    nats-server, set Django up and migrate; return that environment."""
    env = {
        **os.environ,
        **bench_databases(engine, workdir, shared),
        "NATS_URL": nats_url,
        "DJANGO_SETTINGS_MODULE": "onboarding.settings",
        "DJANGO_PASSWORD_HASHERS": hasher,
        "REGISTER_THROTTLE_RATE": "",
        "LOG_LEVEL": "WARNING",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        # DEBUG off, as deployed: the settings then need a key (a throwaway one), and the load
        # generator talks plain HTTP to 127.0.0.1, so no redirect to HTTPS.
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_SECURE_SSL_REDIRECT": "false",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate_all", verbosity=0, stdout=open(os.devnull, "w"))
    return env


def recreate_postgres_database(url: str) -> None:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    with psycopg.connect(
        host=parsed.hostname or "127.0.0.1", port=parsed.port or 5432,
        user=parsed.username or None, password=parsed.password or None,
        dbname="postgres", autocommit=True,
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


class Stack:
    """The processes of one scenario; all of them are stopped on exit."""

    def __init__(self, env: dict, workdir: Path):
        self.env, self.workdir = env, workdir
        self.processes: list[subprocess.Popen] = []

    def manage(self, *args, profile: Path | None = None, **extra_env) -> subprocess.Popen:
        return self.python(ROOT / "manage.py", *args, profile=profile, **extra_env)

    def python(self, script: Path, *args, profile: Path | None = None,
               **extra_env) -> subprocess.Popen:
        """Run a script (under cProfile, every thread, with ``profile`` as the files' prefix)."""
        label = args[0] if script.name == "manage.py" else script.stem
        log = open(self.workdir / f"{label}-{len(self.processes)}.log", "w")
        wrapper = [str(ROOT / "bench" / "profiled.py"), str(profile)] if profile else []
        process = subprocess.Popen(
            [sys.executable, *wrapper, str(script), *args],
            env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        process.log_path = Path(log.name)
        self.processes.append(process)
        return process

    def gunicorn(self, port: int, ready_path: str = "/api/auth/me",
                 **extra_env) -> subprocess.Popen:
        """gunicorn with 2 sync workers; returns once ``ready_path`` answers (any status)."""
        log = open(self.workdir / f"gunicorn-{len(self.processes)}.log", "w")
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "gunicorn"), "onboarding.wsgi",
             "--workers", "2", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"],
            env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", ready_path)
                conn.getresponse().read()
                return process
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not start")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# -- helpers that need Django -------------------------------------------------------------------


def default_models():
    from buildings.models import Building
    from characters.models import Character
    from players.models import Player
    from progression.models import MetaProgression

    return {"players": Player, "characters": Character, "progression": MetaProgression,
            "buildings": Building}


def reset_data() -> None:
    """Empty every table the scenarios write, between scenarios (and between drain phases)."""
    from django.apps import apps
    from django.conf import settings
    from django.db import connections, router

    tables: dict[str, set] = {}
    for model in apps.get_models():
        if model._meta.app_label in ("eventbus", "accounts", *CONTEXTS):
            aliases = (
                set(settings.CONTEXT_DATABASES.values())
                if model._meta.model_name == "processedevent"
                else {router.db_for_write(model) or "default"}
            )
            for alias in aliases:
                tables.setdefault(alias, set()).add(model)
    for alias, models in tables.items():
        connection = connections[alias]
        if connection.vendor == "postgresql":
            # TRUNCATE, not DELETE: a phase after a 50,000-event phase must not meet its dead
            # tuples and bloated indexes (nor autovacuum cleaning them up mid-measurement).
            names = ", ".join(connection.ops.quote_name(m._meta.db_table) for m in models)
            with connection.cursor() as cursor:
                cursor.execute(f"TRUNCATE {names} CASCADE")
        else:
            for model in models:
                model.objects.using(alias).all().delete()


def reset_jetstream() -> None:
    import asyncio

    from django.conf import settings
    from django.core.management import call_command
    from nats.js.errors import NotFoundError

    from onboarding.eventbus.nats.connection import close, connect_within

    async def delete():
        nc = await connect_within("bench", 5)
        try:
            await nc.jetstream().delete_stream(settings.NATS_STREAM)
        except NotFoundError:
            pass
        finally:
            await close(nc)

    asyncio.run(delete())
    call_command("setup_jetstream", stdout=open(os.devnull, "w"))


def wait_for_counts(target: int, timeout: float, label: str,
                    baseline: dict[str, int] | None = None) -> dict[str, float]:
    """Poll until each context has ``target`` users' defaults (beyond ``baseline``'s rows, e.g.
    the grown scenario's prefill); return when each got there."""
    models = default_models()
    baseline = baseline or {}
    per_user = {"buildings": 2}
    started = time.monotonic()
    reached: dict[str, float] = {}
    while len(reached) < len(models):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{label}: not every default after {timeout}s: {reached}")
        done = 0
        for name, model in models.items():
            count = (model.objects.count() - baseline.get(name, 0)) // per_user.get(name, 1)
            done += min(count, target)
            if count >= target and name not in reached:
                reached[name] = time.monotonic()
        progress(label, done // len(models), target, started)
        time.sleep(0.2)
    return reached


# -- scenarios ----------------------------------------------------------------------------------


def publish_backlog(events: int, user_ids: list[uuid.UUID] | None = None,
                    new_id=uuid.uuid4) -> float:
    """Publish ``events`` user.registered events (for ``user_ids`` when given, with event ids
    from ``new_id``), pipelined; return events/s."""
    import asyncio

    from onboarding.contracts import UserRegistered, event_headers
    from onboarding.eventbus.nats.connection import close, connect_within

    async def publish():
        nc = await connect_within("bench-publish", 5)
        js = nc.jetstream(timeout=10)
        now = dt.datetime.now(dt.UTC)
        started = time.monotonic()
        for i in range(events):
            user_id = user_ids[i] if user_ids else uuid.uuid4()
            event = UserRegistered(user_id=user_id, username=f"drain{i}",
                                   email=f"drain{i}@example.com", registration_timestamp=now)
            await js.publish_async(event.subject, event.to_json(),
                                   headers=event_headers(event, event_id=new_id()))
            if i % 1000 == 0:
                progress("publish", i, events, started)
        await js.publish_async_completed()
        progress("publish", events, events, started)
        elapsed = time.monotonic() - started
        await close(nc)
        return events / elapsed

    return asyncio.run(publish())


def ceiling_rate(events: int, batch: int) -> float:
    """The same default rows, bulk_create in batches of ``batch``, one process, no NATS."""
    from django.conf import settings
    from django.db import transaction

    from buildings.defaults import STARTER_BUILDINGS
    from characters.defaults import DEFAULT_CHARACTER_NAME
    from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS

    models = default_models()

    users = [(uuid.uuid4(), f"ceil{i}") for i in range(events)]
    builders = {
        "players": lambda u, n: [models["players"](user_id=u, username=n)],
        "characters": lambda u, n: [models["characters"](
            user_id=u, name=DEFAULT_CHARACTER_NAME, is_active=True)],
        "progression": lambda u, n: [models["progression"](
            user_id=u, unlocked_weapons=list(STARTER_WEAPONS),
            unlocked_skills=list(STARTER_SKILLS))],
        "buildings": lambda u, n: [models["buildings"](user_id=u, kind=k, level=lv)
                                   for k, lv in STARTER_BUILDINGS],
    }
    started = time.monotonic()
    for name, build in builders.items():
        model, alias = models[name], settings.CONTEXT_DATABASES[name]
        for i in range(0, events, batch):
            rows = [row for u, n in users[i:i + batch] for row in build(u, n)]
            with transaction.atomic(using=alias):
                model.objects.using(alias).bulk_create(rows)
    return events / (time.monotonic() - started)


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a live process has used, in ms; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the ")": state is field 3, utime 14 and stime 15 (1-based, whole line).
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def server_cpu_ms(comm: str = "postgres") -> float:
    """CPU time of every live process named ``comm`` (a database server's backends), in ms.

    Backends that exit inside the window take their CPU with them; the drain's consumers keep
    theirs open, so what it counts is theirs plus the server's own processes (and the bench's
    poller, a few lookups every 20 ms)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    total += cpu_ms(int(entry.name))
            except OSError:
                continue
    return total


POLL_SECONDS = 0.02
PAUSED_UNTIL = "2100-01-01T00:00:00Z"


def on_jetstream(work):
    """Run ``await work(js)`` on a connection of its own; return its result."""
    import asyncio

    from onboarding.eventbus.nats.connection import close, connect_within

    async def main():
        nc = await connect_within("bench-admin", 5)
        try:
            return await work(nc.jetstream(timeout=10))
        finally:
            await close(nc)

    return asyncio.run(main())


def hold_durables(durables: list[str], create_for: str | None = None) -> None:
    """Pause ``durables`` (creating them first, as FastStream would, for ``create_for``'s
    subject): started consumers bind and wait, and the drain starts when they are resumed."""
    from django.conf import settings
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async def work(js):
        for durable in durables:
            if create_for:
                # FastStream's own defaults for a durable pull subscriber (it binds to an
                # existing durable as it is).
                await js.add_consumer(settings.NATS_STREAM, ConsumerConfig(
                    name=durable, durable_name=durable, filter_subject=create_for,
                    deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                    pause_until=PAUSED_UNTIL))
            else:
                await js.pause_consumer(settings.NATS_STREAM, durable, PAUSED_UNTIL)

    on_jetstream(work)


def wait_bound(durables: list[str], processes: list[subprocess.Popen], timeout: float) -> None:
    """Until every durable has a consumer process's pull request waiting on it."""
    from django.conf import settings

    async def waiting(js):
        return [(await js.consumer_info(settings.NATS_STREAM, d)).num_waiting or 0
                for d in durables]

    deadline = time.monotonic() + timeout
    while min(on_jetstream(waiting)) < 1:
        check_alive(processes, "start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumers not fetching after {timeout}s")
        time.sleep(0.1)


def resume_durables(durables: list[str], users: list[uuid.UUID], batch: int) -> None:
    """Resume the held durables, then publish one more batch of events (their users appended to
    ``users``).

    A resumed consumer serves the pull requests already waiting on it only when a message
    arrives; without one, each process would sit until its pull request expires (1 s for the
    project, 5 s for FastStream). A whole batch, not one event, so that the backlog stays a
    multiple of the batch: FastStream's batch subscriber holds a partial batch until its
    timeout (5 s by default) before handing it over.
    """
    from django.conf import settings

    from onboarding.contracts import UserRegistered, event_headers

    now = dt.datetime.now(dt.UTC)
    kick = [uuid.uuid4() for _ in range(batch)]
    events = [UserRegistered(user_id=user_id, username=f"kick{len(users) + i}",
                             email=f"kick{len(users) + i}@example.com",
                             registration_timestamp=now) for i, user_id in enumerate(kick)]

    async def work(js):
        for durable in durables:
            await js.resume_consumer(settings.NATS_STREAM, durable)
        for event in events:
            await js.publish_async(event.subject, event.to_json(),
                                   headers=event_headers(event, event_id=uuid.uuid4()))
        await js.publish_async_completed()

    on_jetstream(work)
    users.extend(kick)


def check_alive(processes: list[subprocess.Popen], label: str) -> None:
    for process in processes:
        if process.poll() is not None:
            log = getattr(process, "log_path", None)
            tail = log.read_text()[-2000:] if log else ""
            raise RuntimeError(f"{label}: a consumer exited ({process.returncode}):\n{tail}")


def watch_drain(processes: list[subprocess.Popen], durables: list[str],
                users: list[uuid.UUID], batch: int, timeout: float, label: str,
                nats_pid: int | None = None, profiling: bool = False,
                prefilled: int = 0, counters=None) -> dict:
    """Release the held durables and watch the backlog drain from outside, as a user sees it:
    the moment each context's rows are all visible (committed), polled every 20 ms.

    The clock starts when the durables are resumed, with every consumer process already up and
    waiting on its durable (so process start-up is not counted, and all four start together).
    The probe is cheap, so as not to compete with the consumers for the two cores: an index
    lookup of the backlog's last user (committed last when a consumer commits in order),
    confirmed by a count. The consumers' CPU (``/proc``) is read over the same window, and so
    are ``counters()`` (cumulative numbers, e.g. the database server's), when given.
    """
    from django.db import connection as django_connection

    models = default_models()
    per_user = {"buildings": 2}
    done: dict[str, float] = {}

    def cpu() -> dict[str, float]:
        taken = {"consumers": sum(cpu_ms(p.pid) for p in processes)}
        if nats_pid:
            taken["nats-server"] = cpu_ms(nats_pid)
        if django_connection.vendor == "postgresql":
            taken["postgres"] = server_cpu_ms()
        return taken

    if profiling:
        for process in processes:
            process.send_signal(signal.SIGUSR1)  # bench/profiled.py: start profiling
        time.sleep(0.2)
    counted = counters() if counters else None
    cpu_start = cpu()
    started = time.monotonic()
    resume_durables(durables, users, batch)
    events, last_user = len(users), users[-1]
    progress(label, 0, events, started)
    while len(done) < len(models):
        now = time.monotonic()
        if now - started > timeout:
            raise TimeoutError(f"{label}: not drained after {timeout}s: done {sorted(done)}")
        check_alive(processes, label)
        for name, model in models.items():
            if name not in done and model.objects.filter(user_id=last_user).exists() and (
                    model.objects.count() // per_user.get(name, 1) >= events + prefilled):
                done[name] = now
                progress(label, len(done) * events // len(models), events, started)
        if len(done) < len(models):
            time.sleep(POLL_SECONDS)
    cpu_end = cpu()
    seconds = max(done.values()) - started
    if counters:
        after = counters()
        counted = {key: after[key] - counted[key] for key in after}
    return {
        **({"counters": counted} if counters else {}),
        "events_drained": events,
        "events_per_s": round(events / max(seconds, 1e-6)),
        "per_consumer_events_per_s": {
            name: round(events / max(done[name] - started, 1e-6)) for name in models
        },
        "seconds": round(seconds, 3),
        "cpu_ms_per_event": {
            key: round((cpu_end[key] - cpu_start[key]) / events, 3) for key in cpu_end
        },
    }


def check_drained(events: int, inbox: bool, prefilled: int = 0) -> None:
    """Every default row once per user, nothing more (and one inbox row per event), beside the
    ``prefilled`` users' rows (the grown scenario's)."""
    from django.conf import settings

    from onboarding.eventbus.models import ProcessedEvent

    per_user = {"buildings": 2}
    for name, model in default_models().items():
        rows, users = model.objects.count(), model.objects.values("user_id").distinct().count()
        events_and_prefilled = events + prefilled
        expected = events_and_prefilled * per_user.get(name, 1)
        if rows != expected or users != events_and_prefilled:
            raise AssertionError(f"{name}: {rows} rows for {users} users, expected {expected} "
                                 f"rows for {events_and_prefilled}")
        if inbox:
            handled = ProcessedEvent.objects.using(settings.CONTEXT_DATABASES[name]).filter(
                consumer=name).count()
            if handled != events_and_prefilled:
                raise AssertionError(f"{name}: {handled} inbox rows, "
                                     f"expected {events_and_prefilled}")


def peer_available() -> str | None:
    """FastStream's version, or None when bench/requirements.txt is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faststream")
    except PackageNotFoundError:
        return None


# Where a consumer's time goes, from its cProfile: each part the cumulative time of the functions
# named (module path part, function name), minus that of those marked "-"; an indented part is
# inside the one above it.
PROFILE_ROWS = {
    "fetch (project: fetching.py; FastStream: nats-py's, incl. reading and parsing the "
    "messages)": [("onboarding/eventbus/nats/pull.py", "fetch"), ("nats/js/client.py", "fetch")],
    "decode + validate (project: parse_event)": [("onboarding/contracts.py", "parse_event")],
    "decode + validate (FastStream: JSON decoder, pydantic through fast-depends)": [
        ("faststream/nats/parser.py", "decode_batch"), ("fast_depends/core/model.py", "asolve"),
        ("-fast_depends/utils.py", "run_async")],  # asolve calls the handler through run_async
    "inbox statement (project: INSERT ... RETURNING)": [
        ("onboarding/eventbus/consumer/inbox.py", "inbox_claim")],
    "bulk_create (ORM build + INSERT)": [("django/db/models/query.py", "bulk_create")],
    "  of which compiling SQL (as_sql)": [("django/db/models/sql/compiler.py", "as_sql")],
    "insert_ignoring_conflicts (project: default rows and inbox, no ORM build)": [
        ("onboarding/eventbus/rows.py", "insert_ignoring_conflicts")],
    "the per-event log line (project: _log_handled)": [
        ("onboarding/eventbus/consumer/settling.py", "_log_handled")],
    "every SQL statement (Django cursor, driver, round trip)": [
        ("django/db/backends/utils.py", "_execute")],
    "commit": [("django/db/backends/base/base.py", "commit")],
    "acks": [("nats/aio/msg.py", "ack"), ("nats/aio/msg.py", "ack_sync")],
}
# Waiting for work, not doing it: the event loop's poll, an idle worker thread, sleeps.
IDLE = ("<method 'poll' of 'select.epoll' objects>", "<method 'get' of '_queue.SimpleQueue'",
        "<method 'acquire' of '_thread.lock'", "<built-in method time.sleep>")


def profile_summary(prefix: Path, events: int) -> dict[str, float]:
    """Profiled ms per event: the busy total and PROFILE_ROWS' parts (every process of a phase)."""
    import pstats

    files = sorted(str(f) for f in prefix.parent.glob(f"{prefix.name}*.prof"))
    if not files:
        return {}
    stats = pstats.Stats(*files).stats
    summary = {"busy (all but waiting for work; profiled, so inflated)": sum(
        tt for (_, _, name), (_, _, tt, _, _) in stats.items()
        if not any(name.startswith(idle) for idle in IDLE))}
    for label, parts in PROFILE_ROWS.items():
        summary[label] = 0.0
        for path, function in parts:
            sign = -1 if path.startswith("-") else 1
            summary[label] += sign * sum(
                ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                if path.lstrip("-") in file and name == function)
    return {label: round(seconds * 1000 / events, 3) for label, seconds in summary.items()}


def drain_phase(stack: Stack, phase: str, batch: int, users: list[uuid.UUID],
                nats_pid: int | None, profile_dir: Path | None = None,
                prefilled: int = 0, counters=None) -> dict:
    """One drain of the published backlog (``users``' events) by the project's consumers or by
    the peer, on empty default tables (the stream's messages stay: each phase has its own
    durables, and drains every event published so far) — or, with ``prefilled``, on the grown
    scenario's tables as they are."""
    if not prefilled:
        reset_data()
    if phase == "project":
        durables = list(CONTEXTS)  # setup_jetstream made them (reset_jetstream)
        hold_durables(durables)
        processes = [stack.manage("consume", context, "--batch", str(batch),
                                  profile=profile_dir and profile_dir / f"{phase}-{context}")
                     for context in CONTEXTS]
    else:
        durables = [f"peer-{context}" for context in default_models()]
        hold_durables(durables, create_for="user.registered")
        processes = [stack.python(ROOT / "bench" / "peer_faststream.py", context,
                                  "--durable", durable, "--batch", str(batch),
                                  profile=profile_dir and profile_dir / f"{phase}-{context}")
                     for context, durable in zip(default_models(), durables, strict=True)]
    wait_bound(durables, processes, timeout=60)
    result = watch_drain(processes, durables, users, batch, timeout=600, label=phase[:10],
                         nats_pid=nats_pid, profiling=bool(profile_dir), prefilled=prefilled,
                         counters=counters)
    stack.stop()
    check_drained(len(users), inbox=phase == "project", prefilled=prefilled)
    if profile_dir:
        # From the drain's start to the processes' exit, per event, the four processes summed.
        result["profile_ms_per_event"] = profile_summary(profile_dir / f"{phase}-",
                                                         len(users))
    return result


def scenario_drain(stack: Stack, events: int, batch: int, peer: bool, run: int = 0,
                   nats_pid: int | None = None, profile_dir: Path | None = None) -> dict:
    """The backlog, drained by the project's consumers and by the FastStream peer (same events,
    their own durables, emptied tables in between), then the ceiling of the same rows."""
    users = [uuid.uuid4() for _ in range(events)]
    publish_rate = publish_backlog(events, users)
    phases = ["project", "faststream"] if peer else ["project"]
    if run % 2:
        phases.reverse()  # alternate the order across runs, so drift over a run cancels out
    if profile_dir:
        profile_dir = profile_dir / f"{events}-run{run + 1}"
        profile_dir.mkdir(parents=True)
    drained = {phase: drain_phase(stack, phase, batch, users, nats_pid, profile_dir)
               for phase in phases}
    reset_data()
    ceiling = ceiling_rate(events, batch)
    result = {
        "events": events,
        "batch": batch,
        "publish_events_per_s": round(publish_rate),
        "ceiling_events_per_s": round(ceiling),
    }
    for phase in ("project", "faststream"):
        if phase in drained:
            result[phase] = {**drained[phase],
                             "ratio_to_ceiling": round(drained[phase]["events_per_s"] / ceiling, 3)}
    return result


def http_register(conn: http.client.HTTPConnection, username: str) -> tuple[int, dict, float]:
    body = json.dumps({"username": username, "email": f"{username}@example.com",
                       "password": "bench-Pw-1234!"})
    conn.request("POST", "/api/auth/register", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read() or b"{}")
    return response.status, payload, time.time()


def watch_table(table: str, url: str, tick: float, ready, stop, results) -> None:
    """The watcher's child process for one context: poll ``table`` for rows past the last id
    seen, every ``tick`` s, until ``stop``; send back ``(first seen per user id, intervals
    between queries, queries, CPU seconds)``. A process of its own, so that neither the load
    generator's threads nor the other watchers hold it back (the GIL): its clock, monotonic, is
    the system's, the same as the bench's."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(urlparse(url).path, isolation_level=None)
        query = f"SELECT id, user_id FROM {table} WHERE id > ? ORDER BY id"
    else:
        import psycopg

        conn = psycopg.connect(url.replace("postgres://", "postgresql://", 1),
                               autocommit=True, prepare_threshold=0)
        query = f"SELECT id, user_id FROM {table} WHERE id > %s ORDER BY id"
    seen: dict[str, float] = {}
    last = conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]
    intervals, queries, previous = [], 0, None
    cpu = time.process_time()
    ready.set()
    while not stop.is_set():
        started = time.monotonic()
        rows = conn.execute(query, (last,)).fetchall()
        queries += 1
        for row_id, user_id in rows:
            seen.setdefault(str(uuid.UUID(str(user_id))), started)
            last = max(last, row_id)
        if previous is not None:
            intervals.append(started - previous)
        previous = started
        stop.wait(tick)
    conn.close()
    results.send((seen, intervals, queries, time.process_time() - cpu))


class RowWatcher:
    """When each user's default rows first became visible in each context's database, seen from
    outside: a process and a connection of its own per context database, polling its default
    table for rows past the last id it saw, every ``tick`` seconds while watching.

    A row's commit is stamped with the start of the first query that returned it (a READ
    COMMITTED statement sees what committed before it began), so each figure is late by at most
    one interval between queries: ``resolution()`` reports those intervals. The rows' own
    ``created_at`` would not do: it is set inside the consumer's transaction, before its commit.
    The cost to the stack: one indexed range scan per context per tick, usually empty.
    """

    def __init__(self, env: dict, tick: float):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.tick = tick
        self.seen: dict[str, dict[uuid.UUID, float]] = {}
        self.intervals: list[float] = []
        self.queries = 0
        self.cpu_seconds = 0.0  # the watchers' own CPU
        self._stop = context.Event()
        self._children = {}
        for name, model in default_models().items():
            ready, (receive, send) = context.Event(), context.Pipe(duplex=False)
            process = context.Process(
                target=watch_table, name=f"watch-{name}", daemon=True,
                args=(model._meta.db_table, env[f"{name.upper()}_DATABASE_URL"], tick, ready,
                      self._stop, send))
            self._children[name] = (process, ready, receive)

    def __enter__(self):
        for process, _, _ in self._children.values():
            process.start()
        for process, ready, _ in self._children.values():
            if not ready.wait(30):  # connected, and the last id of its table read
                raise RuntimeError(f"{process.name} did not start")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for name, (process, _, receive) in self._children.items():
            if receive.poll(30):
                seen, intervals, queries, cpu = receive.recv()
                self.seen[name] = {uuid.UUID(k): v for k, v in seen.items()}
                self.intervals += intervals
                self.queries += queries
                self.cpu_seconds += cpu
            process.join(10)

    def visible(self, user_id: uuid.UUID) -> float | None:
        """When the last of the four contexts' rows for ``user_id`` was first seen, or None."""
        times = [seen.get(user_id) for seen in self.seen.values()]
        return None if None in times else max(times)

    def resolution(self) -> dict:
        ms = [x * 1000 for x in self.intervals] or [0.0]
        return {"poll_tick_ms": round(self.tick * 1000, 1),
                "poll_interval_p50_ms": round(statistics.median(ms), 2),
                "poll_interval_p99_ms": round(percentile(ms, 0.99), 2),
                "poll_queries": self.queries,
                "poll_cpu_ms_per_query": round(self.cpu_seconds * 1000 / max(self.queries, 1),
                                               3)}


def stack_ready(stack: Stack, port: int, engine: str, timeout: float = 60) -> float:
    """Wait until the stack says it is ready, the way an operator's probes see it: the web's
    ``/readyz`` answers 200, every consumer has a pull request waiting on its durable and, on
    PostgreSQL, the relay LISTENs (its session's last statement, in ``pg_stat_activity``).
    Returns when that was (monotonic)."""
    from django.conf import settings
    from django.db import connections

    from onboarding.eventbus.outbox.notify import NOTIFY_CHANNEL
    from onboarding.eventbus.registry import get_consumers

    durables = [spec.durable for spec in get_consumers().values()]
    deadline = time.monotonic() + timeout

    def web_ready() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/readyz")
            return conn.getresponse().status == 200
        except OSError:
            return False

    async def pulling(js):
        return min([(await js.consumer_info(settings.NATS_STREAM, d)).num_waiting or 0
                    for d in durables]) > 0

    def relay_listening() -> bool:
        if engine != "postgres":
            return True
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND query = %s", [f"LISTEN {NOTIFY_CHANNEL}"])
            return cursor.fetchone()[0] > 0

    checks = [web_ready, lambda: on_jetstream(pulling), relay_listening]
    while checks:
        check_alive(stack.processes, "start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stack was not ready after {timeout}s")
        if checks[0]():
            checks.pop(0)
        else:
            time.sleep(0.05)
    return time.monotonic()


def latency_figures(latencies: list[float]) -> dict:
    if not latencies:
        return {"count": 0}
    return {"count": len(latencies), "p50_ms": round(statistics.median(latencies), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(max(latencies), 1)}


def scenario_latency(stack: Stack, rate: float, seconds: float, port: int, engine: str,
                     warmup: float = 3.0, tick: float = 0.002) -> dict:
    """From a cold start: the stack's processes start, the bench waits until they say they are
    ready, then registrations go at ``rate`` for ``warmup`` + ``seconds`` s (open loop). For
    each, the time from its 201 to the moment the last of the four contexts' rows became
    visible (:class:`RowWatcher`). Cold: the first second's (and the first 20) registrations;
    steady: those sent after ``warmup`` s."""
    # Rows already there (the grown scenario's prefill) are not this run's.
    baseline = {name: model.objects.count() for name, model in default_models().items()}
    launched = time.monotonic()
    stack.manage("outbox_relay")
    for context in CONTEXTS:
        stack.manage("consume", context)
    stack.gunicorn(port, ready_path="/readyz")
    ready = stack_ready(stack, port, engine)
    total = int(rate * (warmup + seconds))
    sent: list[tuple[int, uuid.UUID, float]] = []
    errors = []
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            status, payload, _ = http_register(local.conn, f"lat{i}")
            received = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported below
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            errors.append(repr(exc))
            return
        if status != 201:
            errors.append(f"{status} {payload}")
            return
        with lock:
            sent.append((i, uuid.UUID(payload["userId"]), received))

    from concurrent.futures import ThreadPoolExecutor

    with RowWatcher(stack.env, tick) as watcher:
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for i in range(total):  # open loop: send on schedule whatever the responses do
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(one, i)
                if i % 25 == 0:
                    progress("latency", i, total, started)
        progress("latency", total, total, started)
        wait_for_counts(len(sent), timeout=60, label="defaults", baseline=baseline)
        time.sleep(10 * tick)  # the watchers' last rows, seen by now
    missing = sum(watcher.visible(user) is None for _, user, _ in sent)
    if missing:
        raise RuntimeError(f"latency: the watchers missed {missing} registrations' rows")
    stack.stop()
    if errors:
        raise RuntimeError(f"latency: {len(errors)} failed registrations: {errors[:3]}")
    latency = {i: (watcher.visible(user) - received) * 1000 for i, user, received in sent}
    first_second = int(rate)
    return {
        "rate_per_s": rate,
        "registrations": total,
        "errors": len(errors),
        "ready_after_s": round(ready - launched, 2),
        **watcher.resolution(),
        "cold_first_20": latency_figures([latency[i] for i in sorted(latency)[:20]]),
        "cold_first_second": latency_figures(
            [ms for i, ms in latency.items() if i < first_second]),
        "cold_first_values_ms": [round(latency[i], 1) for i in sorted(latency)[:10]],
        "steady": latency_figures(
            [ms for i, ms in latency.items() if i >= int(rate * warmup)]),
    }


def closed_loop(port: int, requests: int, concurrency: int, prefix: str) -> float:
    """Send ``requests`` registrations from ``concurrency`` clients; return requests/s."""
    counter = iter(range(requests))
    lock = threading.Lock()
    failures = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, payload, _ = http_register(conn, f"{prefix}{i}")
            if status != 201:
                failures.append(payload)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} failed registrations: {failures[:3]}")
    return requests / (time.monotonic() - started)


def web_cpu_ms(web: subprocess.Popen) -> float:
    """CPU the gunicorn master and its workers have used, in ms (Linux; 0 elsewhere)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(web.pid)], capture_output=True,
                             text=True).stdout
    except FileNotFoundError:
        return 0.0
    return cpu_ms(web.pid) + sum(cpu_ms(int(pid)) for pid in out.split())


# The endpoint's own time is measured with this pause after each request: what the relay and
# nats-server do for an event then happens beside the requests, not inside the next one (on two
# shared cores they would otherwise take its core).
REGISTER_GAP_SECONDS = 0.01


def interleaved_times(ports: dict[str, int], requests: int, prefix: str,
                      webs: dict[str, subprocess.Popen]) -> tuple[dict, dict]:
    """One client, one registration at a time, alternating between the servers (ABBA order):
    each mode's request times in ms, and its web workers' CPU per request in ms."""
    conns = {mode: http.client.HTTPConnection("127.0.0.1", port, timeout=60)
             for mode, port in ports.items()}
    modes = list(ports)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_before = {mode: web_cpu_ms(web) for mode, web in webs.items()}
    for i in range(requests):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            started = time.perf_counter()
            status, payload, _ = http_register(conns[mode], f"{prefix}{mode}{i}")
            times[mode].append((time.perf_counter() - started) * 1000)
            if status != 201:
                raise RuntimeError(f"registration failed: {status} {payload}")
            time.sleep(REGISTER_GAP_SECONDS)
    cpu = {mode: (web_cpu_ms(web) - cpu_before[mode]) / requests for mode, web in webs.items()}
    return times, cpu


def scenario_register(stack: Stack, requests: int, rounds: int, port: int) -> dict:
    from onboarding.dev.natsserver import free_port

    modes = ("with_events", "without_events")
    rates = {mode: [] for mode in modes}
    # The endpoint's own time: one client at a time, so nothing queues and each request's time is
    # what the web worker spends on it. Both servers run at once and the requests alternate
    # between them, so that both modes see the same machine: on a shared one, the time of a
    # whole round moves by more than the event costs.
    times = {mode: [] for mode in modes}
    round_fractions = []
    # The web workers' CPU per sequential request: with a slow hasher, what bounds
    # registrations per second per core.
    web_cpu = {mode: [] for mode in modes}
    sequential = min(300, requests)
    ports = {"with_events": port, "without_events": free_port()}
    for r in range(rounds):
        reset_data()
        # The relay runs for both, on the same cores: with OUTBOX_FAST_PATH=notify (PostgreSQL)
        # or wake (SQLite) it is what publishes, and its CPU is part of the event's cost.
        stack.manage("outbox_relay")
        webs = {mode: stack.gunicorn(ports[mode], ACCOUNTS_PUBLISH_EVENTS="true"
                                     if mode == "with_events" else "false") for mode in modes}
        for mode in modes:
            closed_loop(ports[mode], min(200, requests), 4, f"warm{mode}{r}")  # warm up
        got, cpu = interleaved_times(ports, sequential, f"seq{r}", webs)
        for mode in modes:
            times[mode] += got[mode]
            web_cpu[mode].append(cpu[mode])
        round_fractions.append(round(statistics.median(got["with_events"])
                                     / statistics.median(got["without_events"]) - 1, 3))
        # Capacity: each mode alone in a closed loop, ABBA order across rounds.
        for mode in modes if r % 2 == 0 else modes[::-1]:
            rates[mode].append(closed_loop(ports[mode], requests, 4, f"reg{mode}{r}"))
        progress("register", r + 1, rounds, time.monotonic())
        stack.stop()
    with_events = statistics.median(rates["with_events"])
    without = statistics.median(rates["without_events"])
    time_with = statistics.median(times["with_events"])
    time_without = statistics.median(times["without_events"])
    cpu_with = statistics.median(web_cpu["with_events"])
    return {
        "sequential_requests_per_round": sequential,
        "gap_after_each_request_s": REGISTER_GAP_SECONDS,
        "with_events_ms": round(time_with, 2),
        "without_events_ms": round(time_without, 2),
        "event_time_fraction": round(time_with / time_without - 1, 3),
        "event_time_fraction_rounds": round_fractions,
        "web_cpu_ms_per_request_with_events": round(cpu_with, 2),
        "web_cpu_ms_per_request_without_events": round(
            statistics.median(web_cpu["without_events"]), 2),
        # One core spends this much per registration in the web workers: how many it serves.
        "registrations_per_s_per_core": round(1000 / cpu_with, 1) if cpu_with else None,
        "requests_per_round": requests,
        "concurrency": 4,
        "gunicorn_workers": 2,
        "relay_running": True,
        "rounds": rounds,
        "with_events_rounds": [round(x) for x in rates["with_events"]],
        "without_events_rounds": [round(x) for x in rates["without_events"]],
        "with_events_req_per_s": round(with_events),
        "without_events_req_per_s": round(without),
        "event_cost_fraction": round(1 - with_events / without, 3),
    }


def scenario_relay(rows: int, batch: int) -> dict:
    import asyncio

    from django.utils import timezone

    from onboarding.contracts import UserRegistered, event_headers
    from onboarding.eventbus.models import OutboxEvent
    from onboarding.eventbus.outbox.relay import OutboxRelay

    old = timezone.now() - dt.timedelta(minutes=5)
    objects = []
    for i in range(rows):
        event_id = uuid.uuid4()
        event = UserRegistered(user_id=uuid.uuid4(), username=f"relay{i}",
                               email=f"relay{i}@example.com", registration_timestamp=old)
        objects.append(OutboxEvent(event_id=event_id, subject=event.subject,
                                   payload=event.to_json().decode(),
                                   headers=event_headers(event, event_id=event_id),
                                   created_at=old))
    OutboxEvent.objects.bulk_create(objects, batch_size=1000)
    relay = OutboxRelay(grace=0, batch=batch)
    done = threading.Event()
    started = time.monotonic()

    def watch():
        while not done.wait(0.5):
            progress("relay", relay.published, rows, started)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    published = asyncio.run(relay.run(once=True))
    elapsed = time.monotonic() - started
    done.set()
    progress("relay", published, rows, started)
    assert published == rows, (published, rows)
    assert not OutboxEvent.objects.filter(published_at__isnull=True).exists()
    return {"rows": rows, "batch": batch, "events_per_s": round(rows / elapsed)}


def grown_latency(stack: Stack, rate: float, seconds: float, port: int,
                  **options) -> dict:
    """The latency scenario's measurement (from a cold start, rows polled from outside), on
    PostgreSQL's tables as they are (grown or empty)."""
    return scenario_latency(stack, rate, seconds, port, "postgres", **options)


def scenario_grown(stack: Stack, prefill: int, events: int, batch: int, run: int, port: int,
                   rate: float, seconds: float, nats_pid: int | None = None,
                   ordered_ids: bool = False, latency_options: dict | None = None) -> dict:
    """The drain and the latency on empty tables and on tables grown by ``prefill`` users
    (bench/grown.py: their inbox and outbox rows and their default rows, before any pruning),
    in one run; the order alternates across runs, so drift over a run cancels out.

    Event ids are time-ordered (UUIDv7), as the project mints them; user ids random (uuid4),
    as accounts makes them. ``ordered_ids``: an experiment — user ids, prefilled and drained,
    time-ordered too. The latency scenario's registrations keep the project's ids.
    """
    import grown

    from onboarding.eventbus.ids import uuid7

    new_user_id = uuid7 if ordered_ids else uuid.uuid4
    parts = ["empty", "grown"] if run % 2 == 0 else ["grown", "empty"]
    result: dict = {"prefill_users": prefill, "events": events, "batch": batch,
                    "user_ids": "time-ordered (UUIDv7)" if ordered_ids else "random (uuid4)",
                    "event_ids": "time-ordered (UUIDv7)"}
    for part in parts:
        print(f"  grown: {part} tables", file=sys.stderr)
        reset_data()
        reset_jetstream()
        prefilled = prefill if part == "grown" else 0
        if prefilled:
            result["disk"] = grown.check_disk(prefill)
            result["prefill"] = grown.prefill(prefill, CONTEXTS, ordered=ordered_ids)
            result["sizes"] = grown.sizes(prefill, CONTEXTS)
        users = [new_user_id() for _ in range(events)]
        publish_backlog(events, users, uuid7)
        drained = drain_phase(stack, "project", batch, users, nats_pid, prefilled=prefilled,
                              counters=grown.server_counters)
        latency = grown_latency(stack, rate, seconds, port, **(latency_options or {}))
        if not prefilled:
            reset_data()
        # On grown tables the ceiling inserts beside the prefilled rows: how much of the fall
        # the business tables' growth explains (the ceiling writes no inbox).
        ceiling = ceiling_rate(events, batch)
        result[part] = {
            "drain_events_per_s": drained["events_per_s"],
            "drain_seconds": drained["seconds"],
            "drain_cpu_ms_per_event": drained["cpu_ms_per_event"],
            "per_consumer_events_per_s": drained["per_consumer_events_per_s"],
            # Where the database server's work went, per event drained (WAL, buffers).
            "server_per_event": {key: round(value / drained["events_drained"], 3)
                                 for key, value in drained["counters"].items()},
            "ceiling_events_per_s": round(ceiling),
            "latency": latency,
        }
    if not prefill:
        return result
    empty_ceiling = result["empty"]["ceiling_events_per_s"]
    for part in ("empty", "grown"):
        # One ceiling for both (empty tables'): the ratios fall exactly as the drain rate does.
        result[part]["ratio_to_ceiling"] = round(
            result[part]["drain_events_per_s"] / empty_ceiling, 3)
    result["drain_fall"] = round(
        1 - result["grown"]["drain_events_per_s"] / result["empty"]["drain_events_per_s"], 3)
    result["ceiling_fall"] = round(
        1 - result["grown"]["ceiling_events_per_s"] / empty_ceiling, 3)
    reset_data()  # TRUNCATE gives the prefill's gigabytes back to the disk
    return result


# -- main ---------------------------------------------------------------------------------------


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def backlogs(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > 200_000:
        raise argparse.ArgumentTypeError("backlog sizes between 1 and 200000, comma-separated")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmarks of the onboarding event pipeline")
    parser.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--shared-database", action="store_true",
                        help="postgres: every context in one database (default: five databases, "
                             "accounts + one per context)")
    parser.add_argument("--events", type=backlogs, default=[5_000, 50_000],
                        help="drain backlog(s), comma-separated, e.g. 5000,50000 (max 200000)")
    parser.add_argument("--batch", type=int, default=100, help="consumer fetch/commit batch")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="drain: leave out the FastStream peer")
    parser.add_argument("--profile", action="store_true",
                        help="drain: run the consumers under cProfile and print where their "
                             "time goes per event (slows them: not for the ratios)")
    parser.add_argument("--profile-dir", help="drain, with --profile: keep the .prof files "
                        "there (pstats) instead of in the run's temporary folder")
    parser.add_argument("--rate", type=float, default=50.0, help="latency: registrations/s")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="latency: steady-state duration, after --warmup")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="latency: seconds after the cold start before steady state")
    parser.add_argument("--poll-ms", type=float, default=2.0,
                        help="latency: the database watcher's interval between queries")
    parser.add_argument("--requests", type=int, default=1000, help="register: per round")
    parser.add_argument("--hasher", choices=sorted(HASHERS), default="md5",
                        help="the password hasher (md5: fast, so that hashing does not hide the "
                             "pipeline; argon2: production's, e.g. --only register --requests 40)")
    parser.add_argument("--rounds", type=int, default=4, help="register: rounds (median)")
    parser.add_argument("--relay-rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3,
                        help="drain, latency, relay: runs (the table shows their medians)")
    parser.add_argument("--prefill", type=int, default=1_000_000,
                        help="grown: users prefilled (inbox, outbox, users, defaults); "
                             "1,000 to 5,000,000")
    parser.add_argument("--grown-events", type=int, default=50_000,
                        help="grown: the backlog drained on empty and on grown tables")
    parser.add_argument("--grown-ordered-ids", action="store_true",
                        help="grown, an experiment: time-ordered (UUIDv7) user ids too "
                             "(event ids are, as the project mints them)")
    parser.add_argument("--only", default="drain,latency,register,relay,grown")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    args.relay_rows = min(args.relay_rows, 200_000)
    args.runs = max(1, min(args.runs, 10))
    scenarios = set(args.only.split(","))
    args.prefill = max(1_000, min(args.prefill, 5_000_000))
    args.grown_events = max(args.batch, min(args.grown_events, 200_000))
    if "grown" in scenarios and args.engine != "postgres":
        # Prefilled with generate_series and sized with pg_relation_size; SQLite, the
        # development database, is not what grows to a million users.
        print("grown: skipped on SQLite (PostgreSQL only: --engine postgres)", file=sys.stderr)
        scenarios.discard("grown")
    peer_version = peer_available() if "drain" in scenarios and args.peer else None
    if "drain" in scenarios and args.peer and not peer_version:
        raise SystemExit("the drain's FastStream peer needs bench/requirements.txt "
                         "(make bench installs it; or pass --no-peer)")

    from onboarding.dev.natsserver import NatsServer, free_port

    with tempfile.TemporaryDirectory(prefix="bench-onboarding-") as tmp:
        workdir = Path(tmp)
        nats = NatsServer(workdir / "nats", name="bench-onboarding").start(
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        env = setup_django(args.engine, workdir, nats.url, args.shared_database,
                           HASHERS[args.hasher])
        label = databases_label(args.engine, {
            key: value for key, value in env.items() if key.endswith("DATABASE_URL")
            and key in ("DATABASE_URL", *(f"{c.upper()}_DATABASE_URL" for c in CONTEXTS))})
        results = {"engine": args.engine, "databases": label, "machine": machine(),
                   "hasher": HASHERS[args.hasher], "runs": args.runs}
        if peer_version:
            results["peer"] = f"FastStream {peer_version}"
        port = free_port()
        try:
            for name in ("drain", "latency", "register", "relay", "grown"):
                if name not in scenarios:
                    continue
                for events in args.events if name == "drain" else [None]:
                    # The register scenario already takes the median of its ABBA rounds.
                    runs = []
                    for run in range(1 if name == "register" else args.runs):
                        print(f"{args.engine}, {label}: {name}"
                              f"{f' {events:,} events' if events else ''} (run {run + 1})",
                              file=sys.stderr)
                        reset_data()
                        reset_jetstream()
                        with Stack(env, workdir) as stack:
                            if name == "drain":
                                runs.append(scenario_drain(
                                    stack, events, args.batch, args.peer, run,
                                    nats_pid=nats.process.pid,
                                    profile_dir=(Path(args.profile_dir) if args.profile_dir
                                                 else workdir / "profiles")
                                    if args.profile else None))
                            elif name == "latency":
                                runs.append(scenario_latency(
                                    stack, args.rate, args.seconds, port, args.engine,
                                    warmup=args.warmup, tick=args.poll_ms / 1000))
                            elif name == "register":
                                runs.append(scenario_register(stack, args.requests,
                                                              args.rounds, port))
                            elif name == "grown":
                                runs.append(scenario_grown(
                                    stack, args.prefill, args.grown_events, args.batch, run,
                                    port, args.rate, args.seconds, nats_pid=nats.process.pid,
                                    ordered_ids=args.grown_ordered_ids,
                                    latency_options={"warmup": args.warmup,
                                                     "tick": args.poll_ms / 1000}))
                            else:
                                runs.append(scenario_relay(args.relay_rows, 500))
                    merged = median_of(runs)
                    if len(runs) > 1:
                        merged["runs"] = runs
                    if name == "drain":
                        results.setdefault("drain", {})[str(events)] = merged
                    else:
                        results[name] = merged
        finally:
            from django.db import connections

            connections.close_all()
            nats.stop()

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    # A grown-tables run on its own (minutes of prefill) keeps a file of its own, so that it does
    # not replace the drain, latency and register figures of the same engine.
    path = output / (f"{args.engine}{'-shared' if args.shared_database else ''}"
                     f"{'' if args.hasher == 'md5' else '-' + args.hasher}"
                     f"{'-grown' if scenarios == {'grown'} else ''}.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\n(results: {path})")


def markdown(results: dict) -> str:
    engine = results["engine"]
    lines = [f"### {engine}, {results.get('databases', '')} (drain, latency, relay: median of "
             f"{results.get('runs', 1)} runs; register: median of its rounds)", "",
             "| scenario | result | target |", "| --- | --- | --- |"]
    for d in results.get("drain", {}).values():
        project = d["project"]
        peer = d.get("faststream")
        versus = (f" vs {results.get('peer', 'peer')} **{peer['ratio_to_ceiling']:.0%}**"
                  if peer else "")
        lines.append(f"| drain {d['events']:,} events, batch {d['batch']} | project "
                     f"**{project['ratio_to_ceiling']:.0%}** of the ceiling{versus} "
                     f"(ceiling {d['ceiling_events_per_s']:,} ev/s) | ≥ the peer's; aim ≥ 90% |")
    if "latency" in results:
        la = results["latency"]
        lines.append(
            f"| latency, steady, at {la['rate_per_s']:g}/s ({la['steady']['count']} regs after "
            f"the warm-up; polled every {la['poll_tick_ms']:g} ms, intervals p50 "
            f"{la['poll_interval_p50_ms']} / p99 {la['poll_interval_p99_ms']} ms) | p50 "
            f"**{la['steady']['p50_ms']} ms**, p95 {la['steady']['p95_ms']}, p99 "
            f"**{la['steady']['p99_ms']} ms**, max {la['steady']['max_ms']} | p99 ≤ 25 |")
        for key, what in (("cold_first_20", "first 20"), ("cold_first_second", "first second")):
            c = la[key]
            lines.append(
                f"| latency, cold: the {what} after the stack is ready ({c['count']} regs; ready "
                f"{la['ready_after_s']} s after start) | p50 {c['p50_ms']} ms, p95 "
                f"{c['p95_ms']}, p99 {c['p99_ms']}, max **{c['max_ms']} ms** | ≤ 50 |")
    if "register" in results:
        r = results["register"]
        hasher = results.get("hasher", FAST_HASHER).rsplit(".", 1)[-1]
        lines.append(f"| register: the endpoint's time (1 client, both modes interleaved, "
                     f"median; {hasher}) | "
                     f"{r['with_events_ms']} ms vs {r['without_events_ms']} ms without events: "
                     f"event costs **{r['event_time_fraction']:.1%}** | ≤ 10% |")
        if r.get("registrations_per_s_per_core"):
            lines.append(f"| register: web workers' CPU per registration ({hasher}) | "
                         f"{r['web_cpu_ms_per_request_with_events']} ms with events, "
                         f"{r['web_cpu_ms_per_request_without_events']} ms without: "
                         f"**{r['registrations_per_s_per_core']:g} registrations/s per core** "
                         "| — |")
        lines.append(f"| register: capacity (4 clients, everything on 2 cores) | "
                     f"{r['with_events_req_per_s']:,} vs {r['without_events_req_per_s']:,} "
                     f"req/s without events: event costs **{r['event_cost_fraction']:.1%}** "
                     "| — |")
    if "relay" in results:
        rl = results["relay"]
        lines.append(f"| relay {rl['rows']:,} rows | **{rl['events_per_s']:,} ev/s** | ≥ 5,000 |")
    if "grown" in results:
        g = results["grown"]
        grown_rate, empty_rate = (g[part]["drain_events_per_s"] for part in ("grown", "empty"))
        lines.append(f"| grown: drain {g['events']:,} events after {g['prefill_users']:,} users "
                     f"| {grown_rate:,} vs {empty_rate:,} ev/s on empty tables: falls "
                     f"**{g['drain_fall']:.0%}**; steady p99 "
                     f"{g['grown']['latency']['steady']['p99_ms']} vs "
                     f"{g['empty']['latency']['steady']['p99_ms']} ms "
                     "| fall ≤ 20% |")
    if results.get("drain"):
        lines += ["", f"Drain, side by side ({results.get('databases', '')}): from the moment "
                  "the four consumers, already started, are let loose on the backlog until every "
                  "row is visible, polled from outside; CPU over the same window, ms per event, "
                  "the four consumer processes together:", "",
                  "| backlog | drained by | ev/s | ratio to ceiling | players / characters / "
                  "progression / buildings ev/s | consumers CPU ms/ev | nats-server CPU ms/ev | "
                  "database server CPU ms/ev |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d in results["drain"].values():
            lines.append(f"| {d['events']:,} | ceiling (bulk_create, 1 process, no NATS) | "
                         f"{d['ceiling_events_per_s']:,} | 100% | | | | |")
            for phase, who in (("project", "project (4 consumers)"),
                               ("faststream", f"{results.get('peer', 'peer')} (4 processes)")):
                if phase not in d:
                    continue
                x = d[phase]
                per = " / ".join(f"{v:,}" for v in x["per_consumer_events_per_s"].values())
                cpu = x["cpu_ms_per_event"]
                lines.append(f"| {d['events']:,} | {who} | {x['events_per_s']:,} | "
                             f"**{x['ratio_to_ceiling']:.0%}** | {per} | "
                             f"{cpu['consumers']:.2f} | {cpu.get('nats-server', 0):.2f} | "
                             + (f"{cpu['postgres']:.2f} |" if "postgres" in cpu else "— |"))
        for d in results["drain"].values():
            profiled = {phase: d[phase]["profile_ms_per_event"] for phase in
                        ("project", "faststream") if d.get(phase, {}).get("profile_ms_per_event")}
            if not profiled:
                continue
            lines += ["", f"Where the consumers' time goes, {d['events']:,} events (cProfile, "
                      "every thread, from the drain's start to the processes' exit; ms per "
                      "event, the four processes summed; the profiler inflates Python-heavy "
                      "parts, so compare shares, not totals):", "",
                      "| part | " + " | ".join(profiled) + " |",
                      "| --- | " + " | ".join("---" for _ in profiled) + " |"]
            for part in next(iter(profiled.values())):
                cells = [profiled[phase].get(part, 0) for phase in profiled]
                if any(cells):
                    lines.append(f"| {part} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    if "grown" in results:
        lines += grown_markdown(results["grown"])
    return "\n".join(lines)


def grown_markdown(g: dict) -> list[str]:
    """The grown scenario's tables: empty against grown, then what the grown tables weigh."""
    lines = ["", f"Grown tables: the same {g['events']:,}-event drain (project, 4 consumers, batch "
             f"{g['batch']}) and latency, on empty tables and after prefilling "
             f"{g['prefill_users']:,} users (inbox and outbox rows, users, default rows; "
             f"{g.get('user_ids', 'random')} user ids, {g.get('event_ids', 'random')} event ids); "
             "ratios to the empty tables' ceiling:", "",
             "| tables | drain ev/s | ratio to ceiling | consumers CPU ms/ev | ceiling ev/s | "
             "latency, steady p50 / p99 ms | server per event drained: WAL kB (full-page images), "
             "blocks read from the OS, buffers written by backends, checkpoints in the drain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for part in ("empty", "grown"):
        x = g[part]
        server = x["server_per_event"]
        lines.append(f"| {part} | {x['drain_events_per_s']:,} | {x['ratio_to_ceiling']:.0%} | "
                     f"{x['drain_cpu_ms_per_event']['consumers']:.2f} | "
                     f"{x['ceiling_events_per_s']:,} | {x['latency']['steady']['p50_ms']} / "
                     f"{x['latency']['steady']['p99_ms']} | {server['wal_bytes'] / 1000:.1f} "
                     f"({server['wal_full_page_images']:.2f}), {server['blocks_read']:.1f}, "
                     f"{server['buffers_written_by_backends']:.1f}, "
                     f"{server['checkpoints'] * g['events']:.0f} |")
    lines.append(f"| fall | **{g['drain_fall']:.0%}** | | | {g['ceiling_fall']:.0%} | | |")
    lines += ["", f"Sizes per million users (prefill {g['prefill']['seconds']} s; MB; B-tree "
              "levels in brackets):", "",
              "| database.table | heap | indexes | total | each index |",
              "| --- | --- | --- | --- | --- |"]
    for table, x in g["sizes"].items():
        each = ", ".join(
            f"{name} {i['mb_per_million']}" + (f" [{i['btree_levels']}]" if "btree_levels" in i
                                                else "")
            for name, i in x["indexes"].items())
        lines.append(f"| {table} | {x['table_mb_per_million']} | "
                     f"{x['indexes_mb_per_million']} | {x['total_mb_per_million']} | {each} |")
    return lines


if __name__ == "__main__":
    main()

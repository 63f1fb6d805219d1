"""The bench's shared harness: where the data lives, the processes a scenario starts, and the
helpers every scenario uses (emptying the tables and the stream between runs, waiting for the
default rows, progress on stderr, CPU time from ``/proc``, one registration over HTTP).

Every other bench module that runs a scenario imports it (``run.py``, ``backlog.py``, each
``scenario_*.py``, ``report.py``, ``cpu.py``). It puts the project's root on ``sys.path`` (the
bench runs as scripts, not as an installed package), so import it before anything from the
project.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
import sys
import time
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


# -- processes ----------------------------------------------------------------------------------


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


def check_alive(processes: list[subprocess.Popen], label: str) -> None:
    for process in processes:
        if process.poll() is not None:
            log = getattr(process, "log_path", None)
            tail = log.read_text()[-2000:] if log else ""
            raise RuntimeError(f"{label}: a consumer exited ({process.returncode}):\n{tail}")


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a live process has used, in ms; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the ")": state is field 3, utime 14 and stime 15 (1-based, whole line).
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (gunicorn's workers)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


BENCH_PASSWORD = "bench-Pw-1234!"


def http_json(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None,
              token: str | None = None) -> tuple[int, dict]:
    """One JSON request on ``conn``; (status, the decoded body or {})."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Token {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def http_register(conn: http.client.HTTPConnection, username: str) -> tuple[int, dict, float]:
    status, payload = http_json(conn, "POST", "/api/auth/register", {
        "username": username, "email": f"{username}@example.com", "password": BENCH_PASSWORD})
    return status, payload, time.time()


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

    from onboarding.routers import PER_CONTEXT_MODELS

    tables: dict[str, set] = {}
    for model in apps.get_models():
        if model._meta.app_label in ("eventbus", "accounts", *CONTEXTS):
            # The inbox and the tombstones are in every context's database, and only there.
            aliases = (
                set(settings.CONTEXT_DATABASES.values())
                if model._meta.model_name in PER_CONTEXT_MODELS
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

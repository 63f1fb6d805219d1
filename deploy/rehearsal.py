"""``make rehearsal``: the production shape on this one machine, under fire.

It starts what ``docs/deploy.md`` tells a team to run, from the files in ``deploy/`` as they are:

- a 3-node NATS JetStream cluster (``deploy/nats/cluster-node.conf``: every role its own user
  with least privilege, TLS from a CA made for the run), the stream with three replicas;
- five databases: accounts and one per context (PostgreSQL when ``DATABASE_URL`` is set —
  ``<its name>_rehearsal`` and ``_rehearsal_<context>``, recreated — else SQLite files);
- the web app under gunicorn (``deploy/gunicorn.conf.py``, 2 workers), the relay and its hot
  standby, and two replicas of each consumer (accounts' own, which keeps the readiness
  projection, among them), each process with its own role's environment;

then sends a paced burst of registrations over HTTP while it SIGKILLs the NATS stream leader
(and brings it back later), one replica of each consumer and the active relay. It polls the four
context databases for each user from the moment its 201 arrived, and ends with a report:
registrations sent, 201s, users with all four defaults, lost, duplicated, dead letters, p50/p99
from the 201 to all four defaults (as committed, to within the 50 ms poll), the longest stall,
and how many users accounts' projection holds as ready (what the client's poll reads).
It exits 1 if anything was lost or duplicated (or refused, dead-lettered, or a process that was
not killed exited badly).

    make rehearsal                                   # SQLite
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/onboarding make rehearsal
    .venv/bin/python deploy/rehearsal.py --registrations 300 --rate 20

Bounded: at most --registrations requests (max 5000), to 127.0.0.1 only, and a deadline.
Registrations use a fast password hasher (the hash, not the event, bounds registrations per
second per core; see docs/deploy.md) unless --real-hasher.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onboarding.databases import bounded_contexts_of  # noqa: E402

# The bounded contexts, each with its own database (settings.BOUNDED_CONTEXTS, derived from
# the installed apps; read in a child process because the databases must be in the environment
# before Django reads its settings).
CONTEXTS = bounded_contexts_of()
FAST_HASHER = "django.contrib.auth.hashers.MD5PasswordHasher"
# The database role (manage.py db_roles) of a process, by its NATS role where they differ: the
# operator's tools read every database; provisioning and migrations run as the owner.
DB_ROLE_OF = {"monitor": "operator", "replay": "operator", "provision": "owner"}
POLL_SECONDS = 0.05


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- databases --------------------------------------------------------------------------------


def databases(workdir: Path) -> dict[str, str]:
    """Five databases for the rehearsal, never the developer's own: made fresh every run."""
    base = os.environ.get("DATABASE_URL", "")
    keys = ["DATABASE_URL", *(f"{c.upper()}_DATABASE_URL" for c in CONTEXTS)]
    if not base.startswith("postgres"):
        files = ["accounts", *CONTEXTS]
        return {key: f"sqlite:///{workdir / 'db' / name}.sqlite3"
                for key, name in zip(keys, files, strict=True)}
    import psycopg

    parsed = urlparse(base)
    stem = parsed.path.lstrip("/") + "_rehearsal"
    urls = {}
    with psycopg.connect(host=parsed.hostname or "127.0.0.1", port=parsed.port or 5432,
                         user=parsed.username or None, password=parsed.password or None,
                         dbname="postgres", autocommit=True) as admin:
        for key, suffix in zip(keys, ["", *(f"_{c}" for c in CONTEXTS)], strict=True):
            name = stem + suffix
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')
            urls[key] = parsed._replace(path=f"/{name}").geturl()
    return urls


# -- processes --------------------------------------------------------------------------------


class Process:
    def __init__(self, label: str, args: list[str], env: dict, workdir: Path):
        self.label = label
        self.log_path = workdir / "logs" / f"{label}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(self.log_path, "w"),
                                      stderr=subprocess.STDOUT)
        self.killed = False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        self.killed = True
        self.popen.kill()
        self.popen.wait()

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise SystemExit(f"rehearsal: timed out after {timeout:.0f}s waiting for {what}")


class Stack:
    """The production shape's processes, each with its own role's environment."""

    def __init__(self, workdir: Path, base_env: dict, nats) -> None:
        self.workdir, self.base_env, self.nats = workdir, base_env, nats
        self.processes: list[Process] = []
        # PostgreSQL: once `manage.py db_roles` ran, each process connects as its own role.
        self.db_prefix: str | None = None

    def env(self, role: str, **extra) -> dict:
        env = {**self.base_env, **self.nats.env_for(role), **extra}
        db_role = DB_ROLE_OF.get(role, role)
        if self.db_prefix and db_role in ("web", "relay", "accounts", *CONTEXTS, "operator"):
            for key in ("DATABASE_URL", *(f"{c.upper()}_DATABASE_URL" for c in CONTEXTS)):
                url = urlparse(env[key])
                env[key] = url._replace(
                    netloc=f"{self.db_prefix}_{db_role}@{url.hostname}:{url.port or 5432}"
                ).geturl()
        return env

    def manage(self, label: str, role: str, *args: str, **extra) -> Process:
        process = Process(label, [sys.executable, str(ROOT / "manage.py"), *args],
                          self.env(role, **extra), self.workdir)
        self.processes.append(process)
        return process

    def gunicorn(self, port: int, workers: int) -> Process:
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        process = Process(
            "web", [gunicorn, "-c", str(ROOT / "deploy" / "gunicorn.conf.py"), "onboarding.wsgi"],
            self.env("web", GUNICORN_BIND=f"127.0.0.1:{port}", WEB_CONCURRENCY=str(workers)),
            self.workdir,
        )
        self.processes.append(process)
        return process

    def stop(self) -> dict[str, int]:
        """SIGTERM everything still running; the exit codes of those that were not killed."""
        for process in self.processes:
            if process.alive():
                process.popen.send_signal(signal.SIGTERM)
        return {p.label: p.stop() for p in self.processes if not p.killed}


def run_once(stack: Stack, label: str, role: str, *args: str, timeout: float = 60) -> str:
    process = stack.manage(label, role, *args)
    try:
        code = process.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise SystemExit(f"rehearsal: {label} did not finish in {timeout:.0f}s") from None
    stack.processes.remove(process)
    if code != 0:
        raise SystemExit(f"rehearsal: {label} exited {code}:\n{process.output()[-2000:]}")
    return process.output()


# -- the burst and what it shows ------------------------------------------------------------


class Watch:
    """Registrations in flight: when each 201 arrived, when its four defaults were all seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, float] = {}  # userId -> monotonic time of its 201
        self.created_at: dict[str, float] = {}  # the same, kept
        self.latencies: dict[str, float] = {}
        self.completions: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()

    def registered(self, user_id: str, at: float) -> None:
        with self.lock:
            self.pending[user_id] = at
            self.created_at[user_id] = at

    def poll_forever(self) -> None:
        from buildings.models import Building
        from characters.models import Character
        from players.models import Player
        from progression.models import MetaProgression

        models = (Player, Character, MetaProgression, Building)
        while not self.stop.is_set():
            with self.lock:
                waiting = list(self.pending)
            for start in range(0, len(waiting), 500):
                chunk = waiting[start:start + 500]
                complete = set(chunk)
                for model in models:
                    found = set(map(str, model.objects.filter(user_id__in=complete)
                                    .values_list("user_id", flat=True)))
                    complete &= found
                now = time.monotonic()
                with self.lock:
                    for user_id in complete:
                        self.latencies[user_id] = now - self.pending.pop(user_id)
                        self.completions.append(now)
            time.sleep(POLL_SECONDS)

    def longest_stall(self, since: float, until: float) -> float:
        """The longest time in which users were waiting and none of them completed (until the
        last completion, or the end of the wait when some never completed)."""
        end = until if self.pending else max(self.completions, default=since)
        marks = sorted([since, *self.completions, end])
        gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return max(gaps, default=0.0)


def register(port: int, username: str, watch: Watch) -> None:
    body = json.dumps({"username": username, "email": f"{username}@example.com",
                       "password": "rehearsal-Pw-1234!"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/auth/register", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
            status = response.status
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()[:200]
    except OSError as exc:
        status, payload = 0, repr(exc)
    arrived = time.monotonic()
    with watch.lock:
        watch.statuses[status] = watch.statuses.get(status, 0) + 1
        if status != 201:
            watch.errors.append(f"{username}: {status} {payload!r}"[:300])
    if status == 201:
        watch.registered(payload["userId"], arrived)


def active_relay(relays: list[Process]) -> Process | None:
    for relay in relays:
        if relay.alive() and re.search(r"relay: active", relay.output()):
            return relay
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


# The consumers' line per handled event (onboarding.eventbus.events, INFO): "processed" when it
# was applied, "duplicate skipped" when the inbox already held it.
APPLIED = re.compile(r"consumer (\w+): processed seq=")


def applied_per_consumer(processes: list[Process]) -> dict[str, int]:
    """Events each consumer applied, summed over its replicas' logs (the killed ones too).

    The database cannot show an event applied twice (the services are idempotent by their
    constraints); the logs can: more applications than registrations is a duplicate delivery
    that got past the inbox.
    """
    applied: dict[str, int] = {}
    for process in processes:
        for name in APPLIED.findall(process.output()):
            applied[name] = applied.get(name, 0) + 1
    return applied


def sessions_per_process() -> dict[str, int]:
    """PostgreSQL sessions on the rehearsal's databases, by ``application_name`` (the process
    type: web, relay, relay-listen, relay-lock, consume:<context>...), every replica together."""
    from django.conf import settings
    from django.db import connection

    names = sorted({config["NAME"] for config in settings.DATABASES.values()})
    with connection.cursor() as cursor:
        cursor.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                       "WHERE datname = ANY(%s) AND pid <> pg_backend_pid() "
                       "GROUP BY 1 ORDER BY 1", [names])
        # Unnamed: this script's own connections to the other databases (it counts the rows).
        return {name or "(this script)": count for name, count in cursor.fetchall()}


def projection_complete(user_ids: list[str]) -> int:
    """Users every service announced as set up, in accounts' readiness projection: what the
    client's ``GET /api/auth/me/onboarding`` reads."""
    from django.db.models import Count

    from accounts.models import ServiceReadiness

    ready = 0
    for start in range(0, len(user_ids), 500):
        ready += (ServiceReadiness.objects
                  .filter(user_id__in=user_ids[start:start + 500], onboarded_at__isnull=False,
                          erased_at__isnull=True)
                  .values("user_id").annotate(n=Count("service"))
                  .filter(n=len(CONTEXTS)).count())
    return ready


def check_exactly_once(user_ids: list[str]) -> tuple[int, int, int]:
    """(users with all four defaults, users missing some, users with some twice)."""
    from django.db.models import Count

    from buildings.models import Building
    from characters.models import Character
    from players.models import Player
    from progression.models import MetaProgression

    expected = {Player: 1, Character: 1, MetaProgression: 1, Building: 2}
    per_model = {}
    for model in expected:
        counts = {}
        for start in range(0, len(user_ids), 500):
            rows = (model.objects.filter(user_id__in=user_ids[start:start + 500])
                    .values("user_id").annotate(n=Count("id")).values_list("user_id", "n"))
            counts.update({str(user_id): n for user_id, n in rows})
        per_model[model] = counts
    complete = missing = twice = 0
    for user_id in user_ids:
        seen = [per_model[model].get(user_id, 0) for model in expected]
        wanted = list(expected.values())
        if any(n > w for n, w in zip(seen, wanted, strict=True)):
            twice += 1
        if any(n < w for n, w in zip(seen, wanted, strict=True)):
            missing += 1
        else:
            complete += 1
    return complete, missing, twice


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registrations", type=int, default=600)
    parser.add_argument("--rate", type=float, default=20.0, help="registrations per second")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--workdir", type=Path, help="default: var/rehearsal/<time>")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="seconds to wait after the burst for every default")
    parser.add_argument("--real-hasher", action="store_true",
                        help="the settings' password hasher instead of a fast one")
    args = parser.parse_args()
    n = max(20, min(args.registrations, 5000))  # enough for four distinct kill points
    workdir = args.workdir or ROOT / "var" / "rehearsal" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "db").mkdir(exist_ok=True)
    log(f"rehearsal in {workdir}")

    from onboarding.dev.natsserver import SecuredNats, free_port

    nats = SecuredNats(workdir / "nats", nodes=3, name="rehearsal").start()
    stack = None
    try:
        engine = "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgres") \
            else "sqlite"
        # Nothing of the developer's own NATS or database settings leaks into the shape.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("NATS_") and not k.endswith("DATABASE_URL")}
        base_env = {
            **inherited,
            **databases(workdir),
            "DJANGO_SETTINGS_MODULE": "onboarding.settings",
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            # The harness talks plain HTTP to gunicorn on 127.0.0.1 (in production a proxy in
            # front terminates TLS and sets DJANGO_SECURE_PROXY_SSL_HEADER instead).
            "DJANGO_SECURE_SSL_REDIRECT": "false",
            "CACHE_URL": "dbcache://onboarding_cache",  # one throttle for every web worker
            "REGISTER_THROTTLE_RATE": "",  # the whole burst comes from one address
            "NATS_STREAM_REPLICAS": "3",
            # The per-event lines are what the report counts applications from.
            "LOG_LEVEL": "INFO", "EVENT_LOG_LEVEL": "INFO", "LOG_FORMAT": "plain",
            "PYTHONUNBUFFERED": "1",
            # The background reconcile runs on the relay's roles, through the kills: it must
            # find nothing to re-deliver (a user is only late there, never lost), and every pass
            # must go through (the relay's NATS and database grants).
            "RECONCILE_INTERVAL": "2", "RECONCILE_MIN_AGE": "20",
        }
        if not args.real_hasher:
            base_env["DJANGO_PASSWORD_HASHERS"] = FAST_HASHER
        # This process reads the same databases, and asks NATS as the monitoring role.
        os.environ.update({**base_env, **nats.env_for("monitor")})
        import django

        django.setup()
        stack = Stack(workdir, base_env, nats)
        log(f"NATS cluster up: {', '.join(s.name for s in nats.servers)}; databases: {engine}")
        run_once(stack, "migrate", "provision", "migrate_all", "-v", "0")
        if engine == "postgresql":  # a role per process type, each its own tables only
            run_once(stack, "db-roles", "provision", "db_roles", "--prefix", "rehearsal")
            stack.db_prefix = "rehearsal"
        wait_for(lambda: _provisioned(stack), 60, "setup_jetstream on the cluster", interval=1)
        log("migrated; stream provisioned with 3 replicas")

        port = free_port()
        stack.gunicorn(port, args.workers)
        relays = [stack.manage("relay-1", "relay", "outbox_relay")]
        wait_for(lambda: active_relay(relays), 30, "the first relay to be active")
        relays.append(stack.manage("relay-2", "relay", "outbox_relay"))
        consumers = {name: [stack.manage(f"{name}-{i}", name, "consume", name) for i in (1, 2)]
                     for name in CONTEXTS}
        # Accounts' own consumer: the services' announcements, into the readiness projection.
        projection = [stack.manage(f"accounts-{i}", "accounts", "consume", "accounts")
                      for i in (1, 2)]
        wait_for(lambda: _answers(port), 30, "gunicorn")
        wait_for(lambda: all("consumers started" in p.output()
                             for ps in [*consumers.values(), projection] for p in ps), 30,
                 "the consumers")
        log(f"up: gunicorn ({args.workers} workers) on :{port}, 2 relays (1 standby), "
            f"2 replicas of each of {len(CONTEXTS)} consumers and of accounts' projection")

        watch = Watch()
        poller = threading.Thread(target=watch.poll_forever, daemon=True)
        poller.start()
        plan = {int(n * 0.25): "kill the NATS stream leader",
                int(n * 0.40): "kill one replica of each consumer",
                int(n * 0.55): "kill the active relay",
                int(n * 0.75): "restart the killed NATS node",
                int(n * 0.85): "wipe a NATS follower's store and restart it"}
        events: list[str] = []
        killed_node = wiped_node = None
        started = time.monotonic()
        first_kill_at = started + min(plan) / args.rate
        with ThreadPoolExecutor(8) as pool:
            for i in range(n):  # open loop: on schedule, whatever the responses do
                delay = started + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if i in plan:
                    at = time.monotonic() - started
                    if plan[i] == "kill the NATS stream leader":
                        leader = nats.stream_leader()
                        killed_node = nats.server_named(leader)
                        killed_node.kill()
                        events.append(f"{at:.1f}s: SIGKILL NATS stream leader {leader}")
                    elif plan[i] == "kill one replica of each consumer":
                        for replicas in [*consumers.values(), projection]:
                            replicas[0].kill()
                        events.append(f"{at:.1f}s: SIGKILL one replica of each consumer")
                    elif plan[i] == "kill the active relay":
                        relay = active_relay(relays)
                        if relay is None:
                            events.append(f"{at:.1f}s: no active relay to kill!")
                        else:
                            relay.kill()
                            events.append(f"{at:.1f}s: SIGKILL the active relay {relay.label}")
                    elif plan[i] == "restart the killed NATS node" and killed_node is not None:
                        nats.start_server(killed_node)
                        events.append(f"{at:.1f}s: restarted NATS node {killed_node.name}")
                    elif plan[i] == "wipe a NATS follower's store and restart it":
                        # A node whose disk was lost: it comes back empty and must catch up
                        # from the other two (issue 19).
                        leader = nats.stream_leader()
                        followers = [s for s in nats.servers if s.name != leader]
                        # Not the node restarted a moment ago, when the other follower is there.
                        wiped_node = next((s for s in followers if s is not killed_node),
                                          followers[0])
                        nats.wipe(wiped_node)
                        nats.start_server(wiped_node)
                        events.append(f"{at:.1f}s: SIGKILL NATS follower {wiped_node.name}, "
                                      "its store deleted, restarted empty")
                    log(events[-1])
                pool.submit(register, port, f"rh{i}", watch)
        burst_seconds = time.monotonic() - started
        log(f"burst sent: {n} registrations in {burst_seconds:.1f}s")
        try:
            wait_for(lambda: not watch.pending, args.settle, "every user's four defaults",
                     interval=0.5)
            wait_for(lambda: projection_complete(list(watch.created_at)) == len(watch.created_at),
                     30, "every user ready in accounts' projection", interval=0.5)
        except SystemExit as exc:
            log(str(exc))  # the report says how many are missing
        settled_at = time.monotonic()
        caught_up = None
        if wiped_node is not None:
            try:
                wait_for(lambda: nats.stream_followers().get(wiped_node.name) == (True, 0), 60,
                         "the wiped node caught up", interval=0.5)
            except SystemExit as exc:
                log(str(exc))
            current, lag = nats.stream_followers().get(wiped_node.name, (False, -1))
            caught_up = {"node": wiped_node.name, "current": current, "lag": lag}
        sessions = sessions_per_process() if engine == "postgresql" else {}
        watch.stop.set()
        poller.join(5)
        from django.db import connections

        connections.close_all()
        took_over = [r.label for r in relays[1:] if "relay: active" in r.output()]
        relay_logs = "".join(r.output() for r in relays)
        failures = [line for line in relay_logs.splitlines()
                    if "reconcile (background) failed" in line]
        # A pass that fails during the leader's election (a timeout) is tried again, as it
        # should be; one refused by NATS or the database is a grant missing, and fails this.
        healing = {"passes": relay_logs.count("reconcile (background): "),
                   "failed": len(failures),
                   "refused": sum(1 for line in failures
                                  if "ermission" in line or "denied" in line),
                   "found_missing": relay_logs.count("never set up")}

        from onboarding.eventbus.models import DeadLetter, OutboxEvent

        user_ids = list(watch.created_at)  # every 201, completed or not
        complete, missing, twice = check_exactly_once(user_ids)
        created = watch.statuses.get(201, 0)
        applied = applied_per_consumer([p for ps in consumers.values() for p in ps])
        applied_twice = {name: count - created for name, count in applied.items()
                         if count > created}
        latencies_ms = [s * 1000 for s in watch.latencies.values()]
        # Before the first kill: the shape's everyday latency, with every process on 2 cores.
        steady_ms = [s * 1000 for user_id, s in watch.latencies.items()
                     if watch.created_at[user_id] < first_kill_at]
        report = {
            "engine": engine,
            "registrations_sent": n,
            "created_201": created,
            "other_statuses": {str(k): v for k, v in watch.statuses.items() if k != 201},
            "users_with_all_four_defaults": complete,
            "users_ready_in_the_projection": projection_complete(user_ids),
            "lost": missing,
            "duplicated": twice,
            "applied_per_consumer": applied,
            "applied_more_than_once": applied_twice,
            "dead_letters": DeadLetter.objects.filter(resolved_at__isnull=True).count(),
            "outbox_unpublished": OutboxEvent.objects.filter(published_at__isnull=True).count(),
            "p50_ms": round(statistics.median(latencies_ms), 1) if latencies_ms else None,
            "p99_ms": round(percentile(latencies_ms, 0.99), 1),
            "max_ms": round(max(latencies_ms, default=0), 1),
            "before_kills": {
                "users": len(steady_ms),
                "p50_ms": round(statistics.median(steady_ms), 1) if steady_ms else None,
                "p99_ms": round(percentile(steady_ms, 0.99), 1),
            },
            "longest_stall_s": round(watch.longest_stall(started, settled_at), 2),
            "burst_seconds": round(burst_seconds, 1),
            "rate_per_s": args.rate,
            "events": events,
            "standby_took_over": took_over,
            "wiped_node_caught_up": caught_up,
            "background_reconcile": healing,
            "database_sessions": sessions,
            "hasher": "settings" if args.real_hasher else "MD5 (fast)",
        }
    finally:
        codes = stack.stop() if stack is not None else {}
        nats.stop()
    bad_exits = {label: code for label, code in codes.items() if code != 0}
    report["unclean_exits"] = bad_exits
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(markdown(report))
    failed = (report["lost"] or report["duplicated"] or report["applied_more_than_once"]
              or report["users_with_all_four_defaults"] != report["created_201"]
              or report["users_ready_in_the_projection"] != report["created_201"]
              or report["other_statuses"]
              or report["dead_letters"] or bad_exits or not report["standby_took_over"]
              or not (caught_up and caught_up["current"] and caught_up["lag"] == 0)
              or not report["background_reconcile"]["passes"]
              or report["background_reconcile"]["refused"]
              or report["background_reconcile"]["found_missing"])
    if watch.errors:
        print("first errors:\n  " + "\n  ".join(watch.errors[:5]))
    print(f"logs and report.json in {workdir}")
    print("REHEARSAL FAILED" if failed else "REHEARSAL PASSED")
    return 1 if failed else 0


def _provisioned(stack: Stack) -> bool:
    process = stack.manage("setup_jetstream", "provision", "setup_jetstream", "--wait", "10")
    try:
        code = process.popen.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = -1
    stack.processes.remove(process)
    return code == 0


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def markdown(report: dict) -> str:
    rows = [
        ("database", report["engine"]),
        ("registrations sent", report["registrations_sent"]),
        ("201 Created", report["created_201"]),
        ("other responses", report["other_statuses"] or "none"),
        ("users with all four defaults", report["users_with_all_four_defaults"]),
        ("users ready in accounts' projection (GET /api/auth/me/onboarding)",
         report["users_ready_in_the_projection"]),
        ("lost", report["lost"]),
        ("duplicated (users with a default twice)", report["duplicated"]),
        ("events applied per consumer (over all replicas)",
         ", ".join(f"{k} {v}" for k, v in sorted(report["applied_per_consumer"].items()))),
        ("events applied more than once", report["applied_more_than_once"] or "none"),
        ("dead letters", report["dead_letters"]),
        ("201 → all four defaults p50 / p99 / max",
         f"{report['p50_ms']} / {report['p99_ms']} / {report['max_ms']} ms"),
        ("the same, users registered before the first kill",
         f"{report['before_kills']['p50_ms']} / {report['before_kills']['p99_ms']} ms "
         f"({report['before_kills']['users']} users)"),
        ("longest stall (users waiting, none completing)", f"{report['longest_stall_s']} s"),
        ("burst", f"{report['registrations_sent']} at {report['rate_per_s']}/s "
                  f"in {report['burst_seconds']} s; hasher {report['hasher']}"),
        ("relay standby took over", ", ".join(report["standby_took_over"]) or "NO"),
        ("NATS node wiped mid-burst, caught up from the others",
         (lambda c: f"{c['node']}: current {c['current']}, lag {c['lag']}" if c else "NO")(
             report["wiped_node_caught_up"])),
        ("background reconcile: passes done / failed and retried / refused / found users "
         "never set up", "{passes} / {failed} / {refused} / {found_missing}".format(
             **report["background_reconcile"])),
        ("processes that exited badly", report["unclean_exits"] or "none"),
        ("database sessions at the end, per process type (all replicas)",
         ", ".join(f"{k} {v}" for k, v in report["database_sessions"].items()) or "-"),
    ]
    lines = ["| rehearsal | result |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "kills:", *(f"- {event}" for event in report["events"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The latency scenario: from a cold start, registrations over HTTP at a steady rate; for each,
the time from its 201 to the moment the last of the four contexts' default rows became visible,
watched from outside (``RowWatcher``). The grown scenario measures it on grown tables too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import statistics
import threading
import time
import uuid
from urllib.parse import urlparse

from backlog import on_jetstream
from harness import (
    CONTEXTS,
    Stack,
    check_alive,
    children,
    cpu_ms,
    default_models,
    http_register,
    percentile,
    progress,
    wait_for_counts,
)
from scenario_drain import server_cpu_ms


def watch_table(table: str, url: str, tick: float, ready, stop, results,
                where: str = "") -> None:
    """The watcher's child process for one context: poll ``table`` (its rows matching
    ``where``, a fixed SQL condition, when given) for rows past the last id seen, every
    ``tick`` s, until ``stop``; send back ``(first seen per user id, intervals between queries,
    queries, CPU seconds)``. A process of its own, so that neither the load generator's threads
    nor the other watchers hold it back (the GIL): its clock, monotonic, is the system's, the
    same as the bench's."""
    also = f" AND {where}" if where else ""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(urlparse(url).path, isolation_level=None)
        query = f"SELECT id, user_id FROM {table} WHERE id > ?{also} ORDER BY id"
    else:
        import psycopg

        conn = psycopg.connect(url.replace("postgres://", "postgresql://", 1),
                               autocommit=True, prepare_threshold=0)
        query = f"SELECT id, user_id FROM {table} WHERE id > %s{also} ORDER BY id"
    seen: dict[str, float] = {}
    last = conn.execute(
        f"SELECT coalesce(max(id), 0) FROM {table}{f' WHERE {where}' if where else ''}"
    ).fetchone()[0]
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


def send_open_loop(label: str, total: int, rate: float, one) -> None:
    """Call ``one(i)`` for i in range(total) on 8 threads, ``rate`` a second on schedule, open
    loop: each is sent on time whatever the earlier ones' responses do."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        for i in range(total):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
            if i % 25 == 0:
                progress(label, i, total, started)
    progress(label, total, total, started)


class RowWatcher:
    """When each user's default rows first became visible in each context's database, seen from
    outside: a process and a connection of its own per context database, polling its default
    table for rows past the last id it saw, every ``tick`` seconds while watching.

    ``tables`` (``{context: (table, condition)}``) watches other tables instead, e.g. each
    context's tombstones (the erasure scenario): the condition (``context = 'players'``) keeps
    one context's rows when the contexts share a database, and with them the order of their
    ids (one consumer process commits them, one transaction after another).

    A row's commit is stamped with the start of the first query that returned it (a READ
    COMMITTED statement sees what committed before it began), so each figure is late by at most
    one interval between queries: ``resolution()`` reports those intervals. The rows' own
    ``created_at`` would not do: it is set inside the consumer's transaction, before its commit.
    The cost to the stack: one indexed range scan per context per tick, usually empty.
    """

    def __init__(self, env: dict, tick: float,
                 tables: dict[str, tuple[str, str]] | None = None):
        import multiprocessing

        if tables is None:
            tables = {name: (model._meta.db_table, "")
                      for name, model in default_models().items()}
        context = multiprocessing.get_context("spawn")
        self.tick = tick
        self.seen: dict[str, dict[uuid.UUID, float]] = {}
        self.intervals: list[float] = []
        self.queries = 0
        self.cpu_seconds = 0.0  # the watchers' own CPU
        self._stop = context.Event()
        self._children = {}
        for name, (table, where) in tables.items():
            ready, (receive, send) = context.Event(), context.Pipe(duplex=False)
            process = context.Process(
                target=watch_table, name=f"watch-{name}", daemon=True,
                args=(table, env[f"{name.upper()}_DATABASE_URL"], tick, ready, self._stop,
                      send, where))
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


class EndpointPoller:
    """When each user's ``GET /api/users/{userId}/onboarding`` first said ``complete: true``,
    polled from outside over HTTP as a client would (with a staff token): one thread, its own
    connection, every pending user once per ``interval`` seconds. A user's time is the start of
    the request that first said so (what it read committed after that, at the latest when it
    answered), so each figure is late by at most one interval; ``resolution()`` reports them.
    The polls load the web as clients polling would: at 50 registrations/s, about 50 ms of
    pending per user, a 20 ms interval sends ~125 requests/s.
    """

    def __init__(self, port: int, token: str, interval: float) -> None:
        self.port, self.token, self.interval = port, token, interval
        self.pending: dict[uuid.UUID, float] = {}  # user -> when its 201 arrived
        self.complete: dict[uuid.UUID, float] = {}
        self.rounds: list[float] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endpoint-poller", daemon=True)

    def add(self, user_id: uuid.UUID, received: float) -> None:
        with self._lock:
            self.pending[user_id] = received

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Token {self.token}"}
        previous = None
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                users = list(self.pending)
            for user_id in users:
                asked = time.monotonic()
                conn.request("GET", f"/api/users/{user_id}/onboarding", headers=headers)
                response = conn.getresponse()
                body = response.read()
                self.requests += 1
                if response.status == 200 and json.loads(body)["complete"]:
                    with self._lock:
                        self.complete[user_id] = asked
                        self.pending.pop(user_id, None)
            if users:
                if previous is not None:
                    self.rounds.append(started - previous)
                previous = started
            else:
                previous = None
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        conn.close()

    def resolution(self) -> dict:
        ms = [x * 1000 for x in self.rounds] or [0.0]
        return {"endpoint_poll_interval_ms": round(self.interval * 1000, 1),
                "endpoint_round_p50_ms": round(statistics.median(ms), 2),
                "endpoint_round_p99_ms": round(percentile(ms, 0.99), 2),
                "endpoint_requests": self.requests}


def staff_token(username: str = "bench-staff") -> str:
    """A staff user's API token, made directly (not timed): the poller's credentials."""
    from accounts.models import User
    from accounts.services import user_register, user_token_get_or_create

    user = User.objects.filter(username=username).first() or user_register(
        username=username, email=f"{username}@example.com", password=None, is_staff=True)
    return user_token_get_or_create(user=user).key


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


def cpu_by_process(groups: dict[str, list[int]], engine: str) -> dict[str, float]:
    """CPU ms used so far by each group of processes (and, on PostgreSQL, by the server)."""
    taken = {name: sum(cpu_ms(pid) for pid in pids) for name, pids in groups.items()}
    if engine == "postgres":
        taken["postgres (all backends)"] = server_cpu_ms()
    return taken


def latency_figures(latencies: list[float]) -> dict:
    if not latencies:
        return {"count": 0}
    return {"count": len(latencies), "p50_ms": round(statistics.median(latencies), 1),
            "p95_ms": round(percentile(latencies, 0.95), 1),
            "p99_ms": round(percentile(latencies, 0.99), 1),
            "max_ms": round(max(latencies), 1)}


def scenario_latency(stack: Stack, rate: float, seconds: float, port: int, engine: str,
                     warmup: float = 3.0, tick: float = 0.002,
                     endpoint_poll: float | None = None, nats_pid: int | None = None) -> dict:
    """From a cold start: the stack's processes start, the bench waits until they say they are
    ready, then registrations go at ``rate`` for ``warmup`` + ``seconds`` s (open loop). For
    each, the time from its 201 to the moment the last of the four contexts' rows became
    visible (:class:`RowWatcher`). Cold: the first second's (and the first 20) registrations;
    steady: those sent after ``warmup`` s.

    With ``endpoint_poll`` (seconds; the ``readiness`` scenario), also the time from its 201 to
    the readiness endpoint's ``complete: true`` (:class:`EndpointPoller`): the services'
    announcements, published by their consume processes, through ``consume accounts`` into
    accounts' projection."""
    # Rows already there (the grown scenario's prefill) are not this run's.
    baseline = {name: model.objects.count() for name, model in default_models().items()}
    token = staff_token() if endpoint_poll else None
    launched = time.monotonic()
    groups = {"relay": [stack.manage("outbox_relay").pid]}
    for context in CONTEXTS:
        groups[f"consume {context}"] = [stack.manage("consume", context).pid]
    # The readiness projection: part of the shape.
    groups["consume accounts"] = [stack.manage("consume", "accounts").pid]
    web = stack.gunicorn(port, ready_path="/readyz")
    groups["web (gunicorn)"] = [web.pid, *children(web.pid)]
    if nats_pid:
        groups["nats-server"] = [nats_pid]
    ready = stack_ready(stack, port, engine)
    cpu_start = cpu_by_process(groups, engine)
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
        if poller is not None:
            poller.add(uuid.UUID(payload["userId"]), received)

    poller = EndpointPoller(port, token, endpoint_poll) if endpoint_poll else None
    with RowWatcher(stack.env, tick) as watcher, poller or contextlib.nullcontext():
        send_open_loop("readiness" if poller else "latency", total, rate, one)
        wait_for_counts(len(sent), timeout=60, label="defaults", baseline=baseline)
        time.sleep(10 * tick)  # the watchers' last rows, seen by now
        if poller is not None:
            poller.wait(60)
        cpu_end = cpu_by_process(groups, engine)
    missing = sum(watcher.visible(user) is None for _, user, _ in sent)
    if missing:
        raise RuntimeError(f"latency: the watchers missed {missing} registrations' rows")
    stack.stop()
    if errors:
        raise RuntimeError(f"latency: {len(errors)} failed registrations: {errors[:3]}")
    latency = {i: (watcher.visible(user) - received) * 1000 for i, user, received in sent}
    first_second = int(rate)
    readiness = {}
    if poller is not None:
        if poller.pending:
            raise RuntimeError(f"readiness: {len(poller.pending)} users never complete")
        ready_ms = {i: (poller.complete[user] - received) * 1000 for i, user, received in sent}
        readiness = {
            **poller.resolution(),
            "endpoint_cold_first_20": latency_figures(
                [ready_ms[i] for i in sorted(ready_ms)[:20]]),
            "endpoint_steady": latency_figures(
                [ms for i, ms in ready_ms.items() if i >= int(rate * warmup)]),
        }
    return {
        **readiness,
        "rate_per_s": rate,
        "registrations": total,
        "errors": len(errors),
        "ready_after_s": round(ready - launched, 2),
        **watcher.resolution(),
        "cold_first_20": latency_figures([latency[i] for i in sorted(latency)[:20]]),
        "cold_first_second": latency_figures(
            [ms for i, ms in latency.items() if i < first_second]),
        "cold_first_values_ms": [round(latency[i], 1) for i in sorted(latency)[:10]],
        # Everything since the stack was ready, the watchers' own queries included (postgres).
        "cpu_ms_per_registration": {
            name: round((cpu_end[name] - cpu_start[name]) / max(len(sent), 1), 2)
            for name in cpu_start},
        "steady": latency_figures(
            [ms for i, ms in latency.items() if i >= int(rate * warmup)]),
    }

"""The erasure scenario: the latency from a deletion's 204 to the moment the last of the four
contexts has erased the user (its tombstone row visible in that context's database, watched
from outside by ``RowWatcher``, as the latency scenario watches the default rows), steady and
cold.

Not timed, first: the users are registered over HTTP (``POST /api/auth/register``), every one
of them gets its defaults in all four contexts, and each gets a token (``POST
/api/auth/token``). Then every process is stopped and started again, and once the stack says it
is ready the users erase themselves over HTTP (``DELETE /api/auth/me`` with their token and
password) at a steady rate, open loop: cold is the first deletions after that start, steady
those after the warm-up. The path timed is the real one: the outbox's ``user.deleted`` (and its
``Erasure``), the relay's publish (and its deletion of the user's earlier messages from the
stream), each context's consumer deleting the rows and writing the tombstone.
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from harness import (
    BENCH_PASSWORD,
    CONTEXTS,
    Stack,
    check_alive,
    default_models,
    http_json,
    http_register,
    progress,
)
from scenario_latency import RowWatcher, latency_figures, send_open_loop, stack_ready

# The API's login throttles (per address, per username) would refuse a bench that takes a token
# for a thousand users from one address, and DELETE /api/auth/me counts against the same rates.
NO_LOGIN_THROTTLES = {"TOKEN_THROTTLE_RATE": "", "TOKEN_USERNAME_THROTTLE_RATE": ""}
MAX_DELETIONS = 10_000


def start_stack(stack: Stack, port: int) -> None:
    """The relay, the four consumers and gunicorn (its login throttles off)."""
    stack.manage("outbox_relay")
    for context in CONTEXTS:
        stack.manage("consume", context)
    stack.gunicorn(port, ready_path="/readyz", **NO_LOGIN_THROTTLES)


def tombstone_tables() -> dict[str, tuple[str, str]]:
    """For ``RowWatcher``: each context's tombstones, in its own database."""
    from onboarding.eventbus.models import Tombstone

    return {name: (Tombstone._meta.db_table, f"context = '{name}'") for name in default_models()}


def wait_until(check, timeout: float, label: str, processes) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        check_alive(processes, label)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: not done after {timeout}s")
        time.sleep(0.1)


def defaults_of_everyone(users: int) -> bool:
    per_user = {"buildings": 2}
    return all(model.objects.count() >= users * per_user.get(name, 1)
               for name, model in default_models().items())


def tombstones(context: str) -> int:
    from django.conf import settings

    from onboarding.eventbus.models import Tombstone

    return Tombstone.objects.using(settings.CONTEXT_DATABASES[context]).filter(
        context=context).count()


def set_up_users(stack: Stack, port: int, count: int) -> list[tuple[uuid.UUID, str]]:
    """Register ``count`` users over HTTP, wait for all their defaults, take a token for each;
    ``[(user id, token)]`` in registration order. Not timed."""
    local = threading.local()

    def one(i: int) -> tuple[uuid.UUID, str]:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        username = f"era{i}"
        status, payload, _ = http_register(local.conn, username)
        if status != 201:
            raise RuntimeError(f"erasure set-up: register {username}: {status} {payload}")
        status, token = http_json(local.conn, "POST", "/api/auth/token",
                                  {"username": username, "password": BENCH_PASSWORD})
        if status != 200:
            raise RuntimeError(f"erasure set-up: token {username}: {status} {token}")
        return uuid.UUID(payload["userId"]), token["token"]

    started = time.monotonic()
    users = []
    with ThreadPoolExecutor(4) as pool:
        for i, user in enumerate(pool.map(one, range(count))):
            users.append(user)
            if i % 100 == 0:
                progress("set up", i, count, started)
    progress("set up", count, count, started)
    wait_until(lambda: defaults_of_everyone(count), 120, "erasure set-up", stack.processes)
    return users


def scenario_erasure(stack: Stack, rate: float, seconds: float, port: int, engine: str,
                     warmup: float = 3.0, tick: float = 0.002) -> dict:
    """``rate`` × (``warmup`` + ``seconds``) users (at most 10,000) set up, the stack restarted,
    then each user deleted over HTTP at ``rate`` (open loop); for each, the time from its 204
    to the moment the last of the four contexts' tombstones became visible. Cold: the first
    second's (and the first 20) deletions after the restart; steady: those sent after
    ``warmup`` s."""
    total = min(int(rate * (warmup + seconds)), MAX_DELETIONS)
    setup_started = time.monotonic()
    start_stack(stack, port)
    stack_ready(stack, port, engine)
    users = set_up_users(stack, port, total)
    stack.stop()
    setup_seconds = time.monotonic() - setup_started

    launched = time.monotonic()
    start_stack(stack, port)
    ready = stack_ready(stack, port, engine)
    sent: list[tuple[int, uuid.UUID, float]] = []
    errors = []
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        user_id, token = users[i]
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            status, payload = http_json(local.conn, "DELETE", "/api/auth/me",
                                        {"password": BENCH_PASSWORD}, token=token)
            received = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - reported below
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            errors.append(repr(exc))
            return
        if status != 204:
            errors.append(f"{status} {payload}")
            return
        with lock:
            sent.append((i, user_id, received))

    with RowWatcher(stack.env, tick, tables=tombstone_tables()) as watcher:
        send_open_loop("erasure", total, rate, one)
        wait_until(lambda: all(tombstones(c) >= len(sent) for c in default_models()), 60,
                   "erasure: tombstones", stack.processes)
        time.sleep(10 * tick)  # the watchers' last rows, seen by now
    stack.stop()
    if errors:
        raise RuntimeError(f"erasure: {len(errors)} failed deletions: {errors[:3]}")
    missing = sum(watcher.visible(user) is None for _, user, _ in sent)
    if missing:
        raise RuntimeError(f"erasure: the watchers missed {missing} deletions' tombstones")
    left = {name: model.objects.count() for name, model in default_models().items()}
    if any(left.values()):
        raise AssertionError(f"erasure: rows left after every user was erased: {left}")
    latency = {i: (watcher.visible(user) - received) * 1000 for i, user, received in sent}
    first_second = int(rate)
    return {
        "rate_per_s": rate,
        "deletions": total,
        "errors": len(errors),
        "setup_s": round(setup_seconds, 1),
        "ready_after_s": round(ready - launched, 2),
        **watcher.resolution(),
        "cold_first_20": latency_figures([latency[i] for i in sorted(latency)[:20]]),
        "cold_first_second": latency_figures(
            [ms for i, ms in latency.items() if i < first_second]),
        "cold_first_values_ms": [round(latency[i], 1) for i in sorted(latency)[:10]],
        "steady": latency_figures(
            [ms for i, ms in latency.items() if i >= int(rate * warmup)]),
    }

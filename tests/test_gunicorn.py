"""The web app under gunicorn (deploy/gunicorn.conf.py): real forked workers, the suite's
nats-server and the test databases.

- SQLite mode (``OUTBOX_FAST_PATH=publish``): every forked worker's on-commit publisher gets its
  events out with no relay running; and, directly, a publisher started before ``os.fork()``
  publishes in the child.
- The register throttle holds across workers with a shared cache (``dbcache://``), and does not
  with a per-process one (``locmemcache://``), which is what makes the first case a test.
- PostgreSQL's fast path (``OUTBOX_FAST_PATH=notify``) and SQLite's (``wake``): the web workers
  open no NATS connection at all; the relay publishes every event.

Which worker the kernel hands a connection to is up to the kernel, so the tests steer requests
(see ``OneWorkerAtATime``) to make "several workers served" certain rather than likely.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, connections

from accounts.services import user_register
from conftest import run_async, wait_until
from onboarding.dev.natsserver import free_port
from onboarding.eventbus.models import OutboxEvent

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

logger = logging.getLogger(__name__)

GUNICORN_CONFIG = Path(settings.BASE_DIR) / "deploy" / "gunicorn.conf.py"


class Gunicorn:
    """``gunicorn -c deploy/gunicorn.conf.py onboarding.wsgi`` as a real process group.

    It runs in a session of its own, so that a master that will not stop is killed together
    with its workers (and only them). The access log names the worker (``<pid>``) of each
    request.
    """

    def __init__(self, env: dict, *, workers: int, log_dir: Path, name: str) -> None:
        self.workers = workers
        self.port = free_port()
        self.log_path = log_dir / f"gunicorn-{name}.log"
        self.access_log_path = log_dir / f"gunicorn-{name}-access.log"
        self._log = open(self.log_path, "w")
        args = [
            sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONFIG),
            # The deploy config preloads too; explicit, so these tests keep covering a fork of
            # a master that loaded the app whatever that setting becomes.
            "--preload",
            "--access-logfile", str(self.access_log_path),
            "--access-logformat", "%(p)s %(s)s %(m)s %(U)s",
            "onboarding.wsgi",
        ]
        self.popen = subprocess.Popen(
            args,
            env={**env, "GUNICORN_BIND": f"127.0.0.1:{self.port}",
                 "WEB_CONCURRENCY": str(workers)},
            cwd=settings.BASE_DIR, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def worker_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.output())}

    def wait_ready(self, timeout: float = 30.0) -> Gunicorn:
        wait_until(
            lambda: len(self.worker_pids()) >= self.workers or self.popen.poll() is not None,
            timeout=timeout, message="gunicorn workers booted",
        )
        assert self.popen.poll() is None, self.output()
        return self

    def served(self) -> list[tuple[int, int]]:
        """(worker pid, status) of every request served, in the order they were logged."""
        if not self.access_log_path.exists():
            return []
        return [
            (int(pid), int(status))
            for pid, status in re.findall(r"<(\d+)> (\d+) ", self.access_log_path.read_text())
        ]

    def post(self, path: str, body: dict) -> int:
        """POST a JSON body on a connection of its own; the response's status."""
        client = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            client.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = client.getresponse()
            response.read()
            return response.status
        finally:
            client.close()

    def register(self, name: str) -> int:
        return self.post("/api/auth/register", {
            "username": name, "email": f"{name}@example.com", "password": "correct-horse-battery",
        })

    def login(self, username: str, password: str) -> int:
        return self.post("/api/auth/token", {"username": username, "password": password})

    def stop(self, timeout: float = 40.0) -> tuple[int, str]:
        """SIGTERM (graceful: workers finish and run their exit hooks), then wait."""
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"gunicorn did not exit within {timeout}s of SIGTERM")
        return code, self.output()

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)
        self._log.close()


@pytest.fixture
def gunicorn(process_env, tmp_path):
    """Start gunicorn on the test's databases and NATS; every one started is killed after."""
    started = []

    def start(*, workers: int, name: str = "web", **env) -> Gunicorn:
        server = Gunicorn({**process_env, **env}, workers=workers, log_dir=tmp_path, name=name)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.kill()


class OneWorkerAtATime:
    """Steer sequential requests to one sync worker at a time, a different one each turn.

    A sync worker serves one connection at a time, and one that accepted a connection on which
    no request comes blocks reading it; the kernel hands out queued connections in order. So
    idle ("parked") connections on every worker but one leave that one to serve what comes next.
    ``next_worker()`` parks the worker that served and frees one that has not: with N workers,
    N turns are served by N different workers. Used as a context manager, it closes its parked
    connections (a parked worker would otherwise hold up a graceful stop).

    Each park waits until a worker has accepted it (``accepted``), not for a while: a worker
    freed before the one that served took its park could take that park instead, and the next
    turn would go to the worker that served this one again.
    """

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.parked: list[socket.socket] = []
        for _ in range(server.workers - 1):
            self._park()

    def _park(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.server.port), 5)
        self.parked.append(sock)
        wait_until(lambda: accepted(self.server.port, sock), timeout=15,
                   interval=0.005, message="a worker accepting the parked connection")

    def next_worker(self) -> None:
        self._park()  # accepted by the one free worker: the one that served this turn
        # Frees a worker that has not served yet, the only free one: whatever connects next
        # waits in the queue for it.
        self.parked.pop(0).close()

    def __enter__(self) -> OneWorkerAtATime:
        return self

    def __exit__(self, *exc) -> None:
        for sock in self.parked:
            sock.close()


def accepted(port: int, client: socket.socket) -> bool:
    """Whether a process listening on 127.0.0.1:``port`` has accept()ed ``client``'s
    connection. Linux lists the server's end of a connection from the handshake on, with no
    socket inode (0) while it waits in the listen queue, and with one once accept() took it."""
    client_port = client.getsockname()[1]
    ends = f":{port:04X}", f":{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if (fields[1][-5:], fields[2][-5:]) == ends:
                return fields[9] != "0"
    return False


def turns(server: Gunicorn, per_turn: int) -> list[set[int]]:
    """The worker pids of each consecutive run of ``per_turn`` logged requests."""
    served = server.served()
    return [
        {pid for pid, _ in served[i:i + per_turn]}
        for i in range(0, len(served), per_turn)
    ]


def stream_messages() -> int:
    async def read(js):
        return (await js.stream_info(settings.NATS_STREAM)).state.messages

    return run_async(read)


def unpublished() -> int:
    return OutboxEvent.objects.filter(published_at__isnull=True).count()


# --- SQLite mode: the publisher thread of each forked worker -----------------------------------


def test_every_forked_worker_publishes_its_own_events_without_a_relay(gunicorn):
    workers, per_worker = 3, 10
    server = gunicorn(workers=workers, OUTBOX_FAST_PATH="publish")
    statuses = []
    with OneWorkerAtATime(server) as steer:
        for turn in range(workers):
            if turn:
                steer.next_worker()
            statuses += [server.register(f"gw{turn}x{i}") for i in range(per_worker)]
    # Stop at once: the last events' rows are marked by the workers' exit hooks (the marker
    # coalesces for 0.5 s), not by waiting.
    code, output = server.stop()

    assert statuses == [201] * workers * per_worker, output
    served_by = turns(server, per_worker)
    assert [len(pids) for pids in served_by] == [1] * workers, server.served()
    assert set.union(*served_by) == server.worker_pids(), "every worker served one turn"
    assert code == 0, output
    # No relay ran: only the workers' publishers publish, and they mark a row published only
    # after its PubAck.
    assert OutboxEvent.objects.count() == workers * per_worker
    assert unpublished() == 0, output
    assert stream_messages() == workers * per_worker
    assert "left to the relay" not in output and "Traceback" not in output, output


# Exit codes of the forked child below.
CHILD_PUBLISHED, CHILD_NOT_PUBLISHED, CHILD_NO_NEW_THREAD, CHILD_FAILED = 0, 1, 2, 3
CHILD_OUTCOMES = {
    CHILD_NOT_PUBLISHED: "the child's event was not published within 15 s",
    CHILD_NO_NEW_THREAD: "no publisher thread runs in the child",
    CHILD_FAILED: "the child raised (see the captured stderr)",
}


def _in_forked_child() -> int:
    """Register in the forked child; the exit code tells whether its event got published."""
    from onboarding.eventbus.outbox.publisher import get_publisher

    try:
        user_register(username="forkchild", email="forkchild@example.com", password="x")
        deadline = time.monotonic() + 15
        while unpublished() and time.monotonic() < deadline:
            time.sleep(0.05)
        if unpublished():
            return CHILD_NOT_PUBLISHED
        # Threads do not survive a fork: the one that published is the child's own.
        if not any(t.name == "outbox-publisher" for t in threading.enumerate()):
            return CHILD_NO_NEW_THREAD
        get_publisher().close()
        return CHILD_PUBLISHED
    except BaseException:
        logger.exception("forked child failed")
        return CHILD_FAILED


def _wait_for_child(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child hung for {timeout}s (a lock held across the fork?)")


def test_a_publisher_started_before_fork_publishes_in_the_child_and_the_parent(
    jetstream, settings
):
    settings.OUTBOX_FAST_PATH = "publish"  # the SQLite-mode path, on either engine
    user_register(username="forkparent0", email="forkparent0@example.com", password="x")
    wait_until(lambda: unpublished() == 0, timeout=10, message="the parent's event published")
    assert any(t.name == "outbox-publisher" for t in threading.enumerate())

    # As gunicorn's master, the parent holds no database connection across the fork: a socket
    # or SQLite handle shared by two processes is corrupted by the first that uses it.
    connections.close_all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads
        pid = os.fork()
    if pid == 0:
        code = CHILD_FAILED
        try:
            code = _in_forked_child()
        finally:
            os._exit(code)  # never return into pytest in the child

    code = _wait_for_child(pid, timeout=30)
    assert code == CHILD_PUBLISHED, CHILD_OUTCOMES.get(code, f"exit code {code}")
    # The parent's publisher is untouched by the child's start and close.
    user_register(username="forkparent1", email="forkparent1@example.com", password="x")
    wait_until(lambda: unpublished() == 0, timeout=10, message="the parent's second event")
    assert OutboxEvent.objects.count() == 3
    assert stream_messages() == 3


# --- The throttle: one limit across workers only with a shared cache ---------------------------


# The production settings as the harness runs them: DEBUG off needs a key of its own, and the
# test talks plain HTTP to 127.0.0.1, so no redirect to HTTPS.
PRODUCTION_SETTINGS = {
    "DJANGO_SETTINGS_MODULE": "onboarding.settings",
    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
    "DJANGO_SECURE_SSL_REDIRECT": "false",
}


@pytest.fixture
def database_cache_table(manage):
    """``migrate_all`` creates the cache table, as at deploy; it is dropped after the test."""
    process = manage(
        "migrate_all", **PRODUCTION_SETTINGS, CACHE_URL="dbcache://onboarding_cache",
    )
    assert process.wait(120) == 0, process.output()
    assert "onboarding_cache" in connection.introspection.table_names()
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE onboarding_cache")


@pytest.mark.parametrize(
    ("cache_url", "expected"),
    [
        # Shared: the five allowed registrations are five for the whole server.
        ("dbcache://onboarding_cache", [201] * 5 + [429] * 7),
        # Per process (the control: without a shared cache the test above fails): each of the
        # two workers lets its own five through.
        ("locmemcache://", ([201] * 5 + [429]) * 2),
    ],
    ids=["dbcache", "locmem"],
)
def test_the_register_throttle_holds_across_workers_only_with_a_shared_cache(
    request, cache_url, expected
):
    if cache_url.startswith("dbcache"):
        request.getfixturevalue("database_cache_table")
    # Requested after the table, so the server is gone before the table is dropped.
    server = request.getfixturevalue("gunicorn")(
        workers=2,
        # The production settings, which throttle (the test settings turn throttles off), with
        # the test suite's fast hasher.
        **PRODUCTION_SETTINGS,
        DJANGO_PASSWORD_HASHERS="django.contrib.auth.hashers.MD5PasswordHasher",
        CACHE_URL=cache_url,
        REGISTER_THROTTLE_RATE="5/minute",
    )
    statuses = []
    with OneWorkerAtATime(server) as steer:
        statuses += [server.register(f"throttled{i}") for i in range(6)]
        steer.next_worker()
        statuses += [server.register(f"throttled{i}") for i in range(6, 12)]
    code, output = server.stop()

    served_by = turns(server, 6)
    assert len(served_by) == 2 and served_by[0] != served_by[1], server.served()
    assert statuses == expected, output
    assert code == 0, output


def test_the_per_username_login_throttle_holds_across_workers(database_cache_table, gunicorn):
    """The token endpoint's limit per username (accounts.throttles) counts in the shared cache:
    three guesses at one account in all, whichever worker serves them."""
    server = gunicorn(
        workers=2, **PRODUCTION_SETTINGS,
        DJANGO_PASSWORD_HASHERS="django.contrib.auth.hashers.MD5PasswordHasher",
        CACHE_URL="dbcache://onboarding_cache",
        REGISTER_THROTTLE_RATE="", TOKEN_THROTTLE_RATE="", TOKEN_USERNAME_THROTTLE_RATE="3/minute",
    )
    statuses = []
    with OneWorkerAtATime(server) as steer:
        statuses += [server.register("guessed")]
        statuses += [server.login("guessed", "wrong") for _ in range(2)]
        steer.next_worker()
        statuses += [server.login("GUESSED", "wrong") for _ in range(2)]
        statuses += [server.login("guessed", "correct-horse-battery")]
    code, output = server.stop()

    served_by = turns(server, 3)
    assert len(served_by) == 2 and served_by[0] != served_by[1], server.served()
    assert statuses == [201, 400, 400, 400, 429, 429], output
    assert code == 0, output


# --- The relay's fast paths (PostgreSQL: notify, SQLite: wake): no NATS in the web workers -----


class CountingListener:
    """A TCP port that counts the connections made to it, and closes each at once."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        # Closing a socket does not wake a thread blocked in its accept(): poll a stop flag.
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="counting-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def counting_listener():
    listener = CountingListener()
    yield listener
    listener.close()


RELAY_FAST_PATHS = {"postgresql": ("notify", "relay: listening for commits"),
                    "sqlite": ("wake", "relay: listening for wake-ups")}


def test_relay_fast_path_web_workers_open_no_nats_connection(gunicorn, manage, counting_listener):
    # auto: notify on PostgreSQL, wake on SQLite.
    mode, listening = RELAY_FAST_PATHS[connections["default"].vendor]
    # A grace period longer than the test: the relay's scan publishes nothing fresh, so every
    # event it publishes came through LISTEN/NOTIFY or the wake-ups.
    relay = manage("outbox_relay", OUTBOX_FAST_PATH="auto", OUTBOX_RELAY_GRACE="600")
    relay.wait_for_output(listening)
    # Any NATS connection attempt of the web processes would land on the counting listener.
    server = gunicorn(
        workers=2, OUTBOX_FAST_PATH="auto", NATS_URL=f"nats://127.0.0.1:{counting_listener.port}"
    )
    per_worker = 3
    statuses = []
    with OneWorkerAtATime(server) as steer:
        statuses += [server.register(f"{mode}{i}") for i in range(per_worker)]
        steer.next_worker()
        statuses += [server.register(f"{mode}{i}") for i in range(per_worker, 2 * per_worker)]

    assert statuses == [201] * 2 * per_worker, server.output()
    assert len(set.union(*turns(server, per_worker))) == 2, server.served()
    wait_until(lambda: unpublished() == 0, timeout=15, message="the relay published every event")
    assert stream_messages() == 2 * per_worker
    code, output = server.stop()  # exit hooks included
    assert code == 0, output
    assert counting_listener.accepted == 0, output
    code, relay_output = relay.stop()
    assert code == 0, relay_output

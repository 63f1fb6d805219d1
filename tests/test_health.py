"""/healthz and /readyz: plain JSON, no auth, no throttle; /readyz checks the default database
and, only where the web process publishes (``publish`` fast path), NATS.

The unhealthy states are real: real gunicorn processes pointed at a SQLite path that cannot
open, at a PostgreSQL database that does not exist, and at a NATS_URL where nothing listens;
and, for "never touches NATS" and "a NATS that hangs", a socket that counts who connects.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from onboarding.dev.natsserver import free_port
from tests.test_gunicorn import Gunicorn

pytestmark = pytest.mark.django_db


class CountingListener:
    """A TCP port that accepts connections, counts them and says nothing (not NATS)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.accepted = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


@pytest.fixture
def listener():
    listening = CountingListener()
    yield listening
    listening.close()


def dead_nats_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"


# -- in-process (the Django test client) ---------------------------------------------------


def test_healthz_is_ok_and_touches_no_database(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"


def test_probes_take_no_credentials_and_ignore_bad_ones(client):
    """No auth: a stale token or session a load balancer happens to send changes nothing."""
    for path in ("/healthz", "/readyz"):
        assert client.get(path, HTTP_AUTHORIZATION="Token bogus").status_code == 200


def test_probes_are_not_throttled():
    """Explicitly: a default throttle added to REST_FRAMEWORK later must not reach them."""
    from onboarding.apis import HealthzApi, ReadyzApi

    assert HealthzApi.throttle_classes == [] and ReadyzApi.throttle_classes == []
    assert HealthzApi.authentication_classes == [] and ReadyzApi.authentication_classes == []


def test_readyz_in_publish_mode_checks_nats(client, settings):
    settings.OUTBOX_FAST_PATH = "publish"
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "nats": "ok"}}
    assert response["Cache-Control"] == "no-store"


def test_readyz_in_publish_mode_with_nats_down_is_a_503(client, settings):
    settings.OUTBOX_FAST_PATH = "publish"
    settings.NATS_URL = dead_nats_url()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"nats": ["NATS cannot be reached."]}


def test_readyz_gives_up_on_a_nats_that_does_not_answer(client, settings, listener):
    """Something accepts the connection but never speaks NATS: not ready, and answered soon."""
    settings.OUTBOX_FAST_PATH = "publish"
    settings.NATS_URL = listener.url
    started = time.monotonic()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"nats": ["NATS cannot be reached."]}
    assert listener.accepted >= 1
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("mode", ["notify", "wake"])
def test_readyz_in_a_relay_mode_never_touches_nats(client, settings, listener, mode):
    """The relay's fast paths (PostgreSQL's NOTIFY, SQLite's wake-ups): the relay publishes,
    the web process opens no NATS connection, so its readiness does not depend on NATS either."""
    settings.OUTBOX_FAST_PATH = mode
    settings.NATS_URL = listener.url
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"database": "ok"}}
    time.sleep(0.2)
    assert listener.accepted == 0


def test_readyz_without_a_fast_path_does_not_check_nats(client, settings, listener):
    settings.OUTBOX_PUBLISH_ON_COMMIT = False  # the relay alone publishes
    settings.NATS_URL = listener.url
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"database": "ok"}}
    assert listener.accepted == 0


# -- real processes -------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


@pytest.fixture
def web(process_env, tmp_path):
    """Start one gunicorn worker with ``env`` over the test's environment."""
    started = []

    def start(name: str, **env) -> Gunicorn:
        server = Gunicorn({**process_env, **env}, workers=1, log_dir=tmp_path, name=name)
        started.append(server)
        return server.wait_ready()

    yield start
    for server in started:
        server.kill()


@pytest.mark.django_db(transaction=True)
def test_a_real_web_process_is_ready_and_then_not_when_nats_is_down(web):
    healthy = web("healthy", OUTBOX_FAST_PATH="publish")
    assert http_get(healthy.port, "/readyz")[::2] == (
        200, {"status": "ready", "checks": {"database": "ok", "nats": "ok"}}
    )
    no_nats = web("no-nats", OUTBOX_FAST_PATH="publish", NATS_URL=dead_nats_url())
    assert http_get(no_nats.port, "/readyz")[::2] == (503, {"nats": ["NATS cannot be reached."]})
    assert http_get(no_nats.port, "/healthz")[::2] == (200, {"status": "ok"})  # alive, though


@pytest.mark.django_db(transaction=True)
def test_a_real_web_process_whose_sqlite_database_cannot_open(web, tmp_path):
    not_a_file = tmp_path / "a-directory"  # SQLite cannot open a directory as its database
    not_a_file.mkdir()
    server = web("sqlite-cannot-open", DATABASE_URL=f"sqlite:///{not_a_file}",
                 OUTBOX_FAST_PATH="publish")
    status, headers, body = http_get(server.port, "/readyz")
    assert (status, body) == (503, {"database": ["The default database cannot be reached."]})
    assert headers["Content-Type"] == "application/json"
    assert http_get(server.port, "/healthz")[::2] == (200, {"status": "ok"})
    assert "unable to open database file" in server.output()  # the cause is logged, not shown


@pytest.mark.django_db(transaction=True)
def test_a_real_web_process_on_a_missing_postgres_database_never_touches_nats(web, listener):
    """On PostgreSQL (notify) only the database is checked: NATS is neither reported nor
    connected to, even while the database is down."""
    server = web(
        "postgres-missing",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/i9api_no_such_database",
        NATS_URL=listener.url,
    )
    status, _, body = http_get(server.port, "/readyz")
    assert (status, body) == (503, {"database": ["The default database cannot be reached."]})
    assert http_get(server.port, "/healthz")[0] == 200
    time.sleep(0.2)
    assert listener.accepted == 0
    # The cause, in the log only: the missing database (or, without a server, the refusal).
    output = server.output()
    assert "the default database cannot be reached" in output
    assert '"i9api_no_such_database" does not exist' in output or "refused" in output

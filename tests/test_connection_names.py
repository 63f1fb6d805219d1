"""Every PostgreSQL connection says whose it is: ``pg_stat_activity.application_name`` names the
process and its role (``web``, ``relay``, ``relay-listen``, ``relay-lock``, ``consume:<names>``,
``manage.py <command>``), so an operator can tell who holds a lock, a connection slot or a long
transaction.

PostgreSQL only: SQLite has no server, so no sessions and nothing that could carry a name.
"""

from __future__ import annotations

import http.client
import subprocess
import sys

import pytest
from django.conf import settings
from django.db import connection, connections

from conftest import wait_until
from onboarding.eventbus.registry import get_consumers

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="application_name is a PostgreSQL session's; SQLite has no server and no "
               "sessions to name (run with DATABASE_URL=postgres://...)",
    ),
]


def names_in_pg_stat_activity() -> list[str]:
    """The application_name of every session on the test databases but this test's own."""
    databases = sorted({connections[alias].settings_dict["NAME"] for alias in settings.DATABASES})
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT application_name FROM pg_stat_activity "
            "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            [databases],
        )
        return sorted(name for (name,) in cursor.fetchall())


def test_the_relay_and_a_consumer_name_their_connections_by_role(manage):
    relay = manage("outbox_relay")
    consumer = manage("consume", "players")
    wanted = {"relay", "relay-listen", "relay-lock", "consume:players"}
    try:
        wait_until(lambda: wanted <= set(names_in_pg_stat_activity()), timeout=30,
                   message=f"sessions named {sorted(wanted)}")
    except AssertionError:
        raise AssertionError(
            f"{names_in_pg_stat_activity()}\n{relay.output()}\n{consumer.output()}"
        ) from None
    for process in (relay, consumer):
        code, output = process.stop()
        assert code == 0, output


def test_consume_all_names_every_consumer(manage):
    consumer = manage("consume", "--all")
    wanted = "consume:" + ",".join(get_consumers())  # accounts' among them
    wait_until(lambda: wanted in names_in_pg_stat_activity(), timeout=30,
               message=f"a session named {wanted!r}")
    code, output = consumer.stop()
    assert code == 0, output


def test_any_other_command_is_named_after_itself(process_env):
    code = (
        "from django.db import connection\n"
        "with connection.cursor() as cursor:\n"
        "    cursor.execute('SHOW application_name')\n"
        "    print(cursor.fetchone()[0])\n"
    )
    result = subprocess.run(
        [sys.executable, str(settings.BASE_DIR / "manage.py"), "shell", "-c", code],
        env=process_env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "manage.py shell", result.stdout


def test_the_web_workers_name_theirs_web(process_env, tmp_path):
    """gunicorn's workers keep their connection between requests (CONN_MAX_AGE): one request
    that reads the database leaves a session named ``web``."""
    from tests.test_gunicorn import Gunicorn

    server = Gunicorn(process_env, workers=1, log_dir=tmp_path, name="names").wait_ready()
    try:
        client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
        client.request("GET", "/readyz")
        response = client.getresponse()
        assert response.status == 200, response.read()
        client.close()
        wait_until(lambda: "web" in names_in_pg_stat_activity(), timeout=10,
                   message="a session named 'web'")
    finally:
        server.kill()

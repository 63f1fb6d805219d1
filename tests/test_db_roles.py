"""A PostgreSQL role per process type (``manage.py db_roles``, onboarding/dbroles.py): the flow
runs with each process on its own role, and a role is refused what is not its own.

PostgreSQL only (SQLite has no roles); skipped, saying so, on SQLite.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from urllib.parse import quote

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections

from conftest import wait_until
from onboarding import dbroles
from onboarding.dev.natsserver import free_port
from tests.flow import STRONG_PASSWORD, complete_count, counts

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.skipif(
        settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
        reason="database roles are PostgreSQL's (DATABASE_URL=postgres://... to run it)"),
]


@pytest.fixture
def roles():
    """The roles, under a prefix of this test's own (roles are the server's, not a database's),
    dropped after."""
    prefix = f"t{secrets.token_hex(4)}"
    call_command("db_roles", "--prefix", prefix, verbosity=0)
    yield prefix
    names = [dbroles.role_name(prefix, role) for role in dbroles.roles()]
    for alias in dict.fromkeys(dbroles.postgresql_aliases()):
        with connections[alias].cursor() as cursor:
            cursor.execute(f"DROP OWNED BY {', '.join(names)}")
    with connections["default"].cursor() as cursor:
        for name in names:
            cursor.execute(f"DROP ROLE IF EXISTS {name}")


def url_as(alias: str, role: str) -> str:
    config = settings.DATABASES[alias]  # during the tests, NAME is the test database
    host = f"{config.get('HOST') or '127.0.0.1'}:{config.get('PORT') or 5432}"
    return f"postgres://{quote(role)}@{host}/{config['NAME']}"


def env_as(prefix: str, role: str) -> dict[str, str]:
    """Every database URL of a process, as ``role``."""
    name = dbroles.role_name(prefix, role)
    env = {"DATABASE_URL": url_as("default", name)}
    for context in settings.BOUNDED_CONTEXTS:
        env[f"{context.upper()}_DATABASE_URL"] = url_as(settings.CONTEXT_DATABASES[context], name)
    return env


def refusal(prefix: str, role: str, alias: str, sql: str) -> str:
    """What PostgreSQL says when ``role`` connects to ``alias`` and runs ``sql``."""
    config = settings.DATABASES[alias]
    try:
        with psycopg.connect(host=config.get("HOST") or "127.0.0.1",
                             port=config.get("PORT") or 5432, dbname=config["NAME"],
                             user=dbroles.role_name(prefix, role), connect_timeout=5) as conn:
            conn.execute(sql)
    except psycopg.Error as exc:
        return str(exc)
    return ""


def test_a_consumer_role_is_refused_another_contexts_database(roles):
    players = settings.CONTEXT_DATABASES["players"]
    characters = settings.CONTEXT_DATABASES["characters"]
    if players != characters:  # a database each: not even a connection
        said = refusal(roles, "players", characters, "SELECT 1")
        assert "permission denied for database" in said, said
        said = refusal(roles, "web", players, "SELECT 1")
        assert "permission denied for database" in said, said
    # Whatever the layout, not another context's table, nor accounts' users.
    said = refusal(roles, "players", characters, "SELECT count(*) FROM characters_character")
    assert "permission denied" in said, said
    said = refusal(roles, "players", "default", "SELECT count(*) FROM accounts_user")
    assert "permission denied" in said, said
    # Its own tables, and the dead letters it stores in accounts' database, it may use.
    assert refusal(roles, "players", players, "SELECT count(*) FROM players_player") == ""
    assert refusal(roles, "players", "default", "SELECT count(*) FROM eventbus_deadletter") == ""
    # The web reads no service's rows.
    said = refusal(roles, "web", players, "SELECT count(*) FROM players_player")
    assert "permission denied" in said, said


def test_the_flow_runs_with_every_process_on_its_own_role(roles, manage):
    processes = [manage("outbox_relay", **env_as(roles, "relay")),
                 manage("consume", "accounts", **env_as(roles, "accounts"))]
    processes += [manage("consume", context, **env_as(roles, context))
                  for context in settings.BOUNDED_CONTEXTS]
    port = free_port()
    web = manage("runserver", "--noreload", f"127.0.0.1:{port}", **env_as(roles, "web"))

    def register(i: int) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/auth/register", headers={"Content-Type":
                                                                    "application/json"},
            data=json.dumps({"username": f"role{i}", "email": f"role{i}@example.com",
                             "password": STRONG_PASSWORD}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def web_up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return True
        except OSError:
            return web.poll() is not None

    wait_until(web_up, timeout=30, message="the web process answers")
    assert web.poll() is None, web.output()
    assert [register(i) for i in range(3)] == [201] * 3
    wait_until(lambda: counts() == complete_count(3), timeout=30, message="every default")
    from accounts.models import ServiceReadiness

    wait_until(lambda: ServiceReadiness.objects.filter(onboarded_at__isnull=False).count()
               == 3 * len(settings.BOUNDED_CONTEXTS), timeout=30,
               message="every service ready in the projection")
    for process in [*processes, web]:
        assert "permission denied" not in process.output(), process.output()
        assert process.poll() is None, process.output()

"""Bounded connections in the web process: gunicorn's gthread workers with more threads than
PostgreSQL's ``max_connections``, a pool per worker (``DATABASE_POOL_MAX_SIZE``), a burst of
200 concurrent registrations: every one answered 201, none a 500, and the server never sees
more than the pools' connections. Plus the web's ``WEB_STATEMENT_TIMEOUT``.

PostgreSQL only; skipped, saying so, on SQLite.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings
from django.db import connection

from tests.flow import STRONG_PASSWORD
from tests.test_gunicorn import gunicorn  # noqa: F401 - the fixture

POSTGRESQL = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.skipif(not POSTGRESQL,
                       reason="connection pools are PostgreSQL's (DATABASE_URL=postgres://...)"),
]

BURST = 200
WORKERS = 2
POOL = 4


def server_setting(name: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {name}")
        return int(cursor.fetchone()[0])


def web_sessions() -> int:
    """The web's sessions now. Called from the burst's threads: each closes the connection it
    opened for it, or it would outlive the test."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'web' "
                           "AND datname = current_database()")
            return cursor.fetchone()[0]
    finally:
        connection.close()


def test_a_burst_on_more_threads_than_connections_gets_no_500(gunicorn):  # noqa: F811
    threads = server_setting("max_connections") // WORKERS + 10  # together, more than it allows
    server = gunicorn(workers=WORKERS, GUNICORN_THREADS=str(threads),
                      DATABASE_POOL_MAX_SIZE=str(POOL), DATABASE_POOL_TIMEOUT="30")
    peak = []

    def register(i: int) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/api/auth/register",
            data=json.dumps({"username": f"burst{i}", "email": f"burst{i}@example.com",
                             "password": STRONG_PASSWORD}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        if i % 20 == 0:
            peak.append(web_sessions())
        return status

    with ThreadPoolExecutor(BURST) as pool:
        statuses = list(pool.map(register, range(BURST)))
    assert sorted(set(statuses)) == [201], {s: statuses.count(s) for s in set(statuses)}
    # Each worker's threads shared its pool: never more sessions than the pools hold.
    assert max(peak) <= WORKERS * POOL, peak
    assert "Traceback" not in server.output(), server.output()[-3000:]


def test_the_web_sets_its_statement_timeout_and_pool_on_postgresql(settings):
    from onboarding.databases import web_connections

    settings.WEB_STATEMENT_TIMEOUT = 2.5
    settings.DATABASE_POOL_MAX_SIZE = 3
    saved = {alias: (dict(config.get("OPTIONS", {})), config["CONN_MAX_AGE"],
                     config["CONN_HEALTH_CHECKS"])
             for alias, config in settings.DATABASES.items()}
    try:
        web_connections()
        options = settings.DATABASES["default"]["OPTIONS"]
        assert "-c statement_timeout=2500" in options["options"]
        assert options["pool"]["max_size"] == 3 and options["pool"]["min_size"] == 1
        assert settings.DATABASES["default"]["CONN_MAX_AGE"] == 0
    finally:
        for alias, (options, max_age, health) in saved.items():
            settings.DATABASES[alias]["OPTIONS"] = options
            settings.DATABASES[alias]["CONN_MAX_AGE"] = max_age
            settings.DATABASES[alias]["CONN_HEALTH_CHECKS"] = health


def test_a_web_process_statement_over_its_timeout_is_cancelled(process_env):
    """The web process as gunicorn loads it (onboarding.wsgi), a statement longer than
    WEB_STATEMENT_TIMEOUT: PostgreSQL cancels it; a management command keeps no such limit."""
    import subprocess
    import sys

    code = ("import {module}; from django.db import connection; "
            "connection.cursor().execute('SELECT pg_sleep(1)'); print('finished')")
    env = {**process_env, "WEB_STATEMENT_TIMEOUT": "0.2"}
    web = subprocess.run([sys.executable, "-c", code.format(module="onboarding.wsgi")],
                         env=env, cwd=settings.BASE_DIR, capture_output=True, text=True,
                         timeout=60)
    assert web.returncode != 0 and "canceling statement due to statement timeout" in \
        web.stderr, web.stderr[-2000:]
    other = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); " + code.format(module="os")],
        env=env, cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 and "finished" in other.stdout, other.stderr[-2000:]

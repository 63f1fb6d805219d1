"""Adding a service takes its app and one INSTALLED_APPS line: a fifth context, end to end.

``tests.stash`` is a throwaway context app installed only by ``tests.stash.settings``.
Real ``manage.py`` processes with those settings must give it everything the four have — its own
database (and inbox there), its migrations, its durable, its consumer process — with no list
edited anywhere. SQLite files in a temporary folder whatever the suite's engine: what is tested
is the registry, not a database.
"""

from __future__ import annotations

import sqlite3

import pytest
from django.conf import settings

from conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def rows(path, sql, *params):
    with sqlite3.connect(path) as connection:
        return connection.execute(sql, params).fetchall()


def test_a_fifth_context_gets_its_database_migrations_durable_and_consumer(manage, tmp_path):
    files = {name: tmp_path / f"{name}.sqlite3"
             for name in ["accounts", *settings.BOUNDED_CONTEXTS, "stash"]}
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.stash.settings",
        "DATABASE_URL": f"sqlite:///{files.pop('accounts')}",
        **{f"{name.upper()}_DATABASE_URL": f"sqlite:///{path}" for name, path in files.items()},
        "OUTBOX_PUBLISH_ON_COMMIT": "false",  # the relay below publishes
    }
    stash_db = files["stash"]

    def run(*args):
        process = manage(*args, **env)
        assert process.wait() == 0, process.output()
        return process.output()

    output = run("migrate_all")
    assert "Database 'stash' (stash): " in output
    tables = {name for (name,) in rows(stash_db, "SELECT name FROM sqlite_master")}
    assert {"stash_item", "eventbus_processedevent"} <= tables
    assert "consumer stash: created" in run("setup_jetstream")
    assert "stash: " in run("procfile")

    consumer = manage("consume", "stash", **env)
    consumer.wait_for_output("consumers started: stash")
    user_id = run(
        "shell", "-c",
        "from accounts.services import user_register; "
        "print(user_register(username='pack', email='pack@example.com', password='x').id)",
    ).strip().splitlines()[-1]
    run("outbox_relay", "--once", "--grace", "0")

    wait_until(lambda: rows(stash_db, "SELECT kind, quantity FROM stash_item "
                                          "WHERE user_id = ?", user_id.replace("-", "")),
               timeout=20, message="the stash default")
    assert rows(stash_db, "SELECT consumer FROM eventbus_processedevent") == [("stash",)]
    code, output = consumer.stop()
    assert code == 0 and "stash (processed 1," in output, output


def test_settings_derive_the_contexts_from_installed_apps():
    from onboarding.databases import bounded_contexts
    from onboarding.eventbus.registry import get_consumers

    # Every consumer but accounts', whose database is DATABASE_URL's (it keeps the readiness
    # projection there).
    assert ("accounts", *settings.BOUNDED_CONTEXTS) == tuple(get_consumers())
    assert bounded_contexts([
        "django.contrib.admin", "rest_framework", "onboarding.eventbus", "accounts",
        "players", "tests.stash", "no.such.app",
    ]) == ("accounts", "players", "stash")  # configure() keeps accounts on DATABASE_URL
    # An AppConfig path is not seen here; the system check reports it (eventbus.E010).
    assert bounded_contexts(["players.apps.PlayersConfig"]) == ()


"""Each bounded context in its own database; shared databases collapse onto one alias."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.conf import settings
from django.db import connections, router

from onboarding import databases
from onboarding.routers import PER_CONTEXT_MODELS


def sqlite(name):
    return {"ENGINE": databases.SQLITE_ENGINE, "NAME": name}


def postgres(name, host="127.0.0.1"):
    return {"ENGINE": "django.db.backends.postgresql", "NAME": name, "HOST": host, "PORT": 5432}


def test_separate_databases_get_their_own_alias(tmp_path):
    dbs, alias = databases.assign(
        sqlite(tmp_path / "a.db"),
        {"players": sqlite(tmp_path / "p.db"), "buildings": sqlite(tmp_path / "b.db")},
    )
    assert list(dbs) == ["default", "players", "buildings"]
    assert alias == {"players": "players", "buildings": "buildings"}


def test_contexts_on_one_database_share_one_alias():
    dbs, alias = databases.assign(
        postgres("main"),
        {"players": postgres("main"), "characters": postgres("ctx"), "buildings": postgres("ctx")},
    )
    assert list(dbs) == ["default", "characters"]
    assert alias == {"players": "default", "characters": "characters", "buildings": "characters"}


def test_sqlite_gets_wal_busy_timeout_and_immediate_transactions(tmp_path):
    config = databases.prepare(sqlite(str(tmp_path / "x.sqlite3")), test_dir=tmp_path)
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"
    assert config["OPTIONS"]["timeout"] >= 5
    assert "journal_mode=WAL" in config["OPTIONS"]["init_command"]


@pytest.mark.django_db(databases="__all__")
def test_every_model_table_exists_in_its_database():
    """Migrations created every table where the router sends it (shared or separate)."""
    for model in apps.get_models():
        alias = router.db_for_write(model)
        if model._meta.app_label == "eventbus" and model._meta.model_name in PER_CONTEXT_MODELS:
            aliases = set(settings.CONTEXT_DATABASES.values())
        else:
            aliases = {alias or "default"}
        for alias in aliases:
            tables = connections[alias].introspection.table_names()
            assert model._meta.db_table in tables, (model, alias)


def test_contexts_route_to_their_own_alias():
    from buildings.models import Building
    from characters.models import Character
    from players.models import Player
    from progression.models import MetaProgression

    for model, context in [(Player, "players"), (Character, "characters"),
                           (MetaProgression, "progression"), (Building, "buildings")]:
        assert router.db_for_write(model) == settings.CONTEXT_DATABASES[context]


def test_contexts_do_not_import_each_other():
    """They share only the event contract: no context imports another context or accounts."""
    import ast
    from pathlib import Path

    contexts = {"accounts", "players", "characters", "progression", "buildings"}
    for context in contexts:
        for path in (Path(settings.BASE_DIR) / context).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top == context or top not in contexts, f"{path} imports {name}"


@pytest.mark.parametrize(
    "other",
    [
        {"HOST": "localhost", "PORT": ""},
        {"HOST": "127.0.0.1", "PORT": 5432},
        {"HOST": "", "PORT": "5432", "USER": "someone-else"},
    ],
)
def test_spellings_of_one_postgres_database_are_one_alias(other):
    base = postgres("main")
    dbs, alias = databases.assign(base, {"players": {**base, **other}})
    assert list(dbs) == ["default"] and alias == {"players": "default"}


def test_a_schema_per_context_is_its_own_database():
    base = postgres("main")
    schema = {**base, "OPTIONS": {"options": "-c search_path=players"}}
    dbs, alias = databases.assign(base, {"players": schema})
    assert alias == {"players": "players"}


@pytest.mark.django_db(databases="__all__")
def test_migrate_all_finds_no_missing_table():
    from onboarding.eventbus.management.commands.migrate_all import missing_tables

    assert missing_tables() == []


def test_migrate_all_counts_per_database_only_the_migrations_of_what_it_holds(tmp_path):
    """A fresh set of SQLite files (one per context, as the settings build without URLs).

    Django records every app's migrations in each database's django_migrations, tables or not;
    the summary counts, per database, the migrations of the apps whose tables it holds, and
    names them. Before, each context's database claimed all of them ("43 migration(s) applied").
    """
    import os
    import subprocess
    import sys
    from collections import Counter

    from django.db.migrations.loader import MigrationLoader

    env = {key: value for key, value in os.environ.items()
           if not key.endswith("DATABASE_URL") and key != "CACHE_URL"}
    env.update(DJANGO_SETTINGS_MODULE="onboarding.settings", DJANGO_DEBUG="true",
               DATABASE_URL=f"sqlite:///{tmp_path / 'accounts.sqlite3'}")
    for context in settings.BOUNDED_CONTEXTS:
        env[f"{context.upper()}_DATABASE_URL"] = f"sqlite:///{tmp_path / f'{context}.sqlite3'}"

    def migrate_all():
        result = subprocess.run(
            [sys.executable, str(settings.BASE_DIR / "manage.py"), "migrate_all"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if line.startswith("Database ")]

    on_disk = Counter(app for app, _ in MigrationLoader(None, ignore_no_migrations=True)
                      .disk_migrations)
    lines = migrate_all()
    contexts = settings.BOUNDED_CONTEXTS
    expected = []
    others = [app for app in on_disk if app not in contexts]
    default_apps = ["accounts"] + [a.label for a in apps.get_app_configs()
                                   if a.label in others and a.label != "accounts"]
    expected.append(
        f"Database 'default' (accounts): {sum(on_disk[a] for a in default_apps)} "
        f"migration(s) applied ({', '.join(default_apps)})"
    )
    for context in contexts:
        # A context's database holds the context's tables and the event bus's inbox.
        count = on_disk[context] + on_disk["eventbus"]
        expected.append(f"Database '{context}' ({context}): {count} migration(s) applied "
                        f"({context}, eventbus)")
    assert lines == expected
    assert migrate_all() == [line.split(":")[0] + ": up to date" for line in expected]

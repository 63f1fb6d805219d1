"""Each bounded context in its own database; shared databases collapse onto one alias."""

from __future__ import annotations

import pytest
from django.apps import apps
from django.conf import settings
from django.db import connections, router

from onboarding import databases


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
        if model._meta.app_label == "eventbus" and model._meta.model_name == "processedevent":
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

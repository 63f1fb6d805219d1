"""One PostgreSQL role per process type, each allowed only its own databases and tables.

Which process uses which tables follows from where the router puts each model and who does
what (docs/deploy.md, "Which process holds which credentials"):

- ``web``: accounts' database: the users, tokens, sessions, the admin, the outbox it writes,
  the erasures, the dead letters (the admin's), the readiness projection it reads;
- ``relay``: accounts' database: the outbox, the ledger of published messages, the erasures,
  the dead letters (an erasure empties them) and the admin's access logs (it prunes them);
- ``accounts`` (``consume accounts``): accounts' database: the readiness projection, its inbox,
  announcements and tombstones, the dead letters and the erasures (its consumer checks them),
  and reads accounts' other tables;
- each context (``players``...): that context's database, every table there; in accounts'
  database only the dead letters it stores and the erasures it checks;
- ``operator`` (``reconcile``, ``onboarding_status``, ``deadletters``): reads every table of
  every database, and writes what its commands write in accounts' database (the projection,
  the ledger, the dead letters).

Migrations (``migrate_all``) and ``eventbus_prune`` run as the databases' owner, which these
grants do not touch. Run ``manage.py db_roles`` after each ``migrate_all``: a new table has no
grants until then.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.apps import apps
from django.conf import settings
from django.db import router

from onboarding.databases import POSTGRESQL_ENGINE

DML = "SELECT, INSERT, UPDATE, DELETE"
READ = "SELECT"
# What a context's or accounts' consumer needs in accounts' database besides its own tables.
CONSUMER_IN_ACCOUNTS = {"eventbus.deadletter": DML, "eventbus.erasure": READ}
OPERATOR_WRITES = {"accounts.servicereadiness": DML, "eventbus.publishedmessage": DML,
                   "eventbus.deadletter": DML}
RELAY_TABLES = {"eventbus.outboxevent", "eventbus.publishedmessage", "eventbus.erasure",
                "eventbus.deadletter", "axes.accesslog", "axes.accessfailurelog",
                "axes.accessattempt", "accounts.healingwatermark"}
# The background reconcile (accounts/healing.py) reads who registered and the projection.
RELAY_READS = {"accounts.user", "accounts.servicereadiness"}
PER_CONTEXT = {"eventbus.processedevent", "eventbus.tombstone", "eventbus.announcement"}


@dataclass(frozen=True)
class Grant:
    role: str  # the role's suffix: web, relay, accounts, players, ..., operator
    alias: str
    table: str
    privileges: str


def roles() -> list[str]:
    return ["web", "relay", "accounts", *settings.BOUNDED_CONTEXTS, "operator"]


def postgresql_aliases() -> list[str]:
    return [alias for alias, config in settings.DATABASES.items()
            if config["ENGINE"] == POSTGRESQL_ENGINE]


def _tables(alias: str) -> dict[str, str]:
    """{app_label.model_name: table} of the models that live in ``alias``."""
    found = {}
    for model in apps.get_models(include_auto_created=True):
        if model._meta.proxy or not model._meta.managed:
            continue
        if router.allow_migrate_model(alias, model):
            found[model._meta.label_lower] = model._meta.db_table
    return found


def _cache_tables() -> list[str]:
    return [cache["LOCATION"] for cache in settings.CACHES.values()
            if cache["BACKEND"].endswith("DatabaseCache")]


def grants() -> list[Grant]:
    """Every grant, per role, database and table."""
    context_alias = {context: settings.CONTEXT_DATABASES[context]
                     for context in settings.BOUNDED_CONTEXTS}
    found: list[Grant] = []
    for alias in settings.DATABASES:
        tables = _tables(alias)
        for label, table in tables.items():
            app = label.split(".")[0]
            found.append(Grant("operator", alias, table,
                               OPERATOR_WRITES.get(label, READ) if alias == "default" else READ))
            for context, its_alias in context_alias.items():
                if its_alias == alias and (app == context or label in PER_CONTEXT):
                    found.append(Grant(context, alias, table, DML))
                elif alias == "default" and label in CONSUMER_IN_ACCOUNTS:
                    found.append(Grant(context, alias, table, CONSUMER_IN_ACCOUNTS[label]))
            if alias != "default":
                continue
            if app not in context_alias and label not in PER_CONTEXT:  # accounts' own
                found.append(Grant("web", alias, table, DML))
            if label in RELAY_TABLES:
                found.append(Grant("relay", alias, table, DML))
            elif label in RELAY_READS:
                found.append(Grant("relay", alias, table, READ))
            if label in PER_CONTEXT or label == "accounts.servicereadiness":
                found.append(Grant("accounts", alias, table, DML))
            elif app == "accounts":  # its own service's tables, read (its warm-up touches them)
                found.append(Grant("accounts", alias, table, READ))
            elif label in CONSUMER_IN_ACCOUNTS:
                found.append(Grant("accounts", alias, table, CONSUMER_IN_ACCOUNTS[label]))
        if alias == "default":
            for table in _cache_tables():
                found += [Grant("web", alias, table, DML), Grant("operator", alias, table, READ)]
        # Whoever uses a database may read which migrations it has (runserver's check, say).
        users = dict.fromkeys(grant.role for grant in found if grant.alias == alias)
        found += [Grant(role, alias, "django_migrations", READ) for role in users]
    return found


def role_name(prefix: str, role: str) -> str:
    return f"{prefix}_{role}"


def statements(prefix: str, passwords: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Per database alias, the SQL that creates the roles (in the first) and grants each its
    tables, after revoking what it held before and the database from PUBLIC. Idempotent."""
    passwords = passwords or {}
    by_alias: dict[str, list[str]] = {alias: [] for alias in postgresql_aliases()}
    if not by_alias:
        return {}
    first = next(iter(by_alias))
    for role in roles():
        name = role_name(prefix, role)
        password = passwords.get(role)
        login = f"LOGIN PASSWORD '{_quote(password)}'" if password else "LOGIN"
        by_alias[first].append(
            f"DO $$ BEGIN CREATE ROLE {name} {login}; "
            f"EXCEPTION WHEN duplicate_object THEN ALTER ROLE {name} {login}; END $$")
    # The web's statement timeout on its role too: behind PgBouncer, which does not pass a
    # connection's startup options on, the server still applies it (WEB_STATEMENT_TIMEOUT).
    timeout = int(settings.WEB_STATEMENT_TIMEOUT * 1000)
    by_alias[first].append(f"ALTER ROLE {role_name(prefix, 'web')} "
                           + (f"SET statement_timeout = {timeout}" if timeout
                              else "RESET statement_timeout"))
    users_of: dict[str, set[str]] = {alias: set() for alias in by_alias}
    planned = [grant for grant in grants() if grant.alias in by_alias]
    for grant in planned:
        users_of[grant.alias].add(grant.role)
    for alias, sql in by_alias.items():
        database = settings.DATABASES[alias]["NAME"]
        sql.append(f'REVOKE CONNECT, TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        for role in roles():
            name = role_name(prefix, role)
            sql.append(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {name}")
            if role in users_of[alias]:
                sql.append(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
            else:
                sql.append(f'REVOKE CONNECT ON DATABASE "{database}" FROM {name}')
        for grant in planned:
            if grant.alias == alias:
                sql.append(f'GRANT {grant.privileges} ON TABLE "{grant.table}" '
                           f"TO {role_name(prefix, grant.role)}")
    return by_alias


def _quote(value: str) -> str:
    return value.replace("'", "''")

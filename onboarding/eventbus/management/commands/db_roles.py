import os

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from onboarding import dbroles


class Command(BaseCommand):
    help = (
        "Create one PostgreSQL role per process type (web, relay, accounts, each context, "
        "operator) and grant each only its own databases and tables (onboarding/dbroles.py). "
        "Runs as the databases' owner, after migrate_all; idempotent. A role's password comes "
        "from DB_PASSWORD_<ROLE> when set (WEB, RELAY, ACCOUNTS, PLAYERS, ..., OPERATOR).\n"
        "Example: manage.py db_roles   (or: manage.py db_roles --sql, to print the SQL)"
    )

    def add_arguments(self, parser):
        parser.add_argument("--prefix", default="onboarding",
                            help="role names are <prefix>_<role> (default: onboarding)")
        parser.add_argument("--sql", action="store_true", help="print the SQL, apply nothing")

    def handle(self, *args, prefix, sql, **options):
        if not prefix.isidentifier() or prefix.lower() != prefix:
            raise CommandError(f"--prefix must be a lower-case identifier, not {prefix!r}")
        passwords = {role: os.environ[f"DB_PASSWORD_{role.upper()}"] for role in dbroles.roles()
                     if os.environ.get(f"DB_PASSWORD_{role.upper()}")}
        plan = dbroles.statements(prefix, passwords)
        if not plan:
            raise CommandError("no PostgreSQL database configured: roles are PostgreSQL's")
        for alias, statements in plan.items():
            if sql:
                self.stdout.write(f"-- database {alias} "
                                  f"({connections[alias].settings_dict['NAME']})")
                self.stdout.write(";\n".join(statements) + ";")
                continue
            with connections[alias].cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        if sql:
            return
        for role in dbroles.roles():
            where = {}
            for grant in dbroles.grants():
                if grant.role == role and grant.alias in plan:
                    where[grant.alias] = where.get(grant.alias, 0) + 1
            self.stdout.write(f"{dbroles.role_name(prefix, role)}: " + ", ".join(
                f"{alias} ({count} table(s))" for alias, count in where.items()))

from django.apps import apps
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections, router


class Command(BaseCommand):
    help = (
        "Apply migrations to every database: accounts' (default) and each bounded context's, "
        "and create the table of a database cache (CACHE_URL=dbcache://...). One line per "
        "database counts the migrations applied of the apps whose tables it holds, and names "
        "those apps: Django records every app's migrations in every database's "
        "django_migrations, while the router creates each table in one database only (the "
        "event bus's inbox in each context's), so the raw count would be the same everywhere.\n"
        "Example: manage.py migrate_all"
    )

    def handle(self, *args, **options):
        verbosity = options["verbosity"]
        for alias in settings.DATABASES:
            contexts = [c for c, a in settings.CONTEXT_DATABASES.items() if a == alias]
            named = list(dict.fromkeys(["accounts"] * (alias == "default") + contexts))
            label = ", ".join(named)
            if verbosity >= 2:
                self.stdout.write(self.style.MIGRATE_HEADING(f"Database {alias!r} ({label}):"))
            held = held_apps(alias, first=named)
            before = applied_count(alias, held)
            # One summary line per database; -v 2 shows migrate's own output (-v 3: its detail).
            call_command(
                "migrate", database=alias, interactive=False, verbosity=max(verbosity - 1, 0),
                stdout=self.stdout, stderr=self.stderr,
            )
            applied = applied_count(alias, held) - before
            if verbosity >= 1:
                outcome = (f"{applied} migration(s) applied ({', '.join(held)})" if applied
                           else "up to date")
                self.stdout.write(f"Database {alias!r} ({label}): {outcome}")
        # A database cache (the throttles' counters shared by several web workers) needs its
        # table; the router keeps it in default. Does nothing for other cache backends, and
        # leaves an existing table alone, so a deployment can run this every time.
        call_command(
            "createcachetable", database="default", verbosity=verbosity,
            stdout=self.stdout, stderr=self.stderr,
        )
        missing = missing_tables()
        if missing:
            raise CommandError(
                "migrations are recorded but these tables do not exist — are two database "
                "settings spelling the same database differently? "
                + ", ".join(f"{table} in {alias!r}" for alias, table in missing)
            )


def missing_tables() -> list[tuple[str, str]]:
    """(alias, table) of every model table the router expects but the database lacks."""
    present = {alias: set(connections[alias].introspection.table_names())
               for alias in settings.DATABASES}
    missing = []
    for model in apps.get_models():
        if not model._meta.managed or model._meta.proxy:
            continue
        for alias in settings.DATABASES:
            if router.allow_migrate_model(alias, model) and (
                model._meta.db_table not in present[alias]
            ):
                missing.append((alias, model._meta.db_table))
    return missing


def held_apps(alias: str, *, first: list[str]) -> list[str]:
    """The labels of the apps with a table in ``alias`` (as the router places their models):
    ``first`` (those the database is named after) in that order, then the rest as installed."""
    held = {
        model._meta.app_label for model in apps.get_models(include_auto_created=True)
        if model._meta.managed and not model._meta.proxy
        and router.allow_migrate_model(alias, model)
    }
    installed = [config.label for config in apps.get_app_configs()]
    return [label for label in dict.fromkeys([*first, *installed]) if label in held]


def applied_count(alias: str, app_labels: list[str]) -> int:
    """How many migrations of ``app_labels`` ``alias``'s django_migrations records."""
    from django.db.migrations.recorder import MigrationRecorder

    recorder = MigrationRecorder(connections[alias])
    if not recorder.has_table():
        return 0
    return sum(1 for app, _ in recorder.applied_migrations() if app in app_labels)

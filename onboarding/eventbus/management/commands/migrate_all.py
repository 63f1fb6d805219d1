from django.apps import apps
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections, router


class Command(BaseCommand):
    help = (
        "Apply migrations to every database: accounts' (default) and each bounded context's, "
        "and create the table of a database cache (CACHE_URL=dbcache://...).\n"
        "Example: manage.py migrate_all"
    )

    def handle(self, *args, **options):
        verbosity = options["verbosity"]
        for alias in settings.DATABASES:
            contexts = [c for c, a in settings.CONTEXT_DATABASES.items() if a == alias]
            label = ", ".join(["accounts"] * (alias == "default") + contexts)
            if verbosity >= 2:
                self.stdout.write(self.style.MIGRATE_HEADING(f"Database {alias!r} ({label}):"))
            before = applied_count(alias)
            # One summary line per database; -v 2 shows migrate's own output (-v 3: its detail).
            call_command(
                "migrate", database=alias, interactive=False, verbosity=max(verbosity - 1, 0),
                stdout=self.stdout, stderr=self.stderr,
            )
            applied = applied_count(alias) - before
            if verbosity >= 1:
                outcome = f"{applied} migration(s) applied" if applied else "up to date"
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


def applied_count(alias: str) -> int:
    from django.db.migrations.recorder import MigrationRecorder

    recorder = MigrationRecorder(connections[alias])
    return len(recorder.applied_migrations()) if recorder.has_table() else 0

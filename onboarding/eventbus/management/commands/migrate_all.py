from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Apply migrations to every database: accounts' (default) and each bounded context's.\n"
        "Example: manage.py migrate_all"
    )

    def handle(self, *args, **options):
        verbosity = options["verbosity"]
        for alias in settings.DATABASES:
            contexts = [c for c, a in settings.CONTEXT_DATABASES.items() if a == alias]
            label = ", ".join(["accounts"] * (alias == "default") + contexts)
            self.stdout.write(self.style.MIGRATE_HEADING(f"Database {alias!r} ({label}):"))
            call_command(
                "migrate", database=alias, interactive=False, verbosity=verbosity,
                stdout=self.stdout, stderr=self.stderr,
            )

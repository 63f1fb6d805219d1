from django.core.management.base import BaseCommand, CommandError

from onboarding.eventbus.ops.labels import database_label
from onboarding.eventbus.runtime.pruning import PRUNE_BATCH, prune_everything


class Command(BaseCommand):
    help = (
        "Delete the event bus's rows no guarantee needs any more, in batches: outbox rows "
        "published longer ago than NATS_DUPLICATE_WINDOW, inbox rows older than "
        "NATS_STREAM_MAX_AGE, dead letters resolved or discarded longer ago than "
        "EVENTBUS_DEAD_LETTER_KEEP. Never an unpublished outbox row nor an open dead letter. "
        "Prints the count of each kind per database. The relay and the consumers also prune "
        "in the background (EVENTBUS_PRUNE_INTERVAL); this is for cron, or with that off.\n"
        "Example: manage.py eventbus_prune --dry-run"
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
        )
        parser.add_argument(
            "--batch", type=int, default=PRUNE_BATCH,
            help=f"rows per DELETE, each its own short transaction (default {PRUNE_BATCH})",
        )

    def handle(self, *args, dry_run, batch, **options):
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        found = prune_everything(dry_run=dry_run, batch=batch)
        by_database: dict[str, list] = {}
        for pruned in found:  # one inbox line per database, however many contexts share it
            by_database.setdefault(pruned.database, []).append(pruned)
        verb = "would delete" if dry_run else "deleted"
        for alias, counts in by_database.items():
            kinds = ", ".join(f"{p.count} {p.kind}" for p in counts)
            self.stdout.write(f"{alias} ({database_label(alias)}): {verb} {kinds}")
        if dry_run:
            self.stdout.write("dry run: nothing deleted")

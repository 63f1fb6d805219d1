import json

from django.core.management.base import BaseCommand, CommandError

from onboarding.eventbus.connection import NatsAccessError
from onboarding.eventbus.deadletters import (
    dead_letter_as_dict,
    dead_letters_open,
    dead_letters_replay,
)
from onboarding.eventbus.registry import get_consumers


class Command(BaseCommand):
    help = (
        "List dead letters, or send them back to their consumer (and only that consumer).\n"
        "Examples:\n"
        "  manage.py deadletters list [--consumer players] [--json] [--resolved]\n"
        "  manage.py deadletters replay --consumer players --id 12\n"
        "  manage.py deadletters replay --consumer players --all"
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list", help="show dead letters (unresolved by default)")
        listing.add_argument("--consumer", help="only this consumer's")
        listing.add_argument("--json", action="store_true", help="print a JSON array")
        listing.add_argument(
            "--resolved", action="store_true", help="include those already replayed and processed"
        )
        replay = actions.add_parser("replay", help="redeliver to the consumer that failed")
        replay.add_argument("--consumer", required=True)
        which = replay.add_mutually_exclusive_group(required=True)
        which.add_argument("--id", type=int, action="append", dest="ids", help="repeatable")
        which.add_argument("--all", action="store_true", help="every unresolved one")

    def handle(self, *args, action, **options):
        consumer = options.get("consumer")
        if consumer and consumer not in get_consumers():
            raise CommandError(
                f"unknown consumer {consumer}; consumers: {', '.join(get_consumers())}"
            )
        if action == "list":
            self._list(consumer, options["json"], options["resolved"])
        else:
            self._replay(consumer, options["ids"], options["all"])

    def _list(self, consumer, as_json, resolved):
        from onboarding.eventbus.deadletters import DEAD_LETTER_DATABASE
        from onboarding.eventbus.models import DeadLetter

        if resolved:
            letters = DeadLetter.objects.using(DEAD_LETTER_DATABASE).order_by("id")
            if consumer:
                letters = letters.filter(consumer=consumer)
        else:
            letters = dead_letters_open(consumer=consumer)
        if as_json:
            self.stdout.write(json.dumps([dead_letter_as_dict(x) for x in letters], indent=2))
            return
        rows = [(str(x.id), x.consumer, str(x.stream_seq), str(x.deliveries), x.user_id or "-",
                 f"{x.error_type}: {x.error_message}"[:80]) for x in letters]
        header = ("id", "consumer", "seq", "deliveries", "user_id", "error")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            self.stdout.write("  ".join([*cells, row[-1]]))
        self.stdout.write(f"{len(rows)} dead letter(s)")

    def _replay(self, consumer, ids, replay_all):
        letters = dead_letters_open(consumer=consumer)
        if not replay_all:
            letters = letters.filter(id__in=ids)
            missing = set(ids) - set(letters.values_list("id", flat=True))
            if missing:
                raise CommandError(
                    f"no unresolved dead letter of {consumer} with id "
                    f"{', '.join(map(str, sorted(missing)))}"
                )
        try:
            count = dead_letters_replay(letters=list(letters))
        except NatsAccessError as exc:
            raise CommandError(str(exc))
        except Exception as exc:
            raise CommandError(f"replay failed: {type(exc).__name__}: {exc}")
        self.stdout.write(f"replayed {count} dead letter(s) to {consumer}")

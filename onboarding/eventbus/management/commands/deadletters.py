import getpass
import json

from django.core.management.base import BaseCommand, CommandError

from onboarding.eventbus.deadletters.replay import dead_letters_replay
from onboarding.eventbus.deadletters.store import (
    dead_letter_as_dict,
    dead_letter_state,
    dead_letters_discard,
    dead_letters_list,
    dead_letters_open,
)
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.registry import get_consumers


class Command(BaseCommand):
    help = (
        "List dead letters, send them back to their consumer (and only that consumer), or "
        "discard those no replay can fix (kept on record, out of the health check).\n"
        "Examples:\n"
        "  manage.py deadletters list [--consumer players] [--json] [--resolved] [--discarded]\n"
        "  manage.py deadletters replay --consumer players --id 12\n"
        "  manage.py deadletters replay --consumer players --all\n"
        "  manage.py deadletters discard --consumer players --id 12 --reason 'user deleted'"
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list", help="show dead letters (open ones by default)")
        listing.add_argument("--consumer", help="only this consumer's")
        listing.add_argument("--json", action="store_true", help="print a JSON array")
        listing.add_argument(
            "--resolved", action="store_true", help="include those already replayed and processed"
        )
        listing.add_argument(
            "--discarded", action="store_true", help="include those an operator discarded"
        )
        replay = actions.add_parser("replay", help="redeliver to the consumer that failed")
        replay.add_argument("--consumer", required=True)
        which = replay.add_mutually_exclusive_group(required=True)
        which.add_argument("--id", type=int, action="append", dest="ids", help="repeatable")
        which.add_argument("--all", action="store_true", help="every open one")
        discard = actions.add_parser(
            "discard", help="give up on dead letters no replay can fix (they stay on record)"
        )
        discard.add_argument("--consumer", required=True)
        discard.add_argument(
            "--id", type=int, action="append", dest="ids", required=True, help="repeatable"
        )
        discard.add_argument("--reason", default="", help="why (kept with the dead letter)")

    def handle(self, *args, action, **options):
        consumer = options.get("consumer")
        if consumer and consumer not in get_consumers():
            raise CommandError(
                f"unknown consumer {consumer}; consumers: {', '.join(get_consumers())}"
            )
        if action == "list":
            self._list(consumer, options["json"], options["resolved"], options["discarded"])
        elif action == "replay":
            self._replay(consumer, options["ids"], options["all"])
        else:
            self._discard(consumer, options["ids"], options["reason"])

    def _list(self, consumer, as_json, resolved, discarded):
        letters = dead_letters_list(consumer=consumer, resolved=resolved, discarded=discarded)
        if as_json:
            self.stdout.write(json.dumps([dead_letter_as_dict(x) for x in letters], indent=2))
            return
        rows = [(str(x.id), x.consumer, str(x.stream_seq), str(x.deliveries), x.user_id or "-",
                 dead_letter_state(x), f"{x.error_type}: {x.error_message}"[:80])
                for x in letters]
        header = ("id", "consumer", "seq", "deliveries", "user_id", "state", "error")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            self.stdout.write("  ".join([*cells, row[-1]]))
        self.stdout.write(f"{len(rows)} dead letter(s)")

    def _open_letters(self, consumer, ids):
        letters = dead_letters_open(consumer=consumer).filter(id__in=ids)
        missing = set(ids) - set(letters.values_list("id", flat=True))
        if missing:
            raise CommandError(
                f"no open dead letter of {consumer} with id "
                f"{', '.join(map(str, sorted(missing)))}"
            )
        return list(letters)

    def _replay(self, consumer, ids, replay_all):
        letters = (
            list(dead_letters_open(consumer=consumer)) if replay_all
            else self._open_letters(consumer, ids)
        )
        try:
            count = dead_letters_replay(letters=letters)
        except NatsAccessError as exc:
            raise CommandError(str(exc))
        except Exception as exc:
            raise CommandError(f"replay failed: {type(exc).__name__}: {exc}")
        self.stdout.write(f"replayed {count} dead letter(s) to {consumer}")

    def _discard(self, consumer, ids, reason):
        letters = self._open_letters(consumer, ids)
        try:
            by = f"{getpass.getuser()} (manage.py)"
        except Exception:  # no login name in some containers
            by = "manage.py"
        count = dead_letters_discard(letters=letters, by=by, reason=reason)
        self.stdout.write(f"discarded {count} dead letter(s) of {consumer}")

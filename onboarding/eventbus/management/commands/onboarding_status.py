import json

from django.core.management.base import BaseCommand

from onboarding.eventbus.status import onboarding_status


class Command(BaseCommand):
    help = (
        "Per consumer: pending, ack-pending, redelivered and dead-letter counts; the outbox "
        "backlog and the age of its oldest row. Exits 1 when something is unhealthy (for probes).\n"
        "Example: manage.py onboarding_status --json"
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument(
            "--max-outbox-age", type=float, default=60.0,
            help="seconds an event may wait in the outbox before it counts as unhealthy",
        )
        parser.add_argument(
            "--max-pending", type=int, help="pending messages per consumer that count as unhealthy"
        )

    def handle(self, *args, **options):
        status = onboarding_status(
            max_outbox_age=options["max_outbox_age"], max_pending=options["max_pending"]
        )
        if options["json"]:
            self.stdout.write(json.dumps(status, indent=2))
        else:
            self._print(status)
        if not status["healthy"]:
            raise SystemExit(1)

    def _print(self, status):
        columns = ("pending", "ack_pending", "redelivered", "dead_letters")
        self.stdout.write(f"{'consumer':<14}" + "".join(f"{c:>14}" for c in columns))
        for name, entry in status["consumers"].items():
            cells = "".join(f"{entry.get(c, '?')!s:>14}" for c in columns)
            self.stdout.write(f"{name:<14}{cells}")
        outbox = status["outbox"]
        age = outbox["oldest_age_seconds"]
        self.stdout.write(
            f"outbox backlog: {outbox['backlog']}"
            + (f" (oldest {age:.1f}s old)" if age is not None else "")
        )
        if status["healthy"]:
            self.stdout.write(self.style.SUCCESS("healthy"))
        for problem in status["problems"]:
            self.stdout.write(self.style.ERROR(f"unhealthy: {problem}"))

import asyncio

from django.core.management.base import BaseCommand, CommandError

from onboarding.databases import name_connections
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.outbox.relay import OutboxRelay
from onboarding.eventbus.runtime import metrics


class Command(BaseCommand):
    help = (
        "Publish outbox events the on-commit path did not (after a crash, while NATS was "
        "down). Runs until SIGTERM/SIGINT. One relay per outbox database is active; another "
        "waits as a standby and takes over when it dies. --once does nothing (exit 0) while "
        "another relay is active, which publishes the backlog itself.\n"
        "Example: manage.py outbox_relay   (or: manage.py outbox_relay --once --grace 0)"
    )

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="flush the backlog and exit")
        parser.add_argument("--grace", type=float, help="seconds a fresh row is left alone")
        parser.add_argument("--batch", type=int, help="rows per publish batch")

    def handle(self, *args, once, grace, batch, **options):
        # Its ORM thread's sessions; its LISTEN and lock sessions are relay-listen, relay-lock.
        name_connections("relay")
        relay = OutboxRelay(grace=grace, batch=batch)
        if not once:  # a service: metrics (METRICS_PORT) and liveness (HEARTBEAT_FILE)
            try:
                metrics.start("relay")
            except metrics.MetricsError as exc:
                raise CommandError(str(exc))
        try:
            published = asyncio.run(relay.run(once=once, install_signal_handlers=True))
        except NatsAccessError as exc:
            raise CommandError(str(exc))
        except Exception as exc:  # only with --once; the service mode retries for ever
            raise CommandError(f"relay failed after {relay.published} event(s): {exc}")
        if relay.skipped:
            self.stdout.write("another relay is active and publishes the backlog: nothing done")
        elif once:
            self.stdout.write(f"published {published} event(s)")

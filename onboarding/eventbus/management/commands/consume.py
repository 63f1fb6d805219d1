import asyncio

from django.core.management.base import BaseCommand, CommandError

from onboarding.databases import name_connections
from onboarding.eventbus.consumer.runner import ConsumerRunner
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.outbox.announcer import announce_beside
from onboarding.eventbus.registry import get_consumers
from onboarding.eventbus.runtime import metrics


class Command(BaseCommand):
    help = (
        "Run a bounded context's durable JetStream consumer until SIGTERM/SIGINT.\n"
        "Example: manage.py consume players   (or: manage.py consume --all, for development)"
    )

    def add_arguments(self, parser):
        parser.add_argument("apps", nargs="*", help="consumer (app label) to run")
        parser.add_argument("--all", action="store_true", help="run every consumer")
        parser.add_argument("--batch", type=int, help="messages per fetch")
        parser.add_argument(
            "--per-message", action="store_true",
            help="one transaction per message instead of one per fetched batch",
        )

    def handle(self, *args, apps, all, batch, per_message, **options):
        consumers = get_consumers()
        if all == bool(apps):
            raise CommandError(
                f"name one or more consumers or pass --all; consumers: {', '.join(consumers)}"
            )
        names = list(consumers) if all else apps
        unknown = [name for name in names if name not in consumers]
        if unknown:
            raise CommandError(
                f"unknown consumer {', '.join(unknown)}; consumers: {', '.join(consumers)}"
            )
        if batch is not None and batch < 1:
            raise CommandError("--batch must be at least 1")
        # consume:players, or consume:players,characters,... (--all): in pg_stat_activity.
        name_connections(f"consume:{','.join(names)}")
        # Beside each consumer, its context's announcements are published (outbox/announcer).
        runner = ConsumerRunner(
            [consumers[name] for name in names], batch=batch, per_message=per_message or None,
            companion=announce_beside,
        )
        try:
            metrics.start("consumer")  # METRICS_PORT, HEARTBEAT_FILE
            asyncio.run(runner.run(install_signal_handlers=True))
        except (NatsAccessError, metrics.MetricsError) as exc:
            raise CommandError(str(exc))

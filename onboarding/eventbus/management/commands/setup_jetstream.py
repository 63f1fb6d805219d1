import asyncio

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from onboarding.eventbus.nats.connection import session
from onboarding.eventbus.nats.options import display_url
from onboarding.eventbus.nats.provisioning import ensure_consumer, ensure_stream
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.registry import get_consumers


class Command(BaseCommand):
    help = (
        "Create or update the JetStream stream and every context's durable consumer. "
        "Idempotent: run it at every deploy.\n"
        "Example: manage.py setup_jetstream --wait 30"
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--wait", type=float, default=5.0, help="seconds to wait for NATS to answer"
        )

    def handle(self, *args, wait, **options):
        try:
            changes = asyncio.run(self._provision(wait))
        except TimeoutError:
            raise CommandError(f"no NATS server answered at {display_url()} within {wait}s")
        except (NatsAccessError, RuntimeError) as exc:
            raise CommandError(str(exc))
        for change in changes:
            self.stdout.write(str(change))

    async def _provision(self, wait):
        async with session("setup_jetstream", timeout=wait) as nc:
            js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
            changes = [await ensure_stream(js)]
            for spec in get_consumers().values():
                changes.append(await ensure_consumer(js, spec))
            return changes

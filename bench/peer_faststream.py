"""The drain benchmark's peer: what a careful engineer writes instead of this project.

FastStream (``bench/requirements.txt``) with one process per context, each a durable pull
consumer of the project's stream that receives batches (``PullSub(batch_size=100,
batch=True)``), validates them with a pydantic model, writes the context's default rows in one
``bulk_create(ignore_conflicts=True)`` transaction per batch, into the same tables and databases
as the project's consumers, and returns; FastStream then acks the batch (its default ack policy,
``REJECT_ON_ERROR``: ack after the handler returns, terminate on an exception). So a batch is
acked only once its rows are committed.

What it does not do, and the project does: no inbox (a replay is harmless only because these
rows happen to be idempotent), no retries with backoff, no dead letters (a batch whose handler
raises is terminated, i.e. lost), no pause while the database is away, no per-event logs.

    python bench/peer_faststream.py players --durable peer-players --batch 100

It reads the same environment as ``manage.py consume`` (``NATS_URL``, ``DATABASE_URL`` and the
per-context URLs); ``bench/run.py`` starts four of these beside (not at the same time as) the
project's consumers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))

import django  # noqa: E402

django.setup()

from asgiref.sync import sync_to_async  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import router, transaction  # noqa: E402
from faststream import FastStream  # noqa: E402
from faststream.nats import JStream, NatsBroker, PullSub  # noqa: E402
from pydantic import AwareDatetime, BaseModel, Field  # noqa: E402

from buildings.defaults import STARTER_BUILDINGS  # noqa: E402
from buildings.models import Building  # noqa: E402
from characters.defaults import DEFAULT_CHARACTER_NAME  # noqa: E402
from characters.models import Character  # noqa: E402
from players.models import Player  # noqa: E402
from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS  # noqa: E402
from progression.models import MetaProgression  # noqa: E402

SUBJECT = "user.registered"


class UserRegistered(BaseModel):
    """The event's payload, as the peer would declare it (camelCase on the wire)."""

    user_id: uuid.UUID = Field(alias="userId")
    username: str = Field(min_length=1, max_length=150)
    email: str = Field(min_length=3, max_length=254)
    registration_timestamp: AwareDatetime = Field(alias="registrationTimestamp")


# What each context creates for a new user: the same rows as its service in this project.
DEFAULT_ROWS = {
    "players": (Player, lambda e: [Player(user_id=e.user_id, username=e.username)]),
    "characters": (Character, lambda e: [
        Character(user_id=e.user_id, name=DEFAULT_CHARACTER_NAME, is_active=True)]),
    "progression": (MetaProgression, lambda e: [
        MetaProgression(user_id=e.user_id, unlocked_weapons=list(STARTER_WEAPONS),
                        unlocked_skills=list(STARTER_SKILLS))]),
    "buildings": (Building, lambda e: [
        Building(user_id=e.user_id, kind=kind, level=level) for kind, level in STARTER_BUILDINGS]),
}


def build_app(context: str, *, durable: str, batch: int) -> FastStream:
    model, rows_of = DEFAULT_ROWS[context]
    alias = router.db_for_write(model)
    # Per-message access logs at DEBUG: off at volume, as the project's per-event logs are.
    broker = NatsBroker(settings.NATS_URL, log_level=logging.DEBUG)

    def write(events: list[UserRegistered]) -> None:
        with transaction.atomic(using=alias):
            model.objects.bulk_create(
                [row for event in events for row in rows_of(event)], ignore_conflicts=True
            )

    # The stream is the project's (setup_jetstream made it): declare=False, so FastStream
    # neither creates nor rewrites it.
    @broker.subscriber(
        SUBJECT,
        stream=JStream(settings.NATS_STREAM, declare=False),
        durable=durable,
        pull_sub=PullSub(batch_size=batch, batch=True),
    )
    async def on_users_registered(events: list[UserRegistered]) -> None:
        await sync_to_async(write)(events)

    return FastStream(broker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("context", choices=sorted(DEFAULT_ROWS))
    parser.add_argument("--durable", help="durable name (default: peer-<context>)")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    level = getattr(logging, os.environ.get("LOG_LEVEL", "WARNING").upper(), logging.WARNING)
    logging.basicConfig(level=level)
    app = build_app(args.context, durable=args.durable or f"peer-{args.context}",
                    batch=args.batch)
    asyncio.run(app.run(log_level=level))


if __name__ == "__main__":
    main()

"""The health of the event flow, for people (``manage.py onboarding_status``) and probes."""

from __future__ import annotations

import asyncio

from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from onboarding.eventbus.connection import NatsAccessError, display_url
from onboarding.eventbus.deadletters import dead_letters_open
from onboarding.eventbus.outbox import outbox_backlog
from onboarding.eventbus.registry import get_consumers


async def _consumer_stats(names: list[str]) -> dict:
    from nats.js.errors import NotFoundError

    from onboarding.eventbus.connection import session

    async with session("onboarding-status", timeout=settings.NATS_REQUEST_TIMEOUT * 2) as nc:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        stats = {}
        for name in names:
            try:
                info = await js.consumer_info(settings.NATS_STREAM, name)
            except NotFoundError:
                stats[name] = None
                continue
            stats[name] = {
                "pending": info.num_pending,
                "ack_pending": info.num_ack_pending,
                "redelivered": info.num_redelivered,
                "waiting": info.num_waiting,
            }
        return stats


def onboarding_status(*, max_outbox_age: float, max_pending: int | None) -> dict:
    """Collect per-consumer and outbox figures and decide whether the flow is healthy."""
    names = list(get_consumers())
    problems: list[str] = []
    try:
        stats = asyncio.run(_consumer_stats(names))
    except NatsAccessError as exc:
        stats = dict.fromkeys(names)
        problems.append(str(exc))
    except Exception as exc:
        stats = dict.fromkeys(names)
        problems.append(f"NATS unreachable at {display_url()}: {type(exc).__name__}: {exc}")
    dead = dict(
        dead_letters_open().values("consumer").annotate(n=Count("id")).values_list("consumer", "n")
    )
    consumers = {}
    for name in names:
        entry = dict(stats.get(name) or {})
        entry["dead_letters"] = dead.get(name, 0)
        consumers[name] = entry
        if stats.get(name) is None and not problems[:1]:
            problems.append(f"consumer {name}: durable missing (run manage.py setup_jetstream)")
        if entry["dead_letters"]:
            problems.append(f"consumer {name}: {entry['dead_letters']} dead letter(s)")
        if max_pending is not None and entry.get("pending", 0) > max_pending:
            problems.append(f"consumer {name}: {entry['pending']} pending > {max_pending}")
    backlog, oldest = outbox_backlog()
    age = (timezone.now() - oldest).total_seconds() if oldest else None
    if age is not None and age > max_outbox_age:
        problems.append(f"outbox: oldest unpublished event is {age:.0f}s old")
    return {
        "healthy": not problems,
        "problems": problems,
        "consumers": consumers,
        "outbox": {"backlog": backlog, "oldest_age_seconds": age},
    }

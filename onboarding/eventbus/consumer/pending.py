"""The durable's pending counts, as a metric: read every ``METRICS_REFRESH_INTERVAL``, never
per message, and only when metrics are served."""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from onboarding.eventbus.runtime import metrics

logger = logging.getLogger(__name__)


def watch_pending(js, consumer: str, durable: str) -> asyncio.Task | None:
    """When serving metrics: a task refreshing the durable's pending counts periodically."""
    if not metrics.enabled():
        return None

    async def watch():
        while True:
            if metrics.refresh_due(f"pending:{consumer}"):
                try:
                    info = await js.consumer_info(settings.NATS_STREAM, durable)
                except Exception as exc:  # NATS down: the fetch loop says so; keep the last
                    logger.debug("metrics: consumer_info %s failed: %s", durable, exc)
                else:
                    metrics.pending(consumer, pending=info.num_pending or 0,
                                    ack_pending=info.num_ack_pending or 0)
            await asyncio.sleep(min(1.0, settings.METRICS_REFRESH_INTERVAL))

    return asyncio.create_task(watch(), name=f"metrics-pending-{consumer}")

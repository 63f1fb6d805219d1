"""Keeping the messages in hand from being redelivered while they are worked on."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from onboarding.eventbus.consumer.messages import message_ids

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def keepalive(consumer: str, msgs: list, ack_wait: float):
    """Tell JetStream the messages in hand (``msgs``, kept up to date by the caller as it settles
    them) are still being worked on, every ack_wait/3.

    Without it a slow handler, or a batch waiting out a database outage, would see its
    messages redelivered — to another worker, or to this one after the outage. A beat that
    fails is logged (one line per beat, with the ids) and the work goes on: a redelivery it
    allows is skipped by the inbox if this worker commits first.
    """

    async def beat():
        while True:
            await asyncio.sleep(ack_wait / 3)
            failed, error = [], None
            for msg in list(msgs):
                try:
                    await msg.in_progress()
                except Exception as exc:
                    failed.append(msg)
                    error = exc
            if failed:
                logger.warning(
                    "consumer %s: keepalive (in_progress) failed for %d message(s) in hand "
                    "(%s: %s); JetStream may redeliver them after ack_wait: %s",
                    consumer, len(failed), type(error).__name__, error, message_ids(failed),
                )

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()

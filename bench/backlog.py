"""The drain's backlog on the JetStream side: events published up front, and the durables held
until every consumer process waits on its own, then released together.

Used by the drain and grown scenarios (``scenario_drain.py``, ``scenario_grown.py``), by the
latency scenario to see the consumers pulling (``on_jetstream``) and by ``bench/cpu.py``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
import uuid

from harness import check_alive, progress


def publish_backlog(events: int, user_ids: list[uuid.UUID] | None = None,
                    new_id=uuid.uuid4) -> float:
    """Publish ``events`` user.registered events (for ``user_ids`` when given, with event ids
    from ``new_id``), pipelined; return events/s."""
    import asyncio

    from onboarding.contracts import UserRegistered, event_headers
    from onboarding.eventbus.nats.connection import close, connect_within

    async def publish():
        nc = await connect_within("bench-publish", 5)
        js = nc.jetstream(timeout=10)
        now = dt.datetime.now(dt.UTC)
        started = time.monotonic()
        for i in range(events):
            user_id = user_ids[i] if user_ids else uuid.uuid4()
            event = UserRegistered(user_id=user_id, username=f"drain{i}",
                                   email=f"drain{i}@example.com", registration_timestamp=now)
            await js.publish_async(event.subject, event.to_json(),
                                   headers=event_headers(event, event_id=new_id()))
            if i % 1000 == 0:
                progress("publish", i, events, started)
        await js.publish_async_completed()
        progress("publish", events, events, started)
        elapsed = time.monotonic() - started
        await close(nc)
        return events / elapsed

    return asyncio.run(publish())


PAUSED_UNTIL = "2100-01-01T00:00:00Z"


def on_jetstream(work):
    """Run ``await work(js)`` on a connection of its own; return its result."""
    import asyncio

    from onboarding.eventbus.nats.connection import close, connect_within

    async def main():
        nc = await connect_within("bench-admin", 5)
        try:
            return await work(nc.jetstream(timeout=10))
        finally:
            await close(nc)

    return asyncio.run(main())


def hold_durables(durables: list[str], create_for: str | None = None) -> None:
    """Pause ``durables`` (creating them first, as FastStream would, for ``create_for``'s
    subject): started consumers bind and wait, and the drain starts when they are resumed."""
    from django.conf import settings
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async def work(js):
        for durable in durables:
            if create_for:
                # FastStream's own defaults for a durable pull subscriber (it binds to an
                # existing durable as it is).
                await js.add_consumer(settings.NATS_STREAM, ConsumerConfig(
                    name=durable, durable_name=durable, filter_subject=create_for,
                    deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
                    pause_until=PAUSED_UNTIL))
            else:
                await js.pause_consumer(settings.NATS_STREAM, durable, PAUSED_UNTIL)

    on_jetstream(work)


def wait_bound(durables: list[str], processes: list[subprocess.Popen], timeout: float) -> None:
    """Until every durable has a consumer process's pull request waiting on it."""
    from django.conf import settings

    async def waiting(js):
        return [(await js.consumer_info(settings.NATS_STREAM, d)).num_waiting or 0
                for d in durables]

    deadline = time.monotonic() + timeout
    while min(on_jetstream(waiting)) < 1:
        check_alive(processes, "start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumers not fetching after {timeout}s")
        time.sleep(0.1)


def resume_durables(durables: list[str], users: list[uuid.UUID], batch: int) -> None:
    """Resume the held durables, then publish one more batch of events (their users appended to
    ``users``).

    A resumed consumer serves the pull requests already waiting on it only when a message
    arrives; without one, each process would sit until its pull request expires (1 s for the
    project, 5 s for FastStream). A whole batch, not one event, so that the backlog stays a
    multiple of the batch: FastStream's batch subscriber holds a partial batch until its
    timeout (5 s by default) before handing it over.
    """
    from django.conf import settings

    from onboarding.contracts import UserRegistered, event_headers

    now = dt.datetime.now(dt.UTC)
    kick = [uuid.uuid4() for _ in range(batch)]
    events = [UserRegistered(user_id=user_id, username=f"kick{len(users) + i}",
                             email=f"kick{len(users) + i}@example.com",
                             registration_timestamp=now) for i, user_id in enumerate(kick)]

    async def work(js):
        for durable in durables:
            await js.resume_consumer(settings.NATS_STREAM, durable)
        for event in events:
            await js.publish_async(event.subject, event.to_json(),
                                   headers=event_headers(event, event_id=uuid.uuid4()))
        await js.publish_async_completed()

    on_jetstream(work)
    users.extend(kick)

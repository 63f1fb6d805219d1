"""The drain's backlog on the JetStream side: events published up front, and the durables held
until every consumer process waits on its own, then released together.

Used by the drain, mixed drain and grown scenarios (``scenario_drain.py``,
``scenario_drain_mixed.py``, ``scenario_grown.py``), by the latency and erasure scenarios to see
the consumers pulling (``on_jetstream``) and by ``bench/cpu.py``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
import uuid
from dataclasses import dataclass

from harness import check_alive, progress


def publish_events(events: int, event_of, new_id=uuid.uuid4) -> float:
    """Publish ``event_of(i)`` for i in range(``events``) (contract events, with event ids from
    ``new_id``), pipelined, in that order; return events/s."""
    import asyncio

    from onboarding.contracts import event_headers
    from onboarding.eventbus.nats.connection import close, connect_within

    async def publish():
        nc = await connect_within("bench-publish", 5)
        js = nc.jetstream(timeout=10)
        started = time.monotonic()
        for i in range(events):
            event = event_of(i)
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


def publish_backlog(events: int, user_ids: list[uuid.UUID] | None = None,
                    new_id=uuid.uuid4) -> float:
    """Publish ``events`` user.registered events (for ``user_ids`` when given, with event ids
    from ``new_id``), pipelined; return events/s."""
    from onboarding.contracts import UserRegistered

    now = dt.datetime.now(dt.UTC)

    def event_of(i: int) -> UserRegistered:
        return UserRegistered(user_id=user_ids[i] if user_ids else uuid.uuid4(),
                              username=f"drain{i}", email=f"drain{i}@example.com",
                              registration_timestamp=now)

    return publish_events(events, event_of, new_id)


@dataclass
class MixedBacklog:
    """A backlog of registrations, renames and deletions, in stream order (``plan``: (subject,
    user id, new username or None)); ``registered`` in registration order."""

    plan: list[tuple[str, uuid.UUID, str | None]]
    registered: list[uuid.UUID]
    renamed: dict[uuid.UUID, str]
    deleted: set[uuid.UUID]

    def count(self, subject: str) -> int:
        return sum(s == subject for s, _, _ in self.plan)

    def of_context(self, subjects: set[str]) -> list[tuple[str, uuid.UUID, str | None]]:
        """What a durable filtered on ``subjects`` receives, in order."""
        return [item for item in self.plan if item[0] in subjects]


def mixed_backlog(events: int, shares: tuple[int, int, int] = (70, 15, 15),
                  seed: int = 17) -> MixedBacklog:
    """``events`` events: ``shares`` percent registrations, renames and deletions (the last two
    of registered users, a user at most once each, so some users are renamed and deleted),
    in stream order per user — its registration, then its rename, then its deletion. Each
    rename lands at a random point within the next fifth of the backlog's registrations after
    its user's registration, each deletion within the next fifth after its user's registration
    or rename: most fall in later batches, some in the same batch of 100."""
    import random

    from onboarding.contracts import UserDeleted, UserRegistered, UserRenamed

    rng = random.Random(seed)
    renames = events * shares[1] // 100
    deletions = events * shares[2] // 100
    registrations = events - renames - deletions
    if renames > registrations or deletions > registrations:
        raise ValueError(f"{shares}: more renames or deletions than registrations")
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(registrations)]
    spread = max(registrations / 5, 1.0)
    keyed: list[tuple[float, int, str, uuid.UUID, str | None]] = [
        (float(i), 0, UserRegistered.subject, user, None) for i, user in enumerate(users)]
    renamed: dict[uuid.UUID, str] = {}
    renamed_at: dict[int, float] = {}
    for i in rng.sample(range(registrations), renames):
        renamed[users[i]] = f"mixr{i}"
        renamed_at[i] = i + rng.uniform(0.01, spread)
        keyed.append((renamed_at[i], 1, UserRenamed.subject, users[i], renamed[users[i]]))
    deleted = set()
    for i in rng.sample(range(registrations), deletions):
        deleted.add(users[i])
        keyed.append((renamed_at.get(i, float(i)) + rng.uniform(0.01, spread), 2,
                      UserDeleted.subject, users[i], None))
    keyed.sort()
    return MixedBacklog([(subject, user, name) for _, _, subject, user, name in keyed], users,
                        renamed, deleted)


def publish_mixed_backlog(backlog: MixedBacklog, new_id=uuid.uuid4) -> float:
    """Publish ``backlog``'s events in its order, pipelined; return events/s."""
    from onboarding.contracts import UserDeleted, UserRegistered, UserRenamed

    now = dt.datetime.now(dt.UTC)
    names = {user: f"mix{i}" for i, user in enumerate(backlog.registered)}

    def event_of(i: int):
        subject, user, username = backlog.plan[i]
        if subject == UserRegistered.subject:
            return UserRegistered(user_id=user, username=names[user],
                                  email=f"{names[user]}@example.com",
                                  registration_timestamp=now)
        if subject == UserRenamed.subject:
            return UserRenamed(user_id=user, username=username, renamed_at=now)
        return UserDeleted(user_id=user, deleted_at=now)

    return publish_events(len(backlog.plan), event_of, new_id)


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

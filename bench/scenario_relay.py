"""The relay scenario: an outbox backlog of N rows flushed by the relay, in this process."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

from harness import progress


def scenario_relay(rows: int, batch: int) -> dict:
    import asyncio

    from django.utils import timezone

    from onboarding.contracts import UserRegistered, event_headers
    from onboarding.eventbus.models import OutboxEvent
    from onboarding.eventbus.outbox.relay import OutboxRelay

    old = timezone.now() - dt.timedelta(minutes=5)
    objects = []
    for i in range(rows):
        event_id = uuid.uuid4()
        event = UserRegistered(user_id=uuid.uuid4(), username=f"relay{i}",
                               email=f"relay{i}@example.com", registration_timestamp=old)
        objects.append(OutboxEvent(event_id=event_id, subject=event.subject,
                                   payload=event.to_json().decode(),
                                   headers=event_headers(event, event_id=event_id),
                                   created_at=old))
    OutboxEvent.objects.bulk_create(objects, batch_size=1000)
    relay = OutboxRelay(grace=0, batch=batch)
    done = threading.Event()
    started = time.monotonic()

    def watch():
        while not done.wait(0.5):
            progress("relay", relay.published, rows, started)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    published = asyncio.run(relay.run(once=True))
    elapsed = time.monotonic() - started
    done.set()
    progress("relay", published, rows, started)
    assert published == rows, (published, rows)
    assert not OutboxEvent.objects.filter(published_at__isnull=True).exists()
    return {"rows": rows, "batch": batch, "events_per_s": round(rows / elapsed)}

"""Helpers for tests of the registration flow: registering users and counting what exists."""

from __future__ import annotations

import json
import threading
import time
import uuid

from buildings.models import Building
from characters.models import Character
from onboarding.contracts import UserRegistered
from players.models import Player
from progression.models import MetaProgression

STRONG_PASSWORD = "correct-horse-battery-staple"


def register(client, username: str, email: str | None = None, password: str = STRONG_PASSWORD):
    return client.post(
        "/api/auth/register",
        data=json.dumps({
            "username": username,
            "email": email or f"{username}@example.com",
            "password": password,
        }),
        content_type="application/json",
    )


def counts() -> dict[str, int]:
    return {
        "players": Player.objects.count(),
        "characters": Character.objects.count(),
        "progression": MetaProgression.objects.count(),
        "buildings": Building.objects.count(),
    }


def complete_count(n_users: int) -> dict[str, int]:
    """What ``counts()`` reads once the defaults of ``n_users`` users all exist."""
    return {"players": n_users, "characters": n_users, "progression": n_users,
            "buildings": 2 * n_users}


def assert_defaults(user_id: uuid.UUID, username: str) -> None:
    player = Player.objects.get(user_id=user_id)
    assert player.username == username
    character = Character.objects.get(user_id=user_id)
    assert (character.name, character.is_active) == ("Recruit", True)
    progression = MetaProgression.objects.get(user_id=user_id)
    assert "pistol" in progression.unlocked_weapons
    assert set(progression.unlocked_skills) == {"dash", "first_aid"}
    buildings = {(b.kind, b.level) for b in Building.objects.filter(user_id=user_id)}
    assert buildings == {("hq", 1), ("warehouse", 1)}


def sample_event(**overrides) -> UserRegistered:
    import datetime as dt

    fields = {
        "user_id": uuid.uuid4(),
        "username": "sample",
        "email": "sample@example.com",
        "registration_timestamp": dt.datetime.now(dt.UTC),
    }
    fields.update(overrides)
    return UserRegistered(**fields)


class Burst:
    """Real registrations (``user_register``: the user and its outbox row), one per
    ``interval``, on a background thread."""

    def __init__(self, n: int, interval: float, prefix: str):
        self.n, self.interval, self.prefix = n, interval, prefix
        self.user_ids: list[uuid.UUID] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="burst", daemon=True)

    @property
    def done(self) -> int:
        return len(self.user_ids)

    def _run(self):
        from django.db import connections

        from accounts.services import user_register

        try:
            for i in range(self.n):
                user = user_register(username=f"{self.prefix}{i}",
                                     email=f"{self.prefix}{i}@example.com", password="x")
                self.user_ids.append(user.id)
                time.sleep(self.interval)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            connections.close_all()

    def start(self):
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the burst did not finish"
        assert not self.errors, self.errors
        assert self.done == self.n


def handle_as_consumer(spec, events: list) -> list[bool]:
    """What ``spec``'s consumer does with ``events``, without NATS: the inbox claim and its
    handler in one transaction on its database (a context that sets users up also announces
    it there, as the runner's transaction does)."""
    from onboarding.eventbus.consumer.inbox import Incoming, process_events
    from onboarding.eventbus.ids import uuid7

    return process_events(spec, [Incoming(event, str(uuid7()), event.published_subject, 0)
                                 for event in events])


def deliver_announcements() -> int:
    """What the contexts' ``consume`` processes and ``consume accounts`` do with the
    announcements waiting in each context's outbox, without NATS: parse each as a consumer
    would, apply accounts' handlers in order, and mark them published. Returns how many."""
    from django.conf import settings
    from django.db import transaction
    from django.utils import timezone

    from onboarding.contracts import parse_event
    from onboarding.eventbus.models import Announcement
    from onboarding.eventbus.registry import get_consumers

    accounts = get_consumers()["accounts"]
    delivered = 0
    for alias in dict.fromkeys(settings.CONTEXT_DATABASES[c] for c in settings.BOUNDED_CONTEXTS):
        rows = list(Announcement.objects.using(alias).filter(published_at__isnull=True))
        with transaction.atomic():
            for row in rows:
                event = parse_event(row.subject, row.payload.encode())
                accounts.handler_for(row.subject)([event])
        Announcement.objects.using(alias).filter(id__in=[r.id for r in rows]).update(
            published_at=timezone.now())
        delivered += len(rows)
    return delivered


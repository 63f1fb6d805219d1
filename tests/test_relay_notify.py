"""PostgreSQL's fast path: the registration's NOTIFY carries the event to a LISTENing relay.

The relay runs with a long grace period here, so that an event published within seconds can only
have come through the path under test, not through the scan's safety net.
"""

from __future__ import annotations

import psycopg
import pytest
from django.db import connections

from accounts.services import user_register
from conftest import relay_flush, run_async, start_fast_path_relay, wait_until
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.outbox import notify, write

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def relay(settings, jetstream):
    if write.fast_path() != "notify":
        pytest.skip("the NOTIFY fast path is PostgreSQL's")
    running = start_fast_path_relay(settings)
    yield running
    running.stop()


def unpublished() -> int:
    return OutboxEvent.objects.filter(published_at__isnull=True).count()


async def stream_messages(js):
    from django.conf import settings

    return (await js.stream_info(settings.NATS_STREAM)).state.messages


def register_silently(settings, name: str) -> None:
    """Write a registration and its outbox row without any notification."""
    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    try:
        user_register(username=name, email=f"{name}@example.com", password="x")
    finally:
        settings.OUTBOX_PUBLISH_ON_COMMIT = True


def test_the_relay_publishes_what_the_notification_carries(relay, monkeypatch):
    # With the scan blinded, the notification is the only way the event can leave.
    monkeypatch.setattr("onboarding.eventbus.outbox.relay.outbox_unpublished", lambda **kw: [])
    for i in range(5):
        user_register(username=f"fast{i}", email=f"fast{i}@example.com", password="x")
    wait_until(lambda: run_async(stream_messages) == 5, timeout=10, message="published")
    wait_until(lambda: unpublished() == 0, timeout=10, message="marked published")


@pytest.mark.parametrize("body", ["", "not json", '{"id": 1}'], ids=["empty", "garbage", "partial"])
def test_a_notification_without_a_readable_message_makes_the_relay_scan_at_once(
    relay, settings, body
):
    register_silently(settings, "quiet")
    assert unpublished() == 1
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [notify.NOTIFY_CHANNEL, body])
    wait_until(lambda: unpublished() == 0, timeout=10, message="published by a scan")
    assert run_async(stream_messages) == 1


def test_an_event_too_large_for_a_notification_is_read_from_the_outbox(relay, monkeypatch):
    monkeypatch.setattr(notify, "NOTIFY_PAYLOAD_LIMIT", 10)
    user_register(username="large", email="large@example.com", password="x")
    wait_until(lambda: unpublished() == 0, timeout=10, message="published by a scan")
    assert run_async(stream_messages) == 1


def test_a_relay_that_lost_its_listening_connection_catches_up_on_reconnecting(relay, settings):
    register_silently(settings, "missed")  # as if notified while the relay was not listening
    params = connections["default"].get_connection_params()
    for django_only in ("cursor_factory", "context"):
        params.pop(django_only, None)
    with psycopg.connect(**params, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query = %s AND datname = current_database() AND pid <> pg_backend_pid()",
            [f"LISTEN {notify.NOTIFY_CHANNEL}"],
        ).fetchone()[0]
    assert killed >= 1
    wait_until(lambda: unpublished() == 0, timeout=15, message="published after reconnecting")
    user_register(username="after", email="after@example.com", password="x")
    wait_until(lambda: run_async(stream_messages) == 2, timeout=10, message="fast path again")


def test_a_notification_that_fails_never_fails_the_registration(settings, jetstream, monkeypatch,
                                                                caplog):
    """The NOTIFY follows the commit, in a transaction of its own (the registration's commit
    does not take PostgreSQL's server-wide notify lock): when it fails, the user and the event
    are committed all the same, and the relay's scan publishes the event."""
    if write.fast_path() != "notify":
        pytest.skip("the NOTIFY fast path is PostgreSQL's")
    monkeypatch.setattr(notify, "NOTIFY_CHANNEL", "")  # pg_notify refuses an empty channel
    user_register(username="unheard", email="unheard@example.com", password="x")
    assert "could not notify the relay" in caplog.text
    assert unpublished() == 1
    assert relay_flush(grace=0) == 1
    assert run_async(stream_messages) == 1


def test_in_a_request_the_notification_waits_until_the_response_is_sent(jetstream):
    from django.core.signals import request_finished, request_started

    if write.fast_path() != "notify":
        pytest.skip("the NOTIFY fast path is PostgreSQL's")
    with notify.outbox_listen() as listener:
        request_started.send(sender=None)
        user_register(username="deferred", email="deferred@example.com", password="x")
        assert list(listener.notifies(timeout=0.3)) == []  # committed, the response not yet sent
        request_finished.send(sender=None)
        woken = list(listener.notifies(timeout=5, stop_after=1))
    assert len(woken) == 1
    assert notify.message_from_notification(woken[0].payload).row_id == (
        OutboxEvent.objects.get().pk)

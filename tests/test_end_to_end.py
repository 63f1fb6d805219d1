"""The whole flow on a real nats-server and real databases: register → event → four services."""

from __future__ import annotations

import uuid

import pytest
from django.db import transaction

from accounts.models import User
from accounts.services import user_register
from conftest import relay_flush, run_async, wait_settled, wait_until
from onboarding.contracts import event_headers
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.registry import get_services
from tests.flow import assert_defaults, complete_count, counts, register, sample_event

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


async def stream_messages(js):
    """Messages of accounts' events in the stream (the services' announcements left out)."""
    from django.conf import settings

    info = await js.stream_info(settings.NATS_STREAM, subjects_filter=">")
    return sum(count for subject, count in (info.state.subjects or {}).items()
               if not subject.startswith(("user.onboarded.", "user.erased.")))


def test_register_over_http_creates_every_default(client, start_consumers):
    start_consumers()
    response = register(client, "sam")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"userId", "username", "email", "registrationTimestamp"}
    user_id = uuid.UUID(body["userId"])
    assert body["registrationTimestamp"].endswith("Z")

    wait_until(lambda: counts() == complete_count(1), message="all four defaults")
    assert_defaults(user_id, "sam")
    wait_settled()  # every durable acked it
    # The relay that start_consumers runs beside the consumers published it, woken by the
    # commit (a wake-up datagram on SQLite, NOTIFY on PostgreSQL), and marked the row after its
    # PubAck.
    wait_until(lambda: OutboxEvent.objects.filter(published_at__isnull=False).count() == 1)


@pytest.mark.parametrize("per_message", [False, True], ids=["batched", "per-message"])
def test_offline_consumer_catches_up_exactly_once(client, start_consumers, per_message):
    online = start_consumers(["players", "characters", "progression"], per_message=per_message)
    users = [user_register(username=f"user{i}", email=f"u{i}@example.com", password="x")
             for i in range(50)]
    wait_until(lambda: counts() == {**complete_count(50), "buildings": 0})
    online.stop()

    late = start_consumers(["buildings"], per_message=per_message)
    wait_until(lambda: counts() == complete_count(50), message="buildings caught up")
    wait_settled(["buildings"])  # all 50 acked: nothing left to redeliver
    late.stop()
    assert late.runner.processed["buildings"] == 50
    assert counts() == complete_count(50)
    for user in users[:3]:
        assert_defaults(user.id, user.username)


def test_event_republished_under_a_new_msg_id_creates_nothing_twice(start_consumers):
    event = sample_event(username="twice")

    async def publish_twice(js):
        acks = []
        for _ in range(2):  # a new Nats-Msg-Id each time: JetStream stores both
            acks.append(await js.publish(event.subject, event.to_json(),
                                          headers=event_headers(event, event_id=uuid.uuid4())))
        return acks

    acks = run_async(publish_twice)
    assert not any(ack.duplicate for ack in acks)
    running = start_consumers()
    wait_until(lambda: all(running.runner.processed[n] == 2 for n in get_services()),
               message="both copies handled")
    running.stop()
    assert counts() == complete_count(1)
    assert_defaults(event.user_id, "twice")


def test_a_redelivered_event_is_skipped_by_the_inbox(start_consumers, monkeypatch):
    """Same Event-Id twice (as a redelivery or a replay brings it): the handler runs once."""
    import players.consumers

    calls = []
    original = players.consumers.players_create_defaults
    monkeypatch.setattr(players.consumers, "players_create_defaults",
                        lambda *, users: calls.extend(users) or original(users=users))
    event = sample_event(username="inbox")
    headers = event_headers(event, event_id=uuid.uuid4())

    async def publish_twice(js):
        await js.publish(event.subject, event.to_json(), headers=headers)
        await js.publish(event.subject, event.to_json(),
                         headers={**headers, "Nats-Msg-Id": str(uuid.uuid4())})

    run_async(publish_twice)
    running = start_consumers(["players"])
    wait_until(lambda: running.runner.processed["players"] == 2)
    running.stop()
    assert len(calls) == 1
    assert counts()["players"] == 1


def test_same_msg_id_published_twice_is_stored_once(jetstream):
    event = sample_event()
    headers = event_headers(event, event_id=uuid.uuid4())

    async def publish_twice(js):
        first = await js.publish(event.subject, event.to_json(), headers=headers)
        second = await js.publish(event.subject, event.to_json(), headers=headers)
        return first, second, await stream_messages(js)

    first, second, stored = run_async(publish_twice)
    assert second.duplicate and second.seq == first.seq
    assert stored == 1


def test_nats_down_during_registration_relay_delivers_when_back(
    client, nats_server, jetstream, start_consumers
):
    nats_server.stop()
    try:
        responses = [register(client, f"offline{i}") for i in range(5)]
        assert [r.status_code for r in responses] == [201] * 5
        assert OutboxEvent.objects.filter(published_at__isnull=True).count() == 5
    finally:
        nats_server.start()

    running = start_consumers()
    wait_until(lambda: relay_flush() == 0 and
               not OutboxEvent.objects.filter(published_at__isnull=True).exists(),
               message="relay published the backlog")
    wait_until(lambda: counts() == complete_count(5), message="defaults after NATS returned")
    running.stop()
    assert run_async(stream_messages) == 5  # each event stored once
    for response in responses:
        assert_defaults(uuid.UUID(response.json()["userId"]), response.json()["username"])


def test_rolled_back_registration_publishes_nothing(start_consumers):
    running = start_consumers()
    with pytest.raises(RuntimeError), transaction.atomic():
        user_register(username="ghost", email="ghost@example.com", password="x")
        raise RuntimeError("the request failed after registering")
    assert not User.objects.exists()
    assert not OutboxEvent.objects.exists()
    assert relay_flush() == 0
    user_register(username="real", email="real@example.com", password="x")  # a marker event
    wait_until(lambda: counts() == complete_count(1))
    running.stop()
    assert run_async(stream_messages) == 1
    assert not User.objects.filter(username="ghost").exists()


def test_relay_republish_of_a_published_row_is_dropped_by_jetstream(jetstream):
    user_register(username="once", email="once@example.com", password="x")
    relay_flush()  # in notify mode (PostgreSQL) the relay is the fast path
    wait_until(lambda: OutboxEvent.objects.filter(published_at__isnull=False).exists())
    # As if the process died between the PubAck and marking the row.
    OutboxEvent.objects.update(published_at=None)
    assert relay_flush() == 1
    assert run_async(stream_messages) == 1
    assert not OutboxEvent.objects.filter(published_at__isnull=True).exists()


def test_the_outbox_row_reads_back_as_written(settings):
    """The row is INSERTed by one statement of its own (not Model.save()): every field reads
    back through the ORM as written, and its creation time orders against the relay's cutoff."""
    from onboarding.eventbus.outbox.store import outbox_unpublished
    from onboarding.eventbus.outbox.write import outbox_publish_on_commit

    settings.OUTBOX_PUBLISH_ON_COMMIT = False  # the row alone
    event = sample_event(username="readback")
    with transaction.atomic():
        written = outbox_publish_on_commit(event=event)
    row = OutboxEvent.objects.get()
    assert (row.pk, row.event_id, row.subject, row.payload, row.headers) == (
        written.pk, written.event_id, event.subject, event.to_json().decode(),
        event_headers(event, event_id=written.event_id))
    assert (row.created_at, row.published_at, row.set_aside_at, row.attempts, row.last_error) == (
        written.created_at, None, None, 0, "")
    assert [m.row_id for m in outbox_unpublished(older_than=0, limit=10)] == [row.pk]
    assert outbox_unpublished(older_than=60, limit=10) == []


def test_event_ids_sort_by_time_and_meet_the_contract(settings):
    """Event ids are UUID version 7: ids minted later sort later, as text too (the inboxes'
    unique index on the id then grows at one edge instead of everywhere: bench ``grown``)."""
    import time

    from onboarding.contracts import parse_event
    from onboarding.eventbus.ids import uuid7
    from onboarding.eventbus.outbox.write import outbox_publish_on_commit

    earlier = uuid7()
    time.sleep(0.002)  # another millisecond: within one, the order is random
    later = uuid7()
    assert (earlier.version, earlier.variant) == (7, uuid.RFC_4122)
    assert str(earlier) < str(later) and earlier < later

    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    with transaction.atomic():
        row = outbox_publish_on_commit(event=sample_event(username="sevenish"))
    assert row.event_id.version == 7
    assert parse_event(row.subject, row.payload.encode(), row.headers).username == "sevenish"


def test_the_outbox_insert_goes_through_the_connections_execute_wrappers(settings):
    """On PostgreSQL the row is written through psycopg's own cursor (server-side binding): the
    execute wrappers that tracing and APM hook into Django's connection still see it."""
    from django.db import connections

    from onboarding.eventbus.outbox.write import outbox_publish_on_commit

    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    seen = []

    def spy(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connections["default"].execute_wrapper(spy), transaction.atomic():
        row = outbox_publish_on_commit(event=sample_event(username="wrapped"))
    assert any("eventbus_outboxevent" in sql and "INSERT" in sql for sql in seen), seen
    stored = OutboxEvent.objects.get(pk=row.pk)
    assert (stored.event_id, stored.payload, stored.headers) == (
        row.event_id, row.payload, row.headers)


def test_outbox_requires_a_transaction():
    from onboarding.eventbus.outbox.write import outbox_publish_on_commit

    with pytest.raises(RuntimeError, match="inside transaction.atomic"):
        outbox_publish_on_commit(event=sample_event())


def test_notify_fast_path_wakes_the_relay_only_when_the_registration_commits():
    """PostgreSQL: the NOTIFY rides on the registration's own transaction."""
    from onboarding.eventbus.outbox.notify import NOTIFY_CHANNEL, outbox_listen
    from onboarding.eventbus.outbox.write import fast_path

    if fast_path() != "notify":
        pytest.skip("the NOTIFY fast path is PostgreSQL's")
    with outbox_listen() as listener:
        with pytest.raises(RuntimeError), transaction.atomic():
            user_register(username="ghost", email="ghost@example.com", password="x")
            raise RuntimeError("rolled back")
        assert list(listener.notifies(timeout=0.5)) == []
        user_register(username="real", email="real@example.com", password="x")
        woken = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in woken] == [NOTIFY_CHANNEL]

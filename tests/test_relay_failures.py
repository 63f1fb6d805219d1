"""The relay and the publisher under rows that never publish, acks that never come, blocking
calls and forged notifications: against the suite's real nats-server and the test databases.

Refused rows are real: a subject the stream does not take, a message over the server's max
payload. An ack that never comes is real too: a subject bound to no stream, with a plain
subscriber on it that never answers (so the server sends no "no responders" either).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import pytest
from django.core.management import call_command
from django.db import connections

from accounts.services import user_register
from conftest import RunningRelay, relay_flush, run_async, wait_until
from onboarding.contracts import EVENT_ID_HEADER, MSG_ID_HEADER
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.nats.connection import close, connect_within
from onboarding.eventbus.nats.publish import MessageTooLarge
from onboarding.eventbus.ops.health import onboarding_status
from onboarding.eventbus.outbox.publisher import BackgroundPublisher
from onboarding.eventbus.outbox.refusals import refusal
from onboarding.eventbus.outbox.relay import OutboxRelay
from onboarding.eventbus.outbox.store import OutboundMessage, outbox_requeue
from onboarding.eventbus.subjects import subject_matches

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

MAX_PAYLOAD = 1024 * 1024  # nats-server's default max_payload
SILENT = "silent.events"  # no stream takes it; the test's own subscriber never answers


@pytest.fixture
def relay_alone(settings, jetstream):
    """Only the relay publishes (no on-commit path, no NOTIFY), at once, in small batches."""
    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    settings.OUTBOX_RELAY_GRACE = 0.0
    settings.OUTBOX_MAX_ATTEMPTS = 2
    settings.OUTBOX_RELAY_BATCH = 2
    return settings


def add_row(subject: str, payload: str = "{}") -> OutboxEvent:
    event_id = uuid.uuid4()
    return OutboxEvent.objects.create(
        event_id=event_id, subject=subject, payload=payload,
        headers={MSG_ID_HEADER: str(event_id), EVENT_ID_HEADER: str(event_id)},
    )


def register(*names: str) -> None:
    for name in names:
        user_register(username=name, email=f"{name}@example.com", password="x")


async def stream_messages(js):
    from django.conf import settings

    return (await js.stream_info(settings.NATS_STREAM)).state.messages


def row(pk: int) -> OutboxEvent:
    return OutboxEvent.objects.get(pk=pk)


def healthy_unpublished() -> int:
    return OutboxEvent.objects.filter(subject="user.registered", published_at__isnull=True).count()


# -- rows that never publish ------------------------------------------------------------------


def test_rows_jetstream_refuses_are_set_aside_and_the_rows_behind_them_published(relay_alone):
    # Two rows that never publish fill the first batch (2): before, every scan took them again
    # and nothing behind them ever left.
    foreign = add_row("orders.created")
    too_large = add_row("user.registered", payload="x" * (MAX_PAYLOAD + 1))
    register("ann", "bob", "cat")
    running = RunningRelay().start()
    try:
        wait_until(lambda: healthy_unpublished() == 1, timeout=20, message="healthy published")
        wait_until(lambda: row(foreign.pk).set_aside_at and row(too_large.pk).set_aside_at,
                   timeout=20, message="both refused rows set aside")
        assert run_async(stream_messages) == 3
        for refused, why in ((foreign, "does not take subject 'orders.created'"),
                             (too_large, "max_payload")):
            refused = row(refused.pk)
            assert refused.published_at is None and refused.attempts == 2
            assert why in refused.last_error, refused.last_error

        status = onboarding_status(idle_confirm=0)
        assert not status["healthy"]
        assert status["outbox"]["set_aside"] == 2
        assert status["outbox"]["backlog"] == 0  # what waits for the relay: nothing
        assert any("2 event(s) set aside" in problem for problem in status["problems"])

        # The operator fixes one cause (the stream takes orders.* now) and requeues both: the
        # fixed one is published, the other is set aside again.
        relay_alone.NATS_STREAM_SUBJECTS = [*relay_alone.NATS_STREAM_SUBJECTS, "orders.>"]
        call_command("setup_jetstream", stdout=open("/dev/null", "w"))
        assert outbox_requeue(row_ids=[foreign.pk, too_large.pk]) == 2
        assert row(too_large.pk).attempts == 0
        wait_until(lambda: row(foreign.pk).published_at, timeout=20, message="requeued published")
        wait_until(lambda: row(too_large.pk).set_aside_at, timeout=20, message="set aside again")
        assert run_async(stream_messages) == 4
    finally:
        running.stop()
    status = onboarding_status(idle_confirm=0)
    assert status["outbox"]["set_aside"] == 1


def test_onboarding_status_command_is_unhealthy_while_a_row_is_set_aside(relay_alone):
    from io import StringIO

    add_row("orders.created")
    for _ in range(2):
        relay_flush()
    out = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("onboarding_status", "--idle-confirm", "0", stdout=out)
    assert exited.value.code == 1
    assert "set aside: 1" in out.getvalue()
    assert "unhealthy: outbox: 1 event(s) set aside" in out.getvalue()

    OutboxEvent.objects.update(published_at=OutboxEvent.objects.get().created_at)
    status = onboarding_status(idle_confirm=0)
    assert status["outbox"]["set_aside"] == 0  # published in the end: not waiting any more


def test_an_outage_counts_no_attempt(relay_alone):
    """No stream at all (not created yet, or without a leader): every publish fails with "no
    responders", which is not the row's fault. Counting it would set the outbox aside."""
    register("ann")

    async def delete_stream(js):
        from django.conf import settings

        await js.delete_stream(settings.NATS_STREAM)

    run_async(delete_stream)
    for _ in range(relay_alone.OUTBOX_MAX_ATTEMPTS + 2):
        with pytest.raises(RuntimeError, match="not acknowledged"):
            relay_flush()
    waiting = OutboxEvent.objects.get()
    assert (waiting.attempts, waiting.set_aside_at) == (0, None)
    assert "NoStreamResponseError" in waiting.last_error
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))
    assert relay_flush() == 1


def test_what_counts_as_refused(settings):
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

    def message(subject):
        return OutboundMessage(row_id=1, subject=subject, payload=b"{}", headers={})

    settings.NATS_STREAM_SUBJECTS = ["user.>", "replay.*.x"]
    assert subject_matches("user.registered", "user.>")
    assert not subject_matches("user", "user.>")
    assert subject_matches("replay.players.x", "replay.*.x")
    assert not subject_matches("replay.players.x.y", "replay.*.x")
    ours, foreign = message("user.registered"), message("orders.created")
    for transient in (NoStreamResponseError(), NatsTimeout(), ConnectionError("down"),
                      ServiceUnavailableError(code=503), APIError(code=500, err_code=10077)):
        assert refusal(ours, transient) is None, transient
        assert refusal(foreign, transient) is not None, transient
    for refused in (MessageTooLarge("big"), APIError(code=400, err_code=10054)):
        assert refusal(ours, refused) is not None, refused


# -- PubAck futures ---------------------------------------------------------------------------


async def silent_subscriber(received: list | None = None):
    """A plain subscriber on SILENT that never answers: a publish there never gets a PubAck."""
    async def ignore(msg):
        if received is not None:
            received.append(msg.subject)

    nc = await connect_within("tests-silent", 5)
    await nc.subscribe(SILENT, cb=ignore)
    await nc.flush()
    return nc


def test_the_relay_leaves_no_pubAck_future_pending(relay_alone):
    """A publish whose ack never comes, then one that raises (over max_payload): before, the
    raise left the first future pending for ever, and nats-py the second's."""
    relay_alone.NATS_REQUEST_TIMEOUT = 0.5
    relay_alone.OUTBOX_RELAY_BATCH = 10
    add_row(SILENT)
    add_row("user.registered", payload="x" * (MAX_PAYLOAD + 1))
    register("ann")
    relay = OutboxRelay()

    async def main():
        listener = await silent_subscriber()
        try:
            try:
                await relay.run(once=True)
            except Exception:
                pass  # what matters is what it leaves behind
            return relay._js.publish_async_pending()
        finally:
            await close(listener)

    assert asyncio.run(main()) == 0
    assert OutboxEvent.objects.filter(published_at__isnull=False).count() == 1  # ann's


def test_the_publisher_leaves_no_pubAck_future_pending(relay_alone):
    relay_alone.NATS_REQUEST_TIMEOUT = 0.5
    rows = [add_row(SILENT), add_row("user.registered", payload="x" * (MAX_PAYLOAD + 1)),
            add_row("user.registered")]
    listener_loop = asyncio.new_event_loop()
    received = []
    listener = listener_loop.run_until_complete(silent_subscriber(received))
    thread = threading.Thread(target=listener_loop.run_forever, daemon=True)
    thread.start()
    publisher = BackgroundPublisher()
    try:
        publisher.submit([OutboundMessage.from_row(r) for r in rows])

        def pending():
            async def count():
                return None if publisher._js is None else publisher._js.publish_async_pending()

            return asyncio.run_coroutine_threadsafe(count(), publisher._loop).result(5)

        wait_until(lambda: received, timeout=10, message="the silent subject published")
        wait_until(lambda: pending() == 0, timeout=10, message="no PubAck future pending")
        wait_until(lambda: row(rows[2].pk).published_at, timeout=10, message="healthy marked")
    finally:
        publisher.close()
        asyncio.run_coroutine_threadsafe(close(listener), listener_loop).result(5)
        listener_loop.call_soon_threadsafe(listener_loop.stop)
        thread.join(5)
    assert row(rows[0].pk).published_at is None and row(rows[1].pk).published_at is None


def pg_only():
    if connections["default"].vendor != "postgresql":
        pytest.skip("PostgreSQL's NOTIFY")


def test_the_admin_shows_set_aside_rows_and_requeues_them(client, django_user_model, settings):
    from django.urls import reverse
    from django.utils import timezone

    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    client.login(username="admin", password="pw")
    register("ann")
    refused = add_row("orders.created")
    OutboxEvent.objects.filter(pk=refused.pk).update(
        attempts=5, set_aside_at=timezone.now(), last_error="stream USERS does not take it"
    )
    url = reverse("admin:eventbus_outboxevent_changelist")

    def listed(**query):
        response = client.get(url, query)
        assert response.status_code == 200
        return {r.pk for r in response.context["cl"].result_list}

    assert listed(published="set_aside") == {refused.pk}
    assert refused.pk not in listed(published="no")  # waiting for the relay: not this one
    assert "stream USERS does not take it" in client.get(url).content.decode()
    assert "1 set aside" in client.get(reverse("admin:eventbus_flow")).content.decode()

    response = client.post(url, {"action": "requeue",
                                 "_selected_action": [r.pk for r in OutboxEvent.objects.all()]},
                           follow=True)
    # Not set aside: ann's registration and the superuser's (every account is announced).
    assert "Requeued 1 outbox event(s) (2 not set aside, left as they are)." in (
        response.content.decode()
    )
    requeued = row(refused.pk)
    assert (requeued.set_aside_at, requeued.attempts) == (None, 0)
    assert listed(published="set_aside") == set()
    assert refused.pk in listed(published="no")


# -- the event loop never blocks ---------------------------------------------------------------


def test_the_relay_releases_its_lock_and_connections_off_the_event_loop(relay_alone):
    """Releasing the lock (a PostgreSQL session to close) and closing the ORM's connections
    block on the database: on the loop, they froze everything else the loop runs."""
    relay = OutboxRelay()
    releasing, loop_ran, loop_ran_meanwhile = threading.Event(), threading.Event(), []
    real_release = relay._lock.release

    def slow_release():
        releasing.set()
        loop_ran_meanwhile.append(loop_ran.wait(10))  # True unless the loop waits on us
        real_release()

    relay._lock.release = slow_release

    async def main():
        async def witness():
            while not releasing.is_set():
                await asyncio.sleep(0.01)
            loop_ran.set()

        task = asyncio.create_task(witness())
        await relay.run(once=True)
        await task

    asyncio.run(main())
    assert loop_ran_meanwhile == [True]


# -- forged notifications (PostgreSQL) ---------------------------------------------------------


@pytest.fixture
def listening_relay(settings, jetstream):
    from onboarding.eventbus.outbox.write import fast_path

    if fast_path() != "notify":
        pytest.skip("the NOTIFY fast path is PostgreSQL's")
    settings.OUTBOX_RELAY_GRACE = 60.0  # nothing leaves by the scan unless asked for
    running = RunningRelay().start()
    assert running.relay.listening.wait(10), "the relay never listened"
    assert running.relay.scanned.wait(10), "the relay never scanned"
    yield running
    running.stop()


def notify(body: str) -> None:
    """NOTIFY from a session of its own, as any role that may connect to the database can."""
    from onboarding.eventbus.outbox.notify import NOTIFY_CHANNEL
    from onboarding.eventbus.outbox.store import outbox_connection

    with outbox_connection() as session:
        session.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, body])


async def stored(js):
    """(Nats-Msg-Id, subject, payload) of every message in the stream."""
    from django.conf import settings

    last = (await js.stream_info(settings.NATS_STREAM)).state.last_seq
    found = []
    for seq in range(1, last + 1):
        msg = await js.get_msg(settings.NATS_STREAM, seq)
        found.append((msg.headers.get(MSG_ID_HEADER), msg.subject, msg.data.decode()))
    return found


def test_a_forged_notification_publishes_nothing_and_marks_nothing(listening_relay, settings):
    import json

    settings.OUTBOX_PUBLISH_ON_COMMIT = False  # written without a notification
    register("ann")
    settings.OUTBOX_PUBLISH_ON_COMMIT = True
    real = OutboxEvent.objects.get()
    forged_id = str(uuid.uuid4())
    forged_payload = real.payload.replace(real.payload[-40:-2], "0" * 38)

    def message(**changes):
        return json.dumps({"id": real.pk, "subject": real.subject, "payload": real.payload,
                           "headers": real.headers, **changes})

    for body in (
        message(headers={**real.headers, EVENT_ID_HEADER: forged_id, MSG_ID_HEADER: forged_id}),
        message(payload=forged_payload),  # the real ids, another payload
        message(subject="user.deleted"),
        message(id=real.pk + 1000),  # no such row
    ):
        notify(body)
    # A real registration notified after them: once it is in the stream, the relay has been
    # through the forged ones (one channel, delivered in commit order).
    register("bob")
    bob = OutboxEvent.objects.exclude(pk=real.pk).get()
    wait_until(lambda: run_async(stored) == [(str(bob.event_id), bob.subject, bob.payload)],
               timeout=10, message="bob's event published through the fast path")
    wait_until(lambda: row(bob.pk).published_at, timeout=10, message="bob's row marked")
    assert row(real.pk).published_at is None  # nothing marked by the forgeries

    notify("")  # a notification without a message: the relay scans at once
    wait_until(lambda: row(real.pk).published_at, timeout=10, message="published by the scan")
    assert run_async(stored) == [
        (str(bob.event_id), bob.subject, bob.payload),
        (str(real.event_id), real.subject, real.payload),
    ]


def test_the_publisher_retries_a_publish_no_stream_answered(relay_alone, caplog):
    """While a stream's leadership moves (a node in lame-duck mode, one rejoining), a publish
    finds no responder for a moment. The on-commit publisher tries again a few times within a
    second or two, rather than leaving the row to wait the relay's grace (issue 19: one user
    waited 5.7 s for that in the rehearsal's rolling restart). Staged with a subject no stream
    takes until the first attempt has failed, when a stream for it appears."""
    import logging

    caplog.set_level(logging.DEBUG, logger="onboarding.eventbus.outbox.publisher")
    late = add_row("late.events")
    publisher = BackgroundPublisher()

    async def stream(create: bool):
        nc = await connect_within("tests-late-stream", 5)
        try:
            js = nc.jetstream()
            if create:
                await js.add_stream(name="LATE", subjects=["late.events"])
            else:
                await js.delete_stream("LATE")
        finally:
            await close(nc)

    try:
        publisher.submit([OutboundMessage.from_row(late)])
        wait_until(lambda: "found no stream leader" in caplog.text, timeout=10,
                   interval=0.01, message="the first attempt answered by no one")
        asyncio.run(stream(create=True))
        wait_until(lambda: row(late.pk).published_at, timeout=10,
                   message="the row published by the publisher's retry")
    finally:
        publisher.close()
        with contextlib.suppress(Exception):
            asyncio.run(stream(create=False))
    assert row(late.pk).attempts == 0  # the relay never had to touch it


def test_a_stream_without_a_leader_is_retried_within_a_second(relay_alone, caplog):
    """No responder to a publish is what a stream without a leader answers (an election). The
    relay retries it within a second rather than backing off 2, 4, 8 s: in the rehearsal's
    leader kills it slept 4 s past the new leader's election, and a user waited 14.5 s (issue
    19). Staged with the stream deleted: the same answer, for as long as the test wants."""
    import logging
    import re

    from nats.js.errors import NotFoundError

    caplog.set_level(logging.WARNING, logger="onboarding.eventbus.outbox.relay")

    async def delete(js):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(relay_alone.NATS_STREAM)

    run_async(delete)
    register("ann")
    running = RunningRelay().start()
    delays = lambda: [float(d) for d in re.findall(  # noqa: E731
        r"relay batch failed, retrying in ([\d.]+)s", caplog.text)]
    try:
        wait_until(lambda: len(delays()) >= 5, timeout=30, message="five failed batches")
        call_command("setup_jetstream", stdout=open("/dev/null", "w"))
        wait_until(lambda: healthy_unpublished() == 0, timeout=20, message="ann's published")
    finally:
        running.stop()
    assert "NoStreamResponseError" in caplog.text
    assert max(delays()) <= 1.0, delays()  # not 0.5, 1, 2, 4, 8


def test_the_quick_backoff_is_for_elections_only_and_for_a_while():
    from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

    from onboarding.eventbus.nats.elections import during_election
    from onboarding.eventbus.runtime.lifecycle import Backoff

    assert during_election(NoStreamResponseError())
    assert during_election(ServiceUnavailableError())
    try:
        try:
            raise NoStreamResponseError()
        except NoStreamResponseError as exc:
            raise RuntimeError("3 publish(es) not acknowledged") from exc
    except RuntimeError as wrapped:
        assert during_election(wrapped)  # what the relay and the announcer raise
    assert not during_election(TimeoutError())
    assert not during_election(None)

    backoff = Backoff(initial=0.5, maximum=10.0)
    assert [backoff.next(quick=True) for _ in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert backoff.next() == 10.0  # another failure: the usual steps went on meanwhile
    backoff.reset()
    backoff._failing_since = -1e9  # failing for longer than an election lasts
    backoff._next = 8.0
    assert backoff.next(quick=True) == 8.0

"""``manage.py onboarding_status``: each unhealthy signal in its unhealthy state and the healthy
state, against the real nats-server and databases, the command run as a real process where the
exit code is what a probe sees."""

from __future__ import annotations

import datetime as dt
import json
import socket
import uuid

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from accounts.services import user_register
from conftest import consumer_state, relay_flush, run_async, wait_settled, wait_until
from onboarding.eventbus.deadletters.store import dead_letter_store
from onboarding.eventbus.models import Announcement, OutboxEvent, ProcessedEvent
from onboarding.eventbus.nats.options import display_url
from onboarding.eventbus.ops.health import onboarding_status
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

RUNNING = ["players", "characters", "progression"]  # buildings is the one left stopped


def status_process(manage, *args, **env) -> tuple[int, str]:
    process = manage("onboarding_status", *args, **env)
    return process.wait(30), process.output()


def status_in_process(*args) -> tuple[int, str]:
    """The command in this process (same code path, cheaper than a process on 2 shared cores)."""
    from io import StringIO

    out = StringIO()
    try:
        call_command("onboarding_status", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


def json_of(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def register(n: int, prefix: str = "u") -> list:
    return [user_register(username=f"{prefix}{i}", email=f"{prefix}{i}@example.com",
                          password="x") for i in range(n)]


def all_published():
    return not OutboxEvent.objects.filter(published_at__isnull=True).exists()


def test_a_stopped_consumer_with_pending_events_is_unhealthy_until_it_runs(
    start_consumers, manage
):
    """The reported bug: "healthy, exit 0" while buildings was stopped with 3 events pending."""
    start_consumers(["accounts", *RUNNING])
    users = register(3)
    wait_until(all_published, message="outbox published")  # then settled means applied
    wait_settled(RUNNING, timeout=20)
    wait_until(lambda: consumer_state("buildings") == (3, 0), message="3 pending for buildings")

    code, output = status_process(manage)
    assert code == 1, output
    assert "unhealthy: consumer buildings: 3 event(s) pending and no client pulling" in output
    for name in RUNNING:
        assert f"consumer {name}:" not in output, output
    assert "STALLED" in output
    header = next(line for line in output.splitlines() if line.startswith("consumer "))
    assert "waiting" in header
    # It names what it checked: the NATS server (no password) and every database.
    assert f"nats: {display_url()}" in output
    for alias in {"default", *settings.CONTEXT_DATABASES.values()}:
        assert f"database {alias}: " in output

    code, output = status_process(manage, "--json")
    status = json_of(output)
    assert code == 1 and status["healthy"] is False
    assert status["consumers"]["buildings"]["stalled"] is True
    assert status["consumers"]["buildings"]["pending"] == 3
    assert status["consumers"]["buildings"]["waiting"] == 0

    start_consumers(["buildings"])
    wait_settled(timeout=20)
    assert counts() == complete_count(len(users))
    code, output = status_process(manage)
    assert code == 0, output
    assert "healthy" in output.splitlines()[-1]


def test_healthy_stack_exit_0_and_json_keeps_its_keys(start_consumers, manage):
    start_consumers()
    register(2)
    wait_until(all_published, message="outbox published")  # then settled means applied
    wait_settled(timeout=20)

    code, output = status_process(manage, "--json")
    assert code == 0, output
    status = json_of(output)
    # The keys scripts already read, and the new ones.
    assert {"healthy", "problems", "consumers", "outbox"} <= set(status)
    assert status["healthy"] is True and status["problems"] == []
    assert set(status["outbox"]) == {"backlog", "oldest_age_seconds", "set_aside"}
    for name in settings.BOUNDED_CONTEXTS:
        entry = status["consumers"][name]
        # Each context's announcements: published at once by its consume process.
        wait_until(lambda name=name: onboarding_status()["consumers"][name]["announcements"]
                   == {"backlog": 0, "oldest_age_seconds": None},
                   message=f"{name}'s announcements published")
        assert {"pending", "ack_pending", "redelivered", "waiting", "dead_letters"} <= set(entry)
        assert entry["pending"] == 0 and entry["stalled"] is False
        assert entry["durable"] == "present"
    # A running consumer has a pull request open, but not at every instant: each fetch expires
    # after a second and the next one opens a moment later. Sampled again, every consumer
    # shows one (one sample failed in about one CI run in ten).
    wait_until(
        lambda: all(e["waiting"] >= 1 for e in onboarding_status()["consumers"].values()),
        timeout=10, message="every consumer with a pull request open",
    )
    assert status["nats"] == {"server": display_url(), "stream": settings.NATS_STREAM,
                              "reachable": True}
    assert set(status["databases"]) == {"default", *settings.CONTEXT_DATABASES.values()}


def test_a_busy_consumer_is_never_called_stalled(start_consumers):
    """The rule must not flap: consumers draining a burst one message per transaction have
    instants with no pull request open and nothing unacknowledged."""
    # The backlog is in the stream before the consumers start, so that the checks overlap the
    # drain (registering while they run, a fast drain could end with the last registration).
    register(40, prefix="burst")
    relay_flush()
    start_consumers(batch=2, per_message=True)
    seen = []
    while counts() != complete_count(40):
        status = onboarding_status()
        seen.append({n: e["stalled"] for n, e in status["consumers"].items()})
        assert not any(seen[-1].values()), status
    assert seen, "the drain ended before a single check"


def test_a_consumer_killed_with_a_batch_in_hand_is_unhealthy(start_consumers, manage):
    """JetStream keeps a dead client's messages ack-pending (not pending) until a client pulls
    again: "pending and nobody pulling" alone would call this durable fine for ever."""
    import time

    start_consumers(["accounts", *RUNNING])
    buildings = manage("consume", "buildings", faults=True, FAULT_SLOW="buildings:60")
    buildings.wait_for_output("consumers started")
    register(2)
    wait_until(lambda: consumer_state("buildings")[1] >= 1, message="a batch in hand")
    buildings.kill()  # SIGKILL: no nak, the batch stays with the dead client
    wait_settled(RUNNING, timeout=20)
    time.sleep(2.5)

    code, output = status_in_process("--max-unacked-age", "2")
    assert code == 1, output
    in_hand = consumer_state("buildings")[1]
    assert (f"unhealthy: consumer buildings: {in_hand} event(s) delivered but unacknowledged "
            "for over 2s and no client pulling") in output
    assert "STUCK" in output
    # By default a batch may be in hand for a minute (a slow handler, a short outage).
    assert onboarding_status()["consumers"]["buildings"]["stuck"] is False

    start_consumers(["buildings"])  # gets them once ack_wait has passed
    wait_settled(timeout=30)
    assert counts() == complete_count(2)
    assert status_in_process("--max-unacked-age", "2")[0] == 0


def test_a_missing_durable_is_unhealthy(jetstream):
    async def delete(js):
        await js.delete_consumer(settings.NATS_STREAM, "characters")

    run_async(delete)
    code, output = status_in_process()
    assert code == 1, output
    assert "unhealthy: consumer characters: durable missing" in output
    assert "durable missing" in output.splitlines()[
        next(i for i, line in enumerate(output.splitlines()) if line.startswith("characters"))
    ]
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))
    assert status_in_process()[0] == 0


def test_an_old_unpublished_outbox_event_is_unhealthy_past_the_threshold(jetstream, manage):
    OutboxEvent.objects.create(
        event_id=uuid.uuid4(), subject="user.registered", payload="{}",
        created_at=timezone.now() - dt.timedelta(seconds=120),
    )
    code, output = status_process(manage)
    assert code == 1, output
    assert "unhealthy: outbox: oldest unpublished event is 12" in output  # 120 s and a bit
    assert "s old (> 60s; is `manage.py outbox_relay` running?)" in output
    code, output = status_in_process("--max-outbox-age", "300")
    assert code == 0, output


def test_an_old_unpublished_announcement_is_unhealthy_past_the_threshold(jetstream, manage):
    """A context whose announcements wait (its consume process down, or refused the subject):
    the users' readiness waits with them, so the flow is unhealthy, naming the context."""
    Announcement.objects.using(settings.CONTEXT_DATABASES["characters"]).create(
        event_id=uuid.uuid4(), context="characters", subject="user.onboarded.characters",
        payload="{}", created_at=timezone.now() - dt.timedelta(seconds=120))
    code, output = status_process(manage)
    assert code == 1, output
    assert "announcements waiting: characters 1 (oldest 12" in output
    assert ("unhealthy: consumer characters: oldest unpublished announcement is 12") in output
    assert "is `manage.py consume characters` running, and may it publish " \
        "user.onboarded.characters?); users' readiness waits for it" in output
    status = json_of(status_process(manage, "--json")[1])
    assert status["consumers"]["characters"]["announcements"]["backlog"] == 1
    assert status["consumers"]["players"]["announcements"]["backlog"] == 0
    assert "announcements" not in status["consumers"]["accounts"]  # it announces nothing
    code, output = status_in_process("--max-outbox-age", "300")  # the outbox's threshold
    assert code == 0, output


def test_a_context_database_that_does_not_answer_is_one_line(jetstream, manage):
    """Its announcements cannot be read: said in one line, naming the database without its
    password, never a traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        db_port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    code, output = status_process(
        manage, BUILDINGS_DATABASE_URL=f"postgres://nobody:db-pw@127.0.0.1:{db_port}/gone")
    assert code == 1, output
    assert "Traceback" not in output and "db-pw" not in output
    assert (f"unhealthy: consumer buildings: announcements not read: database buildings "
            f"(postgres://nobody@127.0.0.1:{db_port}/gone) unreachable: OperationalError") in output


def test_open_dead_letters_are_unhealthy_until_discarded(jetstream, manage):
    letter, other = (dead_letter_store(
        consumer="progression", subject="user.registered", stream=settings.NATS_STREAM,
        stream_seq=seq, event_id=str(uuid.uuid4()), payload=b"not json", headers={},
        deliveries=1, error=ValueError("not JSON"),
    ) for seq in (7, 8))
    code, output = status_process(manage)
    assert code == 1, output
    assert "unhealthy: consumer progression: 2 open dead letter(s)" in output
    assert status_in_process("--max-dead-letters", "2")[0] == 0

    discard = manage("deadletters", "discard", "--consumer", "progression",
                     "--id", str(letter.id), "--id", str(other.id),
                     "--reason", "garbage, nothing to replay")
    assert discard.wait(30) == 0, discard.output()
    assert "discarded 2 dead letter(s) of progression" in discard.output()
    letter.refresh_from_db()
    assert letter.discarded_at is not None
    assert letter.discard_reason == "garbage, nothing to replay"
    code, output = status_process(manage)
    assert code == 0, output

    # Out of the default list, in it on request; not discardable twice; not replayable.
    listing = manage("deadletters", "list", "--json")
    assert listing.wait(30) == 0
    assert json.loads(listing.output()) == []
    listing = manage("deadletters", "list", "--json", "--discarded")
    assert listing.wait(30) == 0
    shown = json.loads(listing.output())
    assert [(x["id"], x["state"]) for x in shown] == [(letter.id, "discarded"),
                                                      (other.id, "discarded")]
    again = manage("deadletters", "discard", "--consumer", "progression", "--id", str(letter.id))
    assert again.wait(30) == 1
    assert "no open dead letter of progression" in again.output()
    assert "Traceback" not in again.output()


def test_unreachable_nats_is_unhealthy_and_names_the_server_without_its_password(
    jetstream, manage
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    url = f"nats://operator:s3cret-pw@127.0.0.1:{port}"
    code, output = status_process(manage, NATS_URL=url)
    assert code == 1, output
    assert f"NATS unreachable at nats://operator@127.0.0.1:{port}" in output
    assert f"nats: nats://operator@127.0.0.1:{port}" in output
    assert "s3cret-pw" not in output
    assert "Traceback" not in output


# -- one user's story -------------------------------------------------------------------------


def test_user_story_follows_the_event_to_each_service(start_consumers, manage):
    start_consumers(["accounts", *RUNNING])
    [user] = register(1, prefix="story")
    wait_until(all_published, message="outbox published")  # then settled means applied
    wait_settled(RUNNING, timeout=20)
    event = OutboxEvent.objects.get()
    seq = ProcessedEvent.objects.using(settings.CONTEXT_DATABASES["players"]).get(
        consumer="players", event_id=str(event.event_id)).stream_seq

    code, output = status_process(manage, "--user", str(user.id))
    assert code == 1, output  # not set up everywhere yet
    assert f"user {user.id} (story0)" in output
    assert f"event {event.event_id} user.registered: published" in output
    assert f"stream seq {seq}" in output
    lines = {line.split()[0]: line for line in output.splitlines() if line.split()}
    assert "missing" in lines["buildings"] and "not yet" in lines["buildings"]
    assert "story0" in lines["players"] and "passed" in lines["players"]
    # Named as the admin's user page names it (the record's own text), not by its primary key.
    assert "meta progression level 1" in lines["progression"]
    assert f"nats: {display_url()}" in output

    code, output = status_process(manage, "--user", str(user.id), "--json")
    story = json_of(output)
    assert code == 1
    assert story["event"]["stream_seq"] == seq
    assert story["services"]["buildings"]["missing"] is True
    assert story["services"]["buildings"]["inbox"] is None
    assert story["services"]["buildings"]["durable"]["passed"] is False
    for name in RUNNING:
        service = story["services"][name]
        assert service["records"] and service["complete"], (name, service)
        assert service["inbox"]["stream_seq"] == seq
        assert service["durable"]["passed"] is True

    start_consumers(["buildings"])
    wait_settled(timeout=20)
    code, output = status_process(manage, "--user", str(user.id), "--json")
    assert code == 0, output
    story = json_of(output)
    assert story["complete"] is True
    assert [r["text"] for r in story["services"]["buildings"]["records"]] == [
        "HQ level 1", "Warehouse level 1"]
    assert story["services"]["buildings"]["durable"]["passed"] is True


def test_user_story_shows_the_users_dead_letters(jetstream):
    user = user_register(username="dl", email="dl@example.com", password="x")
    event = OutboxEvent.objects.get()
    letter = dead_letter_store(
        consumer="buildings", subject="user.registered", stream=settings.NATS_STREAM,
        stream_seq=42, event_id=str(event.event_id), payload=event.payload.encode(),
        headers={}, deliveries=4, error=RuntimeError("warehouse exploded"),
    )
    code, output = status_in_process("--user", str(user.id), "--json")
    story = json_of(output)
    assert code == 1
    [shown] = story["services"]["buildings"]["dead_letters"]
    assert (shown["id"], shown["state"]) == (letter.id, "open")
    assert "warehouse exploded" in shown["error"]
    # Nobody handled the event: its sequence comes from the dead letter.
    assert story["event"]["stream_seq"] == 42
    code, output = status_in_process("--user", str(user.id))
    assert f"#{letter.id} open" in output
    assert "RuntimeError: warehouse exploded" in output


@pytest.mark.parametrize("value, message", [
    (str(uuid.UUID(int=7)), "unknown user 00000000-0000-0000-0000-000000000007"),
    ("not-a-uuid", "not a user id (a UUID expected): 'not-a-uuid'"),
])
def test_user_story_of_an_unknown_or_malformed_id_is_a_clear_error(
    jetstream, manage, value, message
):
    for args in (("--user", value), ("--user", value, "--json")):
        code, output = status_process(manage, *args)
        assert code == 1, output
        assert message in output
        assert "Traceback" not in output

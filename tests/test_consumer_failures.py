"""Bad messages and failing handlers: set aside or retried, never lost, never fatal."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from django.conf import settings

from conftest import run_async, wait_settled, wait_until
from onboarding.contracts import VERSION_HEADER, event_headers
from onboarding.eventbus.consumer.failures import retry_delay
from onboarding.eventbus.models import DeadLetter
from onboarding.eventbus.registry import get_consumers, get_services
from tests.flow import assert_defaults, complete_count, counts, sample_event

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def publish_all(messages):
    """Publish (payload, headers) pairs in order on user.registered; return their sequences."""

    async def publish(js):
        return [
            (await js.publish("user.registered", payload, headers=headers)).seq
            for payload, headers in messages
        ]

    return run_async(publish)


def valid(event):
    return event.to_json(), event_headers(event, event_id=uuid.uuid4())


def poison_messages():
    good = sample_event().to_payload()
    return {
        "not-json": (b"\x00\xffnot json{", {"Nats-Msg-Id": "p1"}),
        "json-array": (b"[1, 2, 3]", {"Nats-Msg-Id": "p2"}),
        "bad-uuid": (json.dumps({**good, "userId": "not-a-uuid"}).encode(), {"Nats-Msg-Id": "p3"}),
        "oversized-username": (
            json.dumps({**good, "username": "x" * 100_000}).encode(), {"Nats-Msg-Id": "p4"}
        ),
        "missing-email": (
            json.dumps({k: v for k, v in good.items() if k != "email"}).encode(),
            {"Nats-Msg-Id": "p5"},
        ),
        "naive-timestamp": (
            json.dumps({**good, "registrationTimestamp": "2026-01-01T00:00:00"}).encode(),
            {"Nats-Msg-Id": "p6"},
        ),
        "unknown-version": (
            json.dumps(good).encode(), {"Nats-Msg-Id": "p7", VERSION_HEADER: "99"}
        ),
    }


def test_poison_messages_are_dead_lettered_and_valid_ones_still_land(start_consumers):
    poison = poison_messages()
    events = [sample_event(username=f"valid{i}") for i in range(len(poison) + 1)]
    interleaved = [valid(events[0])]
    for event, bad in zip(events[1:], poison.values(), strict=False):
        interleaved += [bad, valid(event)]
    sequences = publish_all(interleaved)

    running = start_consumers()
    wait_until(lambda: counts() == complete_count(len(events)), message="valid events landed")
    wait_until(lambda: DeadLetter.objects.count() == len(poison) * 4, message="dead letters")
    running.stop()

    for event in events:
        assert_defaults(event.user_id, event.username)
    wait_settled()  # the poison messages were terminated, not left to ack_wait
    poison_seqs = set(sequences[1::2])
    for name in get_services():
        letters = DeadLetter.objects.filter(consumer=name)
        assert set(letters.values_list("stream_seq", flat=True)) == poison_seqs
        assert set(letters.values_list("error_type", flat=True)) == {"ContractError"}
        assert set(letters.values_list("deliveries", flat=True)) == {1}  # never retried
    letter = DeadLetter.objects.get(consumer="players", event_id="p1")
    assert bytes(letter.payload) == b"\x00\xffnot json{"
    assert letter.subject == "user.registered" and letter.stream == settings.NATS_STREAM
    assert "x" * 100 not in DeadLetter.objects.get(consumer="players", event_id="p4").error_message


def test_transient_failure_is_retried_with_growing_delay_and_applied_once(
    start_consumers, monkeypatch
):
    import players.consumers

    calls = []
    original = players.consumers.players_create_defaults

    def flaky(**kwargs):
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ConnectionError("database went away")
        return original(**kwargs)

    monkeypatch.setattr(players.consumers, "players_create_defaults", flaky)
    event = sample_event(username="flaky")
    publish_all([valid(event)])
    running = start_consumers(["players"])
    wait_until(lambda: counts()["players"] == 1, message="processed after retries")
    running.stop()
    assert len(calls) == 3
    assert not DeadLetter.objects.exists()
    gaps = [later - earlier for earlier, later in zip(calls, calls[1:], strict=False)]
    # nak(delay) guarantees at least the delay before the redelivery, and it doubles.
    assert gaps[0] >= retry_delay(1) * 0.9 and gaps[1] >= retry_delay(2) * 0.9, gaps
    assert retry_delay(1) < retry_delay(2) < retry_delay(3)


def test_a_handler_that_always_fails_becomes_a_dead_letter_after_max_deliver(
    start_consumers, monkeypatch
):
    import buildings.consumers

    def broken(**kwargs):
        raise ConnectionError("still down")

    monkeypatch.setattr(buildings.consumers, "buildings_create_defaults", broken)
    event, later = sample_event(username="doomed"), sample_event(username="after")
    publish_all([valid(event), valid(later)])
    running = start_consumers(["buildings", "players"])
    wait_until(lambda: DeadLetter.objects.filter(consumer="buildings").count() == 2,
               timeout=30, message="both dead-lettered after max deliveries")
    running.stop()
    letter = DeadLetter.objects.get(consumer="buildings", user_id=str(event.user_id))
    assert letter.deliveries == settings.CONSUMER_MAX_DELIVER
    assert (letter.error_type, letter.error_message) == ("ConnectionError", "still down")
    assert counts()["players"] == 2  # the other consumer was unaffected


def test_consume_command_rejects_unknown_consumers():
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="unknown consumer nope; consumers: accounts, players"):
        call_command("consume", "nope")
    with pytest.raises(CommandError, match="name one or more consumers or pass --all"):
        call_command("consume")


def test_a_new_failure_at_a_reused_sequence_does_not_overwrite_an_old_dead_letter():
    """A stream deleted and created again restarts its sequence numbers."""
    from onboarding.eventbus.deadletters.store import dead_letter_store

    for event_id in ("old-event", "new-event"):
        dead_letter_store(consumer="players", subject="user.registered", stream="USERS",
                          stream_seq=1, event_id=event_id, payload=b"{}", headers={},
                          deliveries=1, error=ValueError(event_id))
    assert set(DeadLetter.objects.values_list("event_id", flat=True)) == {"old-event", "new-event"}


def test_duplicates_within_and_across_batches_create_nothing_twice(start_consumers):
    events = [sample_event(username=f"dup{i}") for i in range(30)]
    first = [valid(e) for e in events]
    # The same facts again: some under a new event id (only the services' constraints can
    # tell), some as exact redeliveries (same Event-Id: the inbox tells).
    again_new_id = [valid(e) for e in events[:10]]
    again_same_id = [(payload, {**headers, "Nats-Msg-Id": str(uuid.uuid4())})
                     for payload, headers in first[10:20]]
    publish_all(first + again_new_id + again_same_id)
    running = start_consumers(batch=25)  # duplicates land in the same and in later batches
    wait_until(lambda: all(running.runner.processed[n] == 50 for n in get_services()))
    running.stop()
    assert counts() == complete_count(30)
    for event in events:
        assert_defaults(event.user_id, event.username)


def test_a_failing_event_does_not_fail_its_batch_mates(start_consumers, monkeypatch):
    import characters.consumers

    bad = sample_event(username="bad")
    original = characters.consumers.characters_create_defaults

    def picky(*, user_ids):
        if bad.user_id in set(user_ids):
            raise ValueError("this user breaks the character service")
        return original(user_ids=user_ids)

    monkeypatch.setattr(characters.consumers, "characters_create_defaults", picky)
    good = [sample_event(username=f"mate{i}") for i in range(9)]
    publish_all([valid(e) for e in good[:4]] + [valid(bad)] + [valid(e) for e in good[4:]])
    running = start_consumers(["characters"], batch=20)
    wait_until(lambda: counts()["characters"] == 9, message="the batch-mates landed")
    wait_until(lambda: DeadLetter.objects.filter(consumer="characters").exists(), timeout=30,
               message="the bad one dead-lettered after its retries")
    running.stop()
    letter = DeadLetter.objects.get(consumer="characters")
    assert letter.user_id == str(bad.user_id) and letter.error_type == "ValueError"
    assert counts()["characters"] == 9


@pytest.mark.parametrize("returning", [True, False], ids=["insert-returning", "select-then-insert"])
def test_the_inbox_applies_each_event_once_within_and_across_batches(monkeypatch, returning):
    from onboarding.contracts import UserRegistered
    from onboarding.eventbus.consumer import inbox

    monkeypatch.setattr(inbox, "_returning_supported", lambda connection: returning)
    spec = get_consumers()["players"]
    events = [sample_event(username=f"inbox{i}") for i in range(3)]

    def item(event, event_id):
        return inbox.Incoming(event, event_id, UserRegistered.subject, 1)

    first = inbox.process_events(
        spec, [item(events[0], "e0"), item(events[1], "e1"), item(events[0], "e0")]
    )
    assert first == [True, True, False]
    second = inbox.process_events(spec, [item(events[1], "e1"), item(events[2], "e2")])
    assert second == [False, True]
    assert counts()["players"] == 3
    assert inbox.inbox_claim(spec.database, spec.name, []) == set()


def test_the_inbox_claims_a_batch_larger_than_one_statement(monkeypatch):
    from onboarding.contracts import UserRegistered
    from onboarding.eventbus.consumer import inbox

    monkeypatch.setattr(inbox, "INBOX_CHUNK", 3)
    spec = get_consumers()["players"]
    items = [
        inbox.Incoming(sample_event(username=f"chunk{i}"), f"c{i}", UserRegistered.subject, i)
        for i in range(8)
    ]
    assert inbox.process_events(spec, items[:2]) == [True, True]
    assert inbox.process_events(spec, items) == [False, False] + [True] * 6
    assert counts()["players"] == 8

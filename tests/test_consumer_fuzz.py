"""Hostile messages in bulk, straight onto the stream: the consumers never stop, apply every
valid event, dead-letter each hostile message exactly once and leave nothing to redeliver.

The hostile payloads come from the decoder fuzzer's strategies (tests/test_contracts_fuzz.py),
drawn derandomized: the same messages on every run. Headers vary in shape on both kinds of
message: none at all, no Nats-Msg-Id or no Event-Id, junk beside them, odd values.
"""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings

from conftest import run_async, wait_settled, wait_until
from onboarding.contracts import VERSION_HEADER, ContractError, parse_event
from onboarding.eventbus.deadletters.store import DEAD_LETTER_HEADER
from onboarding.eventbus.models import DeadLetter
from onboarding.eventbus.registry import get_consumers, get_services
from tests.flow import assert_defaults, complete_count, counts, sample_event
from tests.test_consumer_failures import publish_all
from tests.test_contracts_fuzz import VALID, dump, hostile_payloads

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

DRAWN = 50  # hostile payloads drawn; those the decoder happens to accept are left out
MAX_PAYLOAD = 1024 * 1024  # nats-server's default max_payload (headers included)


def drawn(strategy, n: int) -> list:
    """``n`` values of ``strategy``, the same ones on every run."""
    values = []

    @hypothesis_settings(max_examples=n, derandomize=True, database=None,
                         phases=[Phase.generate], deadline=None,
                         suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        values.append(value)

    collect()
    return values


def odd_headers(i: int, *, hostile: bool) -> dict | None:
    """The i-th shape of headers; each has a fresh id, so JetStream deduplicates nothing."""
    event_id = str(uuid.uuid4())
    shapes = [
        None,  # a bare PUB: no headers at all
        {},
        {"Nats-Msg-Id": event_id},  # no Event-Id
        {"Event-Id": event_id},  # no Nats-Msg-Id
        {"Nats-Msg-Id": event_id, "Event-Id": event_id, VERSION_HEADER: "1"},
        {"Nats-Msg-Id": event_id, "X-Junk": "nul\x00byte", "X-Unicode": "ℌ𝔢𝔩𝔩𝔬 ０１ \ufeff"},
        {"Nats-Msg-Id": event_id, DEAD_LETTER_HEADER: "²"},  # str.isdigit() says yes
        {"Nats-Msg-Id": event_id, DEAD_LETTER_HEADER: "9" * 30},  # past any integer column
        {"Nats-Msg-Id": event_id, DEAD_LETTER_HEADER: "9" * 5000},  # past int()'s digit limit
        {"Nats-Msg-Id": event_id, "Event-Id": ""},
    ]
    if hostile:
        shapes += [
            {"Nats-Msg-Id": event_id, VERSION_HEADER: "１"},  # a fullwidth one
            {"Nats-Msg-Id": event_id, "Event-Id": "e" * 1000},
        ]
    return shapes[i % len(shapes)]


def hostile_messages() -> list[tuple[bytes, dict | None]]:
    messages = []
    for i, payload in enumerate(drawn(hostile_payloads, DRAWN)):
        if len(payload) > MAX_PAYLOAD // 2:
            continue  # the near-limit ones are below, sized to fit
        headers = odd_headers(i, hostile=True)
        try:
            parse_event("user.registered", payload, headers)
        except ContractError:
            messages.append((payload, headers))
    # Near the server's max payload (headers count towards it), and a valid event's bytes
    # broken by one invalid UTF-8 sequence.
    near_limit = MAX_PAYLOAD - 2048
    messages += [
        (dump({**VALID, "username": "x" * near_limit}, True), None),
        (b"[" * near_limit, {"Nats-Msg-Id": str(uuid.uuid4())}),
        (dump({**VALID, "padding": "\U0001f600" * (near_limit // 12)}, True)[:-1],
         {"Event-Id": str(uuid.uuid4())}),  # 😀 as \ud83d\ude00, cut short: not JSON
        (dump(VALID, True).replace(b"alice", b"al\xffce"), {}),
        # the dead letter keeps the userId it can read: these two no database column takes
        (dump({**VALID, "userId": "nul\x00id"}, True), {"Nats-Msg-Id": str(uuid.uuid4())}),
        (dump({**VALID, "userId": "lone\ud800"}, True), {"Event-Id": "\x00"}),
    ]
    for payload, headers in messages:  # each one must be a contract error, not an accident
        with pytest.raises(ContractError):
            parse_event("user.registered", payload, headers)
    return messages


def test_hostile_messages_are_dead_lettered_once_and_the_consumers_carry_on(start_consumers):
    hostile = hostile_messages()
    assert 40 <= len(hostile) <= 64, len(hostile)
    events = [sample_event(username=f"calm{i}") for i in range(len(hostile) + 1)]
    valid = [(e.to_json(), odd_headers(i, hostile=False)) for i, e in enumerate(events)]
    for payload, headers in valid:
        parse_event("user.registered", payload, headers)  # valid, whatever the headers
    interleaved = [valid[0]]
    for good, bad in zip(valid[1:], hostile, strict=True):
        interleaved += [bad, good]
    sequences = publish_all(interleaved)
    hostile_seqs = set(sequences[1::2])

    running = start_consumers()
    wait_until(lambda: counts() == complete_count(len(events)), timeout=60,
               message="every valid event applied")
    consumers = len(get_services())  # those that take user.registered: not accounts
    wait_until(lambda: DeadLetter.objects.count() == consumers * len(hostile), timeout=60,
               message="a dead letter per hostile message and consumer")
    assert running.thread.is_alive() and running.error is None  # it never stopped
    wait_settled()  # num_pending 0 and num_ack_pending 0 on every durable

    async def redelivered(js):
        return {name: (await js.consumer_info(settings.NATS_STREAM, name)).num_redelivered
                for name in get_consumers()}

    assert run_async(redelivered) == dict.fromkeys(get_consumers(), 0)
    running.stop()

    for event in events:
        assert_defaults(event.user_id, event.username)
    for name in get_services():
        letters = DeadLetter.objects.filter(consumer=name)
        seqs = list(letters.values_list("stream_seq", flat=True))
        assert sorted(seqs) == sorted(hostile_seqs)  # each one, exactly once
        assert set(letters.values_list("error_type", flat=True)) == {"ContractError"}
        assert set(letters.values_list("deliveries", flat=True)) == {1}  # never retried
        assert set(letters.values_list("resolved_at", flat=True)) == {None}
    print(f"\nFUZZ consumers: valid={len(events)} hostile={len(hostile)} "
          f"dead_letters={DeadLetter.objects.count()} redelivered=0")


@pytest.mark.parametrize("letter_id", ["²", "١٢", "9" * 30, "9" * 5000, "-1", " 1", ""])
def test_a_dead_letter_id_no_dead_letter_can_have_is_ignored(letter_id):
    """Not a replay of a dead letter: a new dead letter is stored, and nothing is resolved."""
    from onboarding.eventbus.deadletters.store import dead_letter_resolve, dead_letter_store

    letter = dead_letter_store(
        consumer="players", subject="user.registered", stream="USERS", stream_seq=7,
        event_id="odd", payload=b"{}", headers={DEAD_LETTER_HEADER: letter_id}, deliveries=1,
        error=ContractError("payload: expected a JSON object"),
    )
    assert DeadLetter.objects.get() == letter
    assert dead_letter_resolve(consumer="players", headers={DEAD_LETTER_HEADER: letter_id}) == 0


def test_a_dead_letter_keeps_what_a_database_cannot_store_as_near_as_it_can():
    from onboarding.eventbus.deadletters.store import dead_letter_store

    payload = dump({**VALID, "userId": "a\x00b\ud800"}, True)
    letter = dead_letter_store(
        consumer="players", subject="user.registered", stream="USERS", stream_seq=8,
        event_id="nul\x00id", payload=payload, headers={"X-Junk": "nul\x00byte"},
        deliveries=1, error=ContractError("userId: not a UUID: 'a\x00b'"),
    )
    letter.refresh_from_db()
    assert bytes(letter.payload) == payload  # the bytes themselves, untouched
    assert (letter.user_id, letter.event_id) == ("a\ufffdb?", "nul\ufffdid")
    assert letter.headers == {"X-Junk": "nul\ufffdbyte"}

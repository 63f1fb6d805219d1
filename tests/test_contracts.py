"""The event contract: what producers emit and what consumers accept."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from onboarding.contracts import (
    ContractError,
    UserRegistered,
    event_headers,
    parse_event,
)
from tests.flow import sample_event

SUBJECT = "user.registered"


def payload(**changes):
    data = sample_event().to_payload()
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_payload_is_exactly_the_four_fields():
    event = sample_event()
    data = json.loads(event.to_json())
    assert set(data) == {"userId", "username", "email", "registrationTimestamp"}
    assert data["userId"] == str(event.user_id)
    assert data["registrationTimestamp"].endswith("Z")


def test_round_trip():
    event = sample_event(registration_timestamp=dt.datetime(2026, 1, 2, 3, 4, 5, 6, dt.UTC))
    assert parse_event(SUBJECT, event.to_json()) == event


def test_headers_carry_a_stable_msg_id_and_version():
    event_id = uuid.uuid4()
    assert event_headers(sample_event(), event_id=event_id) == {
        "Nats-Msg-Id": str(event_id), "Event-Id": str(event_id), "Event-Version": "1"
    }


def test_unknown_extra_fields_are_ignored():
    data = json.loads(payload())
    data["favouriteColour"] = "green"
    assert parse_event(SUBJECT, json.dumps(data).encode()).username == "sample"


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[]", "expected a JSON object"),
        (payload(userId=...), "userId: required"),
        (payload(userId="nope"), "userId: not a UUID"),
        (payload(userId=42), "userId: expected a string"),
        (payload(username=""), "username: must not be empty"),
        (payload(username="x" * 151), "username: longer than 150"),
        (payload(username=None), "username: expected a string"),
        (payload(email="not-an-email"), "email: not a valid address"),
        (payload(email="a@" + "b" * 300 + ".com"), "email: longer than 254"),
        (payload(registrationTimestamp="yesterday"), "registrationTimestamp: not ISO 8601"),
        (payload(registrationTimestamp="2026-01-01T00:00:00"), "no time zone"),
        (payload(registrationTimestamp="9" * 65), "registrationTimestamp: longer than 64"),
    ],
)
def test_invalid_payloads_are_contract_errors(data, problem):
    with pytest.raises(ContractError, match=problem):
        parse_event(SUBJECT, data)


def test_unknown_version_and_subject_are_contract_errors():
    with pytest.raises(ContractError, match="unsupported user.registered version '2'"):
        parse_event(SUBJECT, payload(), {"Event-Version": "2"})
    with pytest.raises(ContractError, match="unknown event subject"):
        parse_event("user.suspended", payload())


def test_missing_version_header_means_version_1():
    assert isinstance(parse_event(SUBJECT, payload(), {}), UserRegistered)

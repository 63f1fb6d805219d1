"""The services' announcements (``user.onboarded.<service>``, ``user.erased.<service>``): their
contract, and what a context writes to its outbox for a handled batch."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
from django.conf import settings
from django.db import transaction
from hypothesis import given
from hypothesis import strategies as st

from onboarding.contracts import (
    MAX_USERS_PER_ANNOUNCEMENT,
    ContractError,
    UserErased,
    UserOnboarded,
    event_headers,
    parse_event,
)
from onboarding.eventbus.announcing import announce_erased, announce_onboarded
from onboarding.eventbus.models import Announcement, Tombstone

AT = dt.datetime(2026, 12, 6, 5, 30, tzinfo=dt.UTC)
USERS = [uuid.UUID(int=n) for n in (3, 1, 2)]


def onboarded_payload(**changes) -> bytes:
    data = {"service": "players", "userIds": [str(u) for u in USERS],
            "onboardedAt": "2026-12-06T05:30:00Z", **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_one_announcement_names_every_user_of_the_batch():
    event = UserOnboarded(service="players", user_ids=tuple(USERS), onboarded_at=AT)
    assert event.published_subject == "user.onboarded.players"
    assert json.loads(event.to_json()) == {
        "service": "players", "userIds": [str(u) for u in USERS],
        "onboardedAt": "2026-12-06T05:30:00.000000Z"}
    assert parse_event("user.onboarded.players", event.to_json()) == event
    assert event.key is None  # about many users: filed under none of them


@pytest.mark.parametrize("changes, problem", [
    ({"userIds": []}, "userIds: must not be empty"),
    ({"userIds": ...}, "userIds: required"),
    ({"userIds": str(USERS[0])}, "userIds: expected a list"),
    ({"userIds": [str(USERS[0]), str(USERS[0])]}, "more than once"),
    ({"userIds": [str(USERS[0]).upper(), str(USERS[0])]}, "more than once"),
    ({"userIds": ["{" + str(USERS[0]) + "}"]}, "userIds: not a UUID"),
    ({"userIds": [7]}, "userIds: not a UUID"),
    ({"userIds": [str(uuid.UUID(int=n)) for n in range(MAX_USERS_PER_ANNOUNCEMENT + 1)]},
     f"more than {MAX_USERS_PER_ANNOUNCEMENT}"),
    ({"service": "characters"}, "announced on another service's subject"),
    ({"service": "Players"}, "not a service name"),
    ({"onboardedAt": "2026-12-06T05:30:00"}, "no time zone"),
])
def test_a_broken_announcement_is_a_contract_error(changes, problem):
    with pytest.raises(ContractError, match=problem):
        parse_event("user.onboarded.players", onboarded_payload(**changes))


def test_the_first_one_user_shape_is_still_read():
    """What main wrote before announcements were batched (``userId``), left unpublished or on
    the stream by an earlier version, is read as a one-user announcement, not set aside."""
    data = onboarded_payload(userIds=..., userId=str(USERS[0]))
    event = parse_event("user.onboarded.players", data)
    assert event.user_ids == (USERS[0],)


def test_an_announcement_names_one_to_the_limit_of_users():
    with pytest.raises(ValueError):
        UserErased(service="players", user_ids=(), erased_at=AT)


announcements = st.builds(
    lambda kind, service, users, at: kind(service, tuple(users), at),
    st.sampled_from([UserOnboarded, UserErased]),
    st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True),
    st.lists(st.uuids(), min_size=1, max_size=40, unique=True),
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1),
                 timezones=st.just(dt.UTC)))


@given(event=announcements)
def test_announcements_round_trip(event):
    again = parse_event(event.published_subject, event.to_json(),
                        event_headers(type(event), event_id=uuid.uuid4()))
    assert again == event and again.to_json() == event.to_json()


# -- what a context writes -----------------------------------------------------------------------


def written(context: str) -> list[dict]:
    rows = Announcement.objects.using(settings.CONTEXT_DATABASES[context]).filter(
        context=context).order_by("id")
    return [{"subject": row.subject, **json.loads(row.payload)} for row in rows]


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_batch_is_one_announcement_in_pieces_of_the_limit_and_leaves_erased_users_out():
    alias = settings.CONTEXT_DATABASES["players"]
    users = [uuid.UUID(int=n) for n in range(1, MAX_USERS_PER_ANNOUNCEMENT + 3)]
    Tombstone.objects.using(alias).create(context="players", user_id=users[5])
    with transaction.atomic(using=alias):
        assert announce_onboarded(context="players", user_ids=users + users[:3]) == 2
    first, second = written("players")
    assert first["subject"] == second["subject"] == "user.onboarded.players"
    named = first["userIds"] + second["userIds"]
    assert len(first["userIds"]) == MAX_USERS_PER_ANNOUNCEMENT
    assert named == sorted(named) and len(set(named)) == len(named)
    assert set(named) == {str(u) for u in users} - {str(users[5])}

    with transaction.atomic(using=alias):
        assert announce_erased(context="players", user_ids=[users[5]]) == 1
    assert written("players")[-1]["userIds"] == [str(users[5])]


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_nothing_to_announce_writes_nothing_and_a_rollback_takes_the_announcement_with_it():
    alias = settings.CONTEXT_DATABASES["buildings"]
    Tombstone.objects.using(alias).create(context="buildings", user_id=USERS[0])
    with transaction.atomic(using=alias):
        assert announce_onboarded(context="buildings", user_ids=[]) == 0
        assert announce_onboarded(context="buildings", user_ids=[USERS[0]]) == 0
    with pytest.raises(RuntimeError), transaction.atomic(using=alias):
        announce_onboarded(context="buildings", user_ids=USERS[1:])
        raise RuntimeError("the handler's transaction fails")
    assert written("buildings") == []
    # One of a batch erased here: the others are announced without it.
    with transaction.atomic(using=alias):
        assert announce_onboarded(context="buildings", user_ids=USERS) == 1
    [announced] = written("buildings")
    assert announced["userIds"] == sorted(str(u) for u in USERS[1:])
    with transaction.atomic(using=alias):  # none erased: the one statement
        assert announce_onboarded(context="buildings", user_ids=USERS[1:]) == 1
    assert written("buildings")[-1]["userIds"] == sorted(str(u) for u in USERS[1:])

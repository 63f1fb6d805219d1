"""The register and token endpoints: valid input creates a user and its event; bad input gets a
clear 400 and leaves nothing behind."""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import IntegrityError

from accounts import services
from accounts.models import User
from onboarding.eventbus.models import OutboxEvent

pytestmark = pytest.mark.django_db

STRONG = "correct-horse-battery-staple"


def post(client, data, content_type="application/json"):
    body = data if isinstance(data, (str, bytes)) else json.dumps(data)
    return client.post("/api/auth/register", data=body, content_type=content_type)


def valid(**changes):
    data = {"username": "sam", "email": "sam@example.com", "password": STRONG}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def assert_nothing_written():
    assert not User.objects.exists()
    assert not OutboxEvent.objects.exists()


def test_register_returns_the_four_fields_and_writes_user_and_event(client):
    response = post(client, valid())
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"userId", "username", "email", "registrationTimestamp"}
    user = User.objects.get()
    assert body["userId"] == str(user.id)
    assert (body["username"], body["email"]) == ("sam", "sam@example.com")
    assert body["registrationTimestamp"].endswith("Z")
    assert user.password != STRONG and user.check_password(STRONG)  # only the hash is stored

    event = OutboxEvent.objects.get()
    assert event.subject == "user.registered"
    assert json.loads(event.payload) == body  # the event carries exactly the response fields
    assert STRONG not in event.payload
    assert event.headers["Nats-Msg-Id"] == str(event.event_id)


@pytest.mark.parametrize(
    "data, field, problem",
    [
        (valid(username=...), "username", "required"),
        (valid(email=...), "email", "required"),
        (valid(password=...), "password", "required"),
        (valid(username=123), "username", "Must be a string"),
        (valid(email=["a@b.c"]), "email", "Must be a string"),
        (valid(password=12345678901), "password", "Must be a string"),
        (valid(username=None), "username", "may not be null"),
        (valid(username=""), "username", "may not be blank"),
        (valid(username="x" * 151), "username", "no more than 150"),
        (valid(username="bad name!"), "username", "Enter a valid username"),
        (valid(email="not-an-email"), "email", "valid email"),
        (valid(password="123"), "password", "too short"),
        (valid(password="password"), "password", "too common"),
        (valid(password="83659275019"), "password", "entirely numeric"),
        (valid(password="sam@example.com1"), "password", "too similar"),
        (valid(password="x" * 1_000_000), "password", "no more than 1024"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(client, data, field, problem):
    response = post(client, data)
    assert response.status_code == 400, response.content
    assert problem.lower() in " ".join(response.json()[field]).lower()
    assert_nothing_written()


@pytest.mark.parametrize(
    "body", ["not json", "{", "", "[1, 2]", '"a string"', "null", "[" * 100_000]
)
def test_a_body_that_is_not_a_json_object_is_a_400(client, body):
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()  # a JSON error body
    assert_nothing_written()


def test_form_data_is_refused_with_415(client):
    response = client.post("/api/auth/register", data=valid())
    assert response.status_code == 415
    assert_nothing_written()


@pytest.mark.parametrize(
    "second, field",
    [
        (valid(username="SAM", email="other@example.com"), "username"),
        (valid(username="other", email="SAM@Example.COM"), "email"),
    ],
)
def test_duplicates_in_any_case_are_refused(client, second, field):
    assert post(client, valid()).status_code == 201
    response = post(client, second)
    assert response.status_code == 400
    assert response.json() == {field: [f"A user with that {field} already exists."]}
    assert User.objects.count() == 1 and OutboxEvent.objects.count() == 1


def test_a_lost_race_is_a_400_not_a_500(client, monkeypatch):
    """The pre-check passes for both racers; the database constraint decides."""
    assert post(client, valid()).status_code == 201
    real, calls = services.user_taken_field, []

    def racing_pre_check(**kwargs):  # the racer's pre-check ran before the winner committed
        calls.append(kwargs)
        return None if len(calls) == 1 else real(**kwargs)

    monkeypatch.setattr(services, "user_taken_field", racing_pre_check)
    response = post(client, valid(username="Sam", email="other@example.com"))
    assert response.status_code == 400
    assert response.json() == {"username": ["A user with that username already exists."]}
    assert User.objects.count() == 1 and OutboxEvent.objects.count() == 1
    assert len(calls) == 1  # the constraint's name told which field, no second look needed


@pytest.mark.parametrize("name", ["\u212aam", "ｋａｍ"])  # Kelvin sign K; full-width letters
def test_lookalike_usernames_are_the_same_user(client, name):
    assert post(client, valid(username="kam", email="kam@example.com")).status_code == 201
    response = post(client, valid(username=name, email="other@example.com"))
    assert response.status_code == 400, response.content
    assert "username" in response.json()
    assert User.objects.count() == 1


def test_the_database_enforces_case_insensitive_uniqueness():
    User.objects.create(username="sam", email="sam@example.com")
    with pytest.raises(IntegrityError):
        User.objects.create(username="SaM", email="x@example.com")


def test_the_throttle_keys_on_the_peer_not_on_x_forwarded_for(client, monkeypatch):
    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    cache.clear()
    # DRF reads the rates once, at import: patch where it keeps them.
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"register": "2/minute"})
    statuses = [
        post_with(client, valid(username=f"t{i}", email=f"t{i}@example.com"),
                  HTTP_X_FORWARDED_FOR=f"10.0.0.{i}").status_code
        for i in range(4)
    ]
    cache.clear()
    assert statuses == [201, 201, 429, 429]


def post_with(client, data, **extra):
    return client.post("/api/auth/register", data=json.dumps(data),
                       content_type="application/json", **extra)


def test_token_lets_the_client_act_as_the_user(client):
    user_id = post(client, valid()).json()["userId"]
    response = client.post(
        "/api/auth/token", data={"username": "sam", "password": STRONG},
        content_type="application/json",
    )
    assert response.status_code == 200
    token = response.json()["token"]
    me = client.get("/api/auth/me", HTTP_AUTHORIZATION=f"Token {token}")
    assert me.status_code == 200 and me.json()["userId"] == user_id
    assert client.get("/api/auth/me").status_code in (401, 403)


def test_token_with_a_wrong_password_is_a_400(client):
    post(client, valid())
    response = client.post(
        "/api/auth/token", data={"username": "sam", "password": "wrong"},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json() == {"detail": ["Unable to log in with provided credentials."]}


def test_user_id_is_a_uuid():
    user = User.objects.create(username="u", email="u@example.com")
    assert isinstance(user.pk, uuid.UUID)


def test_with_publishing_switched_off_no_event_is_written(client, settings):
    settings.ACCOUNTS_PUBLISH_EVENTS = False
    assert post(client, valid()).status_code == 201
    assert User.objects.count() == 1 and not OutboxEvent.objects.exists()

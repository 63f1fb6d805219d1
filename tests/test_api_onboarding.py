"""The game client's readiness poll: GET /api/auth/me/onboarding (token) and, for staff,
GET /api/users/{userId}/onboarding. Per service ``ready``; ``complete`` once every one is.

Defaults are created by calling each consumer's own handler, as the consumers do; the service
names come from the registry, never from a list here.
"""

from __future__ import annotations

import uuid

import pytest
from rest_framework.authtoken.models import Token

from accounts.models import User
from onboarding.eventbus.registry import get_consumers
from tests.flow import register, sample_event

pytestmark = pytest.mark.django_db(databases="__all__")


def set_up(user_id, username, services=None):
    """What the consumers do on ``user.registered``, for ``services`` (default: all)."""
    event = sample_event(user_id=uuid.UUID(str(user_id)), username=username)
    for name, spec in get_consumers().items():
        if services is None or name in services:
            spec.handler_for(event.subject)([event])


def token_for(user: User) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def get(client, path, token=None):
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if token else {}
    return client.get(path, **headers)


@pytest.fixture
def sam(client):
    user_id = register(client, "sam").json()["userId"]
    user = User.objects.get(pk=user_id)
    return user, token_for(user)


@pytest.fixture
def staff():
    user = User.objects.create(username="staff", email="staff@example.com", is_staff=True)
    return user, token_for(user)


def test_right_after_registering_nothing_is_ready(client, sam):
    user, token = sam
    response = get(client, "/api/auth/me/onboarding", token)
    assert response.status_code == 200
    assert response.json() == {
        "userId": str(user.id),
        "complete": False,
        "services": {name: {"ready": False} for name in get_consumers()},
    }


def test_each_service_is_ready_on_its_own(client, sam):
    user, token = sam
    first, *others = list(get_consumers())
    set_up(user.id, user.username, services={first})
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert body["services"][first] == {"ready": True}
    assert all(body["services"][name] == {"ready": False} for name in others)
    assert body["complete"] is False


def test_complete_once_every_service_has_set_the_user_up(client, sam):
    user, token = sam
    set_up(user.id, user.username)
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert set(body["services"]) == set(get_consumers())
    assert all(service["ready"] for service in body["services"].values())
    assert body["complete"] is True


def test_partial_defaults_are_not_ready(client, sam):
    """A service that holds some of the user's defaults but not all is not ready yet."""
    from buildings.models import Building

    user, token = sam
    set_up(user.id, user.username, services=set(get_consumers()) - {"buildings"})
    Building.objects.create(user_id=user.id, kind="hq", level=1)
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert body["services"]["buildings"] == {"ready": False}
    assert body["complete"] is False


def test_me_onboarding_needs_a_token(client):
    response = client.get("/api/auth/me/onboarding")
    assert response.status_code == 401
    assert response.json() == {"detail": ["Authentication credentials were not provided."]}


def test_staff_read_any_user(client, sam, staff):
    user, _ = sam
    set_up(user.id, user.username)
    response = get(client, f"/api/users/{user.id}/onboarding", staff[1])
    assert response.status_code == 200
    assert response.json()["userId"] == str(user.id) and response.json()["complete"] is True


def test_a_user_reads_their_own_by_id(client, sam):
    user, token = sam
    response = get(client, f"/api/users/{user.id}/onboarding", token)
    assert response.status_code == 200 and response.json()["complete"] is False


def test_another_users_id_is_a_403(client, sam, staff):
    _, token = sam
    response = get(client, f"/api/users/{staff[0].id}/onboarding", token)
    assert response.status_code == 403
    assert response.json() == {"detail": ["Only staff may read another user's onboarding."]}


def test_an_unknown_id_is_a_403_for_users_and_a_404_for_staff(client, sam, staff):
    unknown = uuid.uuid4()
    assert get(client, f"/api/users/{unknown}/onboarding", sam[1]).status_code == 403
    response = get(client, f"/api/users/{unknown}/onboarding", staff[1])
    assert response.status_code == 404
    assert response.json() == {"detail": ["No user with this id."]}


def test_a_malformed_id_is_a_json_404(client, staff):
    response = get(client, "/api/users/not-a-uuid/onboarding", staff[1])
    assert response.status_code == 404
    assert response.json() == {"detail": ["Not found."]}


def test_users_onboarding_needs_a_token(client, sam):
    response = client.get(f"/api/users/{sam[0].id}/onboarding")
    assert response.status_code == 401


def test_the_poll_reads_each_service_once(client, sam, django_assert_max_num_queries):
    """Token, user, then one query per service: polling stays cheap as services are added."""
    _, token = sam
    with django_assert_max_num_queries(2 + len(get_consumers())):
        assert get(client, "/api/auth/me/onboarding", token).status_code == 200

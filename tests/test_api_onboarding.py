"""The game client's readiness poll: GET /api/auth/me/onboarding (token) and, for staff,
GET /api/users/{userId}/onboarding. Per service ``ready``; ``complete`` once every one is.

Defaults are created by calling each consumer's own handler, as the consumers do; what they
announce reaches accounts' projection through accounts' own handler (``deliver_announcements``),
as ``consume accounts`` applies it. The service names come from the registry, never from a list
here. The poll reads accounts' database only (``test_the_poll_reads_no_service_database``).
"""

from __future__ import annotations

import uuid

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token

from accounts.models import User
from onboarding.eventbus.registry import get_services
from tests.flow import deliver_announcements, handle_as_consumer, register, sample_event

pytestmark = pytest.mark.django_db(databases="__all__")


def set_up(user_id, username, services=None):
    """What the consumers do on ``user.registered``, for ``services`` (default: all), and what
    ``consume accounts`` does with their announcements."""
    event = sample_event(user_id=uuid.UUID(str(user_id)), username=username)
    for name, spec in get_services().items():
        if services is None or name in services:
            handle_as_consumer(spec, [event])
    deliver_announcements()


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
        "services": {name: {"ready": False} for name in get_services()},
    }


def test_each_service_is_ready_on_its_own(client, sam):
    user, token = sam
    first, *others = list(get_services())
    set_up(user.id, user.username, services={first})
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert body["services"][first] == {"ready": True}
    assert all(body["services"][name] == {"ready": False} for name in others)
    assert body["complete"] is False


def test_complete_once_every_service_has_set_the_user_up(client, sam):
    user, token = sam
    set_up(user.id, user.username)
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert set(body["services"]) == set(get_services())
    assert all(service["ready"] for service in body["services"].values())
    assert body["complete"] is True


def test_rows_a_service_never_announced_are_not_ready(client, sam):
    """Readiness is what a service announced, not rows found in its database: some of the
    user's defaults there, made without the service's announcement, do not make it ready."""
    from buildings.models import Building

    user, token = sam
    set_up(user.id, user.username, services=set(get_services()) - {"buildings"})
    Building.objects.create(user_id=user.id, kind="hq", level=1)
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert body["services"]["buildings"] == {"ready": False}
    assert body["complete"] is False


def test_a_service_that_erased_the_user_stays_not_ready_whatever_comes_later(client, sam):
    """An erasure is final in the projection: a late ``user.onboarded`` (a replayed
    registration the service itself skipped) does not make the user ready there again."""
    from django.utils import timezone

    from accounts.services import readiness_record_erased, readiness_record_onboarded

    user, token = sam
    set_up(user.id, user.username)
    readiness_record_erased(erased=[(user.id, "players", timezone.now())])
    readiness_record_onboarded(onboarded=[(user.id, "players", timezone.now())])
    body = get(client, "/api/auth/me/onboarding", token).json()
    assert body["services"]["players"] == {"ready": False} and body["complete"] is False


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


def test_the_poll_reads_no_service_database(client, sam, django_assert_max_num_queries):
    """Token, user, the projection: three queries on accounts' database, none on any service's,
    whatever the number of services."""
    user, token = sam
    set_up(user.id, user.username)
    aliases = {spec.database for spec in get_services().values()} - {"default"}
    contexts = [CaptureQueriesContext(connections[alias]) for alias in aliases]
    for capture in contexts:
        capture.__enter__()
    try:
        with django_assert_max_num_queries(3):
            body = get(client, "/api/auth/me/onboarding", token).json()
    finally:
        for capture in contexts:
            capture.__exit__(None, None, None)
    assert body["complete"] is True
    assert [query for capture in contexts for query in capture.captured_queries] == []

"""Every model is in the admin, its list renders, and searching by user id works."""

from __future__ import annotations

import uuid

import pytest
from django.contrib import admin
from django.urls import reverse

from accounts.services import user_register
from buildings.services import buildings_create_default
from characters.services import character_create_default
from players.services import player_create_default
from progression.services import progression_create_default

pytestmark = pytest.mark.django_db(databases="__all__")

MODELS = [
    "accounts.user", "players.player", "characters.character", "progression.metaprogression",
    "buildings.building", "eventbus.outboxevent", "eventbus.deadletter",
    "eventbus.processedevent",
]


@pytest.fixture
def staff_client(client, django_user_model):
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    client.login(username="admin", password="pw")
    return client


def test_every_project_model_is_registered():
    registered = {f"{m._meta.app_label}.{m._meta.model_name}" for m in admin.site._registry}
    assert set(MODELS) <= registered


@pytest.mark.parametrize("model", MODELS)
def test_changelist_renders_and_searches_by_user_id(staff_client, model):
    user = user_register(username="sam", email="sam@example.com", password="x")
    player_create_default(user_id=user.id, username="sam")
    character_create_default(user_id=user.id)
    progression_create_default(user_id=user.id)
    buildings_create_default(user_id=user.id)
    app_label, model_name = model.split(".")
    url = reverse(f"admin:{app_label}_{model_name}_changelist")
    assert staff_client.get(url).status_code == 200
    for term in (str(user.id), "sam", str(uuid.uuid4())[:8]):
        response = staff_client.get(url, {"q": term})
        assert response.status_code == 200, (model, term)
    if model in ("players.player", "characters.character", "progression.metaprogression",
                 "buildings.building", "accounts.user"):
        response = staff_client.get(url, {"q": str(user.id)})
        assert response.context["cl"].result_count >= 1, model


def test_outbox_is_read_only(staff_client):
    user_register(username="sam", email="sam@example.com", password="x")
    from onboarding.eventbus.models import OutboxEvent

    row = OutboxEvent.objects.latest("id")  # the staff user is announced too
    url = reverse("admin:eventbus_outboxevent_change", args=[row.pk])
    response = staff_client.get(url)
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert staff_client.post(url, {}).status_code == 403

"""The operator's admin: read-only context rows, copyable user ids, a user's onboarding story,
replaying and discarding dead letters, and the event-flow dashboard (also with NATS down)."""

from __future__ import annotations

import socket

import pytest
from django.conf import settings
from django.urls import reverse

from accounts.services import user_register
from conftest import wait_settled, wait_until
from onboarding.eventbus.deadletters.store import dead_letter_store
from onboarding.eventbus.models import DeadLetter, OutboxEvent
from players.models import Player
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

CONTEXT_MODELS = ["players.player", "characters.character", "progression.metaprogression",
                  "buildings.building"]


@pytest.fixture
def staff_client(client, django_user_model):
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    client.login(username="admin", password="pw")
    return client


@pytest.fixture
def unreachable_nats(settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.NATS_URL = f"nats://watcher:pw-never-shown@127.0.0.1:{port}"
    settings.NATS_REQUEST_TIMEOUT = 0.5
    return port


def set_up_user(start_consumers, names=None):
    start_consumers(names)
    user = user_register(username="sam", email="sam@example.com", password="x")
    # Published first: before the event is in the stream, every durable looks settled.
    wait_until(lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists())
    wait_settled(names, timeout=20)
    return user


def a_dead_letter(user, consumer="buildings"):
    event = OutboxEvent.objects.get(key=str(user.id))
    return dead_letter_store(
        consumer=consumer, subject="user.registered", stream=settings.NATS_STREAM,
        stream_seq=1, event_id=str(event.event_id), payload=event.payload.encode(), headers={},
        deliveries=4, error=RuntimeError("warehouse exploded"),
    )


@pytest.mark.parametrize("model", CONTEXT_MODELS)
def test_context_models_are_read_only_unless_the_setting_allows(
    staff_client, start_consumers, model, settings
):
    user = set_up_user(start_consumers)
    app_label, model_name = model.split(".")
    from django.apps import apps

    row = apps.get_model(app_label, model_name).objects.filter(user_id=user.id).first()
    url = reverse(f"admin:{app_label}_{model_name}_change", args=[row.pk])
    response = staff_client.get(url)
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert response.context["has_delete_permission"] is False
    assert staff_client.post(url, {}).status_code == 403
    changelist = staff_client.get(reverse(f"admin:{app_label}_{model_name}_changelist"))
    assert changelist.context["has_add_permission"] is False
    # The short user id, with the whole id to copy.
    assert f'<code title="{user.id}">{str(user.id)[:8]}</code>' in changelist.content.decode()
    assert f'data-copy="{user.id}"' in changelist.content.decode()

    settings.ADMIN_CONTEXTS_EDITABLE = True
    response = staff_client.get(url)
    assert response.context["has_change_permission"] is True


def test_the_users_page_tells_each_services_story(staff_client, start_consumers):
    running = ["players", "characters", "progression"]
    user = set_up_user(start_consumers, running)
    letter = a_dead_letter(user)
    response = staff_client.get(reverse("admin:accounts_user_change", args=[user.id]))
    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-copy="{user.id}"' in html
    assert f'<code title="{user.id}">{user.id}</code>' in html
    assert 'id="onboarding-story"' in html
    from onboarding.eventbus.registry import get_services

    story = response.context["story"]
    assert list(story["services"]) == list(get_services())  # the registry, not a fixed four
    for name in get_services():
        assert f'class="service-{name}"' in html
    player = Player.objects.get(user_id=user.id)
    assert reverse("admin:players_player_change", args=[player.pk]) in html
    buildings = html[html.index('class="service-buildings"'):]
    assert "<strong>missing</strong>" in buildings and "not yet" in buildings
    assert reverse("admin:eventbus_deadletter_change", args=[letter.id]) in buildings
    assert reverse("admin:eventbus_deadletter_replay", args=[letter.id]) in buildings
    assert reverse("admin:eventbus_deadletter_discard", args=[letter.id]) in buildings

    # Replay from the user's page: only buildings gets it, and comes back to the user's page.
    start_consumers(["buildings"])
    page = reverse("admin:accounts_user_change", args=[user.id])
    response = staff_client.post(reverse("admin:eventbus_deadletter_replay", args=[letter.id]),
                                 {"next": page})
    assert response.status_code == 302 and response["Location"] == page
    wait_until(lambda: DeadLetter.objects.get(id=letter.id).resolved_at is not None,
               message="the replayed dead letter resolved")
    wait_settled(timeout=20)
    assert counts() == complete_count(2)  # sam and the staff_client's superuser, announced too
    html = staff_client.get(page).content.decode()
    assert "passed" in html[html.index('class="service-buildings"'):]


def test_the_users_page_renders_with_nats_unreachable(staff_client, unreachable_nats):
    user = user_register(username="sam", email="sam@example.com", password="x")
    response = staff_client.get(reverse("admin:accounts_user_change", args=[user.id]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "unreachable" in html and "pw-never-shown" not in html


def test_discard_action_and_button(staff_client, jetstream):
    user = user_register(username="sam", email="sam@example.com", password="x")
    first, second = a_dead_letter(user), a_dead_letter(user, consumer="players")
    changelist = reverse("admin:eventbus_deadletter_changelist")
    response = staff_client.post(changelist, {
        "action": "discard", "_selected_action": [first.id], "index": 0,
    })
    assert response.status_code == 302
    first.refresh_from_db()
    assert first.discarded_at is not None and first.discarded_by == "admin"

    response = staff_client.post(
        reverse("admin:eventbus_deadletter_discard", args=[second.id]),
        {"reason": "user deleted", "next": "https://evil.example.com/"},
    )
    assert response["Location"] == reverse("admin:eventbus_deadletter_change", args=[second.id])
    second.refresh_from_db()
    assert second.discard_reason == "user deleted"
    assert staff_client.get(reverse("admin:eventbus_deadletter_discard",
                                    args=[second.id])).status_code == 405
    # Discarded: listed under their own filter, out of the open ones.
    open_ = staff_client.get(changelist, {"state": "open"})
    assert open_.context["cl"].result_count == 0
    assert staff_client.get(changelist, {"state": "discarded"}).context["cl"].result_count == 2


def test_staff_without_superuser_cannot_replay_or_discard(client, django_user_model, jetstream):
    from django.contrib.auth.models import Permission

    staff = django_user_model.objects.create_user("ops", "ops@example.com", "pw", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client.login(username="ops", password="pw")
    user = user_register(username="sam", email="sam@example.com", password="x")
    letter = a_dead_letter(user)
    for action in ("replay", "discard"):
        url = reverse(f"admin:eventbus_deadletter_{action}", args=[letter.id])
        assert client.post(url).status_code == 403
    letter.refresh_from_db()
    assert (letter.replays, letter.discarded_at) == (0, None)


def test_dashboard_shows_each_consumers_counts(staff_client, start_consumers):
    user = set_up_user(start_consumers, ["players", "characters", "progression"])
    a_dead_letter(user, consumer="characters")
    index = staff_client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:eventbus_flow") in index
    response = staff_client.get(reverse("admin:eventbus_flow"))
    assert response.status_code == 200
    status = response.context["status"]
    # Two registrations: sam's and the staff_client's superuser's (every account is announced).
    assert status["consumers"]["buildings"]["pending"] == 2
    assert status["consumers"]["players"]["processed"] == 2
    assert status["consumers"]["characters"]["dead_letters"] == 1
    html = response.content.decode()
    for name in settings.BOUNDED_CONTEXTS:
        assert f'class="consumer-{name}"' in html
    assert "no client pulling" in html
    assert "unreachable" not in html


def test_dashboard_renders_with_nats_unreachable(staff_client, unreachable_nats):
    response = staff_client.get(reverse("admin:eventbus_flow"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "unreachable" in html
    assert "pw-never-shown" not in html
    assert f"nats://watcher@127.0.0.1:{unreachable_nats}" in html


def test_event_flow_page_has_its_own_url_behind_the_admins_checks(
    client, django_user_model, jetstream
):
    from django.contrib.auth.models import Permission

    url = reverse("admin:eventbus_flow")
    assert url == "/admin/eventbus/flow/"
    response = client.get(url)  # not logged in: the admin's login page
    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next={url}"
    staff = django_user_model.objects.create_user("ops", "ops@example.com", "pw", is_staff=True)
    client.login(username="ops", password="pw")
    assert client.get(url).status_code == 403  # staff who may not see the dead letters
    staff.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    response = client.get(url)
    assert response.status_code == 200
    # ops' own registration, announced like every account, waits: no relay runs here.
    assert "1 event</a> waiting for the relay" in response.content.decode()
    # The page's old address, under the dead letters, leads to it.
    old = client.get("/admin/eventbus/deadletter/flow/")
    assert (old.status_code, old["Location"]) == (301, url)

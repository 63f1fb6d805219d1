"""A deleted user's erasure in ``manage.py onboarding_status --user`` and in the admin (issue 17):
the stream's copies, and per service "erased" (its tombstone) or "pending" behind its durable,
or dead-lettered; a database or NATS that does not answer reads "unreachable", never a
traceback. Real nats-server, real databases (SQLite, or PostgreSQL with a database per context).
"""

from __future__ import annotations

import json
import socket
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from accounts.models import User
from accounts.services import user_delete, user_register
from conftest import relay_flush, wait_settled, wait_until
from onboarding.eventbus.deadletters.store import dead_letter_store
from onboarding.eventbus.models import Erasure, OutboxEvent, Tombstone
from onboarding.eventbus.registry import get_services
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

RUNNING = ["players", "characters", "progression"]  # buildings is the one left stopped


def status_process(manage, *args, **env) -> tuple[int, str]:
    process = manage("onboarding_status", *args, **env)
    return process.wait(30), process.output()


def status_in_process(*args) -> tuple[int, str]:
    """The command in this process (same code path, cheaper than a process on 2 shared cores)."""
    out = StringIO()
    try:
        call_command("onboarding_status", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


def story_of(user_id) -> tuple[int, dict]:
    code, output = status_in_process("--user", str(user_id), "--json")
    return code, json.loads(output[output.index("{"):])


def service_lines(output: str) -> dict[str, str]:
    """The table's row of each service, by its name."""
    names = set(get_services())
    return {line.split()[0]: line for line in output.splitlines()
            if line.split() and line.split()[0] in names}


def erased_by(user_id) -> set[str]:
    return {name for name, spec in get_services().items()
            if Tombstone.objects.using(spec.database).filter(context=name,
                                                             user_id=user_id).exists()}


def stream_erased(user_id) -> bool:
    return Erasure.objects.filter(key=str(user_id), stream_erased_at__isnull=False).exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the block ends: nobody listens there


def set_up_and_delete(start_consumers, *, stopped: str | None = None):
    """A user set up by every service, then deleted while ``stopped``'s consumer is down; returns
    (the user, the runner of ``stopped`` to start again later) once the others erased them."""
    names = list(get_services())
    start_consumers([n for n in names if n != stopped])
    down = start_consumers([stopped]) if stopped else None
    user = user_register(username="erin", email="erin@example.com", password="x")
    users = User.objects.count()  # the staff client's superuser is announced too
    wait_until(lambda: counts() == complete_count(users), message="erin set up everywhere")
    if down is not None:
        down.stop()
    user_delete(user=user)
    erasing = {n for n in names if n != stopped}
    wait_until(lambda: erased_by(user.id) >= erasing and stream_erased(user.id),
               message=f"erin erased by {sorted(erasing)} and from the stream")
    return user


def test_a_user_erased_everywhere_reads_erased_for_every_service(start_consumers, manage):
    user = set_up_and_delete(start_consumers)
    wait_settled(timeout=20)
    deletion = OutboxEvent.objects.get(key=str(user.id))  # the registration's row went with it
    assert deletion.subject == "user.deleted"
    erasure = Erasure.objects.get(key=str(user.id))

    code, output = status_process(manage, "--user", str(user.id))
    assert code == 0, output
    assert "Traceback" not in output
    assert f"user {user.id}: deleted (erasure requested " in output
    assert "no such user in accounts" in output
    assert (f"event {deletion.event_id} user.deleted: published" in output
            and f"stream seq {deletion.stream_seq} (from the PubAck in the outbox)" in output)
    assert f"stream: erased {erasure.stream_erased_at.isoformat()} (1 earlier message(s) deleted)" \
        in output
    lines = service_lines(output)
    assert set(lines) == set(get_services())
    for name, line in lines.items():
        assert f"{name} erased 20" in " ".join(line.split()), line
        assert f"seq {deletion.stream_seq}" in line and "passed" in line
    assert "erased by every service and from the stream" in output
    assert "erin" not in output  # nothing of the user but their id

    code, story = story_of(user.id)
    assert code == 0
    assert story["complete"] is True
    assert story["user"] == {"exists": False, "username": None}
    assert story["erasure"]["stream"] == {
        "erased": True, "erased_at": erasure.stream_erased_at.isoformat(),
        "messages_deleted": 1, "pending": None}
    assert story["event"]["event_id"] == str(erasure.event_id)
    assert story["event"]["stream_seq"] == deletion.stream_seq
    for name, spec in get_services().items():
        service = story["services"][name]
        tombstone = Tombstone.objects.using(spec.database).get(context=name, user_id=user.id)
        assert service["state"] == "erased"
        assert service["erased_at"] == tombstone.erased_at.isoformat()
        assert service["records"] == [] and service["error"] is None
        assert service["durable"]["passed"] is True


def test_a_service_down_is_pending_behind_its_durable_until_it_returns(start_consumers):
    user = set_up_and_delete(start_consumers, stopped="buildings")
    seq = OutboxEvent.objects.get(key=str(user.id)).stream_seq

    code, story = story_of(user.id)
    assert code == 1  # not erased everywhere yet
    assert story["complete"] is False and story["erasure"]["stream"]["erased"] is True
    buildings = story["services"]["buildings"]
    assert buildings["state"] == "pending" and buildings["erased_at"] is None
    assert buildings["durable"]["passed"] is False
    # Behind it: its ack floor below the deletion, with events still pending (the stream's
    # sequences also count the other services' announcements, which its durable skips).
    assert buildings["durable"]["ack_floor_seq"] < seq and buildings["durable"]["pending"] >= 1
    # What it still holds of the user, named as the registration's story names it.
    assert [r["text"] for r in buildings["records"]] == ["HQ level 1", "Warehouse level 1"]
    for name in RUNNING:
        assert story["services"][name]["state"] == "erased", name

    code, output = status_in_process("--user", str(user.id))
    assert code == 1
    lines = service_lines(output)
    floor = buildings["durable"]["ack_floor_seq"]
    assert "pending behind its durable" in lines["buildings"]
    assert f"not yet (ack floor {floor} < seq {seq}, " in lines["buildings"]
    for name in RUNNING:
        assert f"{name} erased 20" in " ".join(lines[name].split())
    assert "still held by buildings: HQ level 1, Warehouse level 1" in output
    assert "not erased everywhere yet: buildings pending" in output

    start_consumers(["buildings"])
    wait_until(lambda: "buildings" in erased_by(user.id), message="buildings erased on return")
    wait_settled(["buildings"], timeout=20)
    code, story = story_of(user.id)
    assert code == 0
    assert story["services"]["buildings"]["state"] == "erased"
    assert story["services"]["buildings"]["records"] == []
    assert counts() == {name: 0 for name in complete_count(1)}


def test_before_the_relay_every_service_waits_and_a_failed_deletion_reads_dead_lettered(
    jetstream
):
    """No relay runs: the deletion waits in the outbox; a dead letter of it names buildings."""
    user = user_register(username="dora", email="dora@example.com", password="x")
    user_delete(user=user)
    deletion = OutboxEvent.objects.get(key=str(user.id), subject="user.deleted")
    letter = dead_letter_store(
        consumer="buildings", subject="user.deleted", stream=settings.NATS_STREAM, stream_seq=9,
        event_id=str(deletion.event_id), payload=deletion.payload.encode(), headers={},
        deliveries=4, error=RuntimeError("warehouse exploded"),
    )
    code, story = story_of(user.id)
    assert code == 1
    assert story["erasure"]["stream"] == {"erased": False, "erased_at": None,
                                          "messages_deleted": 0, "pending": "relay"}
    assert story["event"]["published_at"] is None
    assert story["event"]["stream_seq"] == 9  # from the dead letter, before any PubAck
    assert story["services"]["buildings"]["state"] == "dead-lettered"
    [shown] = story["services"]["buildings"]["dead_letters"]
    assert shown["id"] == letter.id
    for name in RUNNING:
        assert story["services"][name]["state"] == "pending"

    code, output = status_in_process("--user", str(user.id))
    assert code == 1
    assert "NOT PUBLISHED yet (waiting in the outbox)" in output
    assert "stream: pending: relay" in output
    lines = service_lines(output)
    assert "dead-lettered" in lines["buildings"] and f"#{letter.id}" in lines["buildings"]
    for name in RUNNING:
        assert "pending behind the relay" in lines[name]


def test_unreachable_nats_or_context_database_reads_unreachable(jetstream, manage):
    user = user_register(username="nell", email="nell@example.com", password="x")
    user_delete(user=user)
    assert relay_flush() == 2  # both events out, the stream erased; no consumer runs
    assert stream_erased(user.id)
    port = closed_port()
    url = f"nats://operator:s3cret-pw@127.0.0.1:{port}"
    code, output = status_process(manage, "--user", str(user.id), NATS_URL=url,
                                  NATS_REQUEST_TIMEOUT="0.5")
    assert code == 1, output
    assert f"nats: NATS unreachable at nats://operator@127.0.0.1:{port}" in output
    assert "s3cret-pw" not in output and "Traceback" not in output
    lines = service_lines(output)
    for line in lines.values():
        assert "pending (durable unknown)" in line and "unknown (NATS)" in line, line

    code, output = status_process(manage, "--user", str(user.id), "--json", NATS_URL=url,
                                  NATS_REQUEST_TIMEOUT="0.5")
    story = json.loads(output[output.index("{"):])
    assert code == 1 and story["nats"]["reachable"] is False
    assert all(s["durable"] is None for s in story["services"].values())

    # A context's database that does not answer: that service says so, in one line.
    db_port = closed_port()
    code, output = status_process(
        manage, "--user", str(user.id),
        BUILDINGS_DATABASE_URL=f"postgres://nobody:db-pw@127.0.0.1:{db_port}/gone")
    assert code == 1, output
    assert "Traceback" not in output and "db-pw" not in output
    lines = service_lines(output)
    assert "unreachable" in lines["buildings"]
    [said] = [line for line in output.splitlines() if line.startswith("buildings: ")]
    assert f"database buildings (postgres://nobody@127.0.0.1:{db_port}/gone) unreachable: " \
        "OperationalError" in said
    for name in RUNNING:
        assert "unreachable" not in lines[name]
    assert "Traceback" not in output

    # A registration's story says it the same way.
    other = user_register(username="olga", email="olga@example.com", password="x")
    code, output = status_process(
        manage, "--user", str(other.id),
        BUILDINGS_DATABASE_URL=f"postgres://nobody:db-pw@127.0.0.1:{db_port}/gone")
    assert code == 1 and "Traceback" not in output, output
    assert "unreachable" in service_lines(output)["buildings"]
    assert "buildings: database buildings (" in output


# -- the admin --------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, django_user_model):
    django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    client.login(username="admin", password="pw")
    return client


def test_the_admin_lists_erasures_and_tells_each_services_part(staff_client, start_consumers):
    user = set_up_and_delete(start_consumers, stopped="buildings")
    erasure = Erasure.objects.get(key=str(user.id))

    changelist = staff_client.get(reverse("admin:eventbus_erasure_changelist"))
    assert changelist.status_code == 200
    assert changelist.context["has_add_permission"] is False
    html = changelist.content.decode()
    assert str(user.id) in html
    assert reverse("admin:eventbus_erasure_change", args=[erasure.pk]) in html
    found = staff_client.get(reverse("admin:eventbus_erasure_changelist"),
                             {"q": str(user.id)})
    assert found.context["cl"].result_count == 1
    assert staff_client.get(reverse("admin:eventbus_erasure_changelist"),
                            {"stream": "pending"}).context["cl"].result_count == 0

    url = reverse("admin:eventbus_erasure_change", args=[erasure.pk])
    response = staff_client.get(url)
    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert response.context["has_delete_permission"] is False
    html = response.content.decode()
    assert 'id="erasure-story"' in html and 'data-stream="erased"' in html
    assert f'data-copy="{user.id}"' in html
    story = response.context["story"]
    assert list(story["services"]) == list(get_services())
    for name in RUNNING:
        assert f'class="service-{name}" data-service="{name}" data-state="erased"' in html
    buildings = html[html.index('class="service-buildings"'):]
    assert 'data-state="pending"' in buildings[:200] and "behind its durable" in buildings
    assert "not yet (ack floor" in buildings and "HQ level 1" in buildings
    assert staff_client.post(url, {}).status_code == 403

    start_consumers(["buildings"])
    wait_until(lambda: "buildings" in erased_by(user.id), message="buildings erased on return")
    html = staff_client.get(url).content.decode()
    assert 'class="service-buildings" data-service="buildings" data-state="erased"' in html
    assert "Erased by every service and from the stream." in html


def test_the_erasure_pages_need_the_view_permission_and_render_with_nats_unreachable(
    client, django_user_model, jetstream, settings
):
    from django.contrib.auth.models import Permission

    user = user_register(username="sam", email="sam@example.com", password="x")
    user_delete(user=user)
    erasure = Erasure.objects.get(key=str(user.id))
    url = reverse("admin:eventbus_erasure_change", args=[erasure.pk])
    staff = django_user_model.objects.create_user("ops", "ops@example.com", "pw", is_staff=True)
    client.login(username="ops", password="pw")
    assert client.get(reverse("admin:eventbus_erasure_changelist")).status_code == 403
    assert client.get(url).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_erasure"))

    settings.NATS_URL = f"nats://watcher:pw-never-shown@127.0.0.1:{closed_port()}"
    settings.NATS_REQUEST_TIMEOUT = 0.5
    response = client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    assert "unreachable" in html and "pw-never-shown" not in html
    assert 'data-stream="pending"' in html and "pending: relay" in html
    assert response.context["has_change_permission"] is False
    assert client.post(url, {}).status_code == 403
    delete = reverse("admin:eventbus_erasure_delete", args=[erasure.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert client.get(reverse("admin:eventbus_erasure_add")).status_code == 403
    assert Erasure.objects.filter(pk=erasure.pk).exists()

"""The account's life after birth, by choreography (issue 17): erasure, renaming, every account
announced. Real nats-server, real databases (SQLite, or PostgreSQL with a database per context).

The personal-data search (``assert_no_personal_data``) reads every row of every table in every
database, the decoded sessions, and every message the stream still holds: nothing may name the
erased user once every service has handled the deletion.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.sessions.backends.db import SessionStore
from django.db import close_old_connections, connections
from django.urls import reverse
from django.utils import timezone

from accounts.models import User
from accounts.services import user_delete, user_register, user_rename
from conftest import run_async, wait_settled, wait_until
from onboarding.contracts import UserDeleted, UserRegistered, event_headers, parse_event
from onboarding.eventbus.consumer.inbox import Incoming, process_events
from onboarding.eventbus.deadletters.replay import dead_letters_replay
from onboarding.eventbus.deadletters.store import dead_letter_store
from onboarding.eventbus.models import DeadLetter, Erasure, OutboxEvent, Tombstone
from onboarding.eventbus.registry import get_services
from tests.flow import STRONG_PASSWORD, complete_count, counts, register

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ME = "/api/auth/me"
NONE = {name: 0 for name in complete_count(1)}


def token_for(client, username: str, password: str = STRONG_PASSWORD) -> str:
    response = client.post("/api/auth/token", {"username": username, "password": password},
                           content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()["token"]


def call(client, method: str, path: str, token: str | None = None, data=None):
    headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if token else {}
    body = json.dumps(data) if data is not None else ""
    return getattr(client, method)(path, data=body, content_type="application/json", **headers)


def erased_everywhere(user_id) -> bool:
    """Every context holds a tombstone of the user, and the relay erased the stream."""
    for spec in get_services().values():
        if not Tombstone.objects.using(spec.database).filter(
                context=spec.name, user_id=user_id).exists():
            return False
    return Erasure.objects.filter(key=str(user_id), stream_erased_at__isnull=False).exists()


def is_announcement(subject: str) -> bool:
    """A service's announcement (``user.onboarded.<service>``, ``user.erased.<service>``):
    the user's id, the service, a time; no personal data, so an erasure leaves it."""
    return subject.startswith(("user.onboarded.", "user.erased."))


def stream_messages() -> list[tuple[int, str, bytes, dict]]:
    """Every message the stream holds: (sequence, subject, data, headers)."""
    from nats.js.errors import NotFoundError

    async def read(js):
        state = (await js.stream_info(settings.NATS_STREAM)).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                msg = await js.get_msg(settings.NATS_STREAM, seq)
            except NotFoundError:
                continue  # deleted: the gap an erasure leaves
            found.append((seq, msg.subject, msg.data or b"", dict(msg.headers or {})))
        return found

    return run_async(read)


def personal_data_found(*needles: str) -> list[str]:
    """Where any of ``needles`` (case-insensitive) appears: every table of every database,
    the decoded sessions, every message of the stream."""
    needles = [needle.lower() for needle in needles]
    found = []
    for alias in connections:
        connection = connections[alias]
        with connection.cursor() as cursor:
            for table in connection.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
                for row in cursor.fetchall():
                    text = " ".join(str(value) for value in row).lower()
                    if table == "django_session":
                        text += json.dumps(SessionStore().decode(row[1])).lower()
                    found += [f"{alias}.{table}: {row!r}" for n in needles if n in text]
    for seq, subject, data, headers in stream_messages():
        text = f"{subject} {data!r} {headers!r}".lower()
        found += [f"stream #{seq} {subject}: {data!r}" for n in needles if n in text]
    return found


# -- erasure: each way in ---------------------------------------------------------------------


def test_a_user_erases_their_account_with_their_password(client, start_consumers):
    start_consumers()
    response = register(client, "erin", "erin@example.com")
    user_id = uuid.UUID(response.json()["userId"])
    token = token_for(client, "erin")
    wait_until(lambda: counts() == complete_count(1), message="erin set up everywhere")

    missing = call(client, "delete", ME, token, {})
    assert (missing.status_code, missing.json()) == (400, {"password": ["This field is required."]})
    wrong = call(client, "delete", ME, token, {"password": "not-my-password"})
    assert (wrong.status_code, wrong.json()) == (400, {"password": ["Wrong password."]})
    assert User.objects.filter(pk=user_id).exists()

    assert call(client, "delete", ME, token, {"password": STRONG_PASSWORD}).status_code == 204
    assert not User.objects.filter(pk=user_id).exists()
    for path in (ME, f"{ME}/onboarding"):
        assert call(client, "get", path, token).status_code == 401  # the token died with it
    assert call(client, "post", "/api/auth/logout", token).status_code == 401

    wait_until(lambda: counts() == NONE, message="every service erased erin")
    wait_until(lambda: erased_everywhere(user_id), message="tombstones and the stream erased")
    subjects = [subject for _, subject, data, _ in stream_messages()
                if str(user_id).encode() in data and not is_announcement(subject)]
    assert subjects == ["user.deleted"]  # the registration is gone; the deletion stays
    # The outbox keeps the deletion's row with its PubAck's sequence; the registration's went.
    rows = list(OutboxEvent.objects.filter(key=str(user_id)).values_list("subject", "stream_seq"))
    assert len(rows) == 1 and rows[0][0] == "user.deleted" and rows[0][1] > 0


def test_staff_erase_a_user_by_id(client, start_consumers):
    start_consumers()
    user_id = uuid.UUID(register(client, "sam").json()["userId"])
    register(client, "staffer", "staffer@example.com")
    User.objects.filter(username="staffer").update(is_staff=True)
    staff_token = token_for(client, "staffer")
    sam_token = token_for(client, "sam")

    path = f"/api/users/{user_id}"
    forbidden = call(client, "delete", f"/api/users/{User.objects.get(username='staffer').id}",
                     sam_token)
    assert forbidden.status_code == 403 and list(forbidden.json()) == ["detail"]
    unknown = call(client, "delete", f"/api/users/{uuid.uuid4()}", staff_token)
    assert (unknown.status_code, unknown.json()) == (404, {"detail": ["No user with this id."]})
    assert call(client, "delete", path, staff_token).status_code == 204
    assert call(client, "delete", path, staff_token).status_code == 404  # gone: not twice
    wait_until(lambda: counts() == complete_count(1), message="only the staffer's defaults")
    wait_until(lambda: erased_everywhere(user_id))


def test_the_admins_delete_and_bulk_delete_go_through_the_service(client, start_consumers):
    start_consumers()
    User.objects.create_superuser("boss", "boss@example.com", "pw")
    client.login(username="boss", password="pw")
    users = [user_register(username=f"u{i}", email=f"u{i}@example.com", password="x")
             for i in range(3)]
    wait_until(lambda: counts() == complete_count(4), message="four users set up")

    one = client.post(reverse("admin:accounts_user_delete", args=[users[0].pk]), {"post": "yes"})
    assert one.status_code == 302
    bulk = client.post(reverse("admin:accounts_user_changelist"), {
        "action": "delete_selected", "post": "yes",
        "_selected_action": [str(users[1].pk), str(users[2].pk)],
    })
    assert bulk.status_code == 302
    assert list(User.objects.values_list("username", flat=True)) == ["boss"]
    deleted = OutboxEvent.objects.filter(subject="user.deleted")
    assert sorted(deleted.values_list("key", flat=True)) == sorted(str(u.pk) for u in users)
    for user in users:
        wait_until(lambda user=user: erased_everywhere(user.pk))
    assert counts() == complete_count(1)  # the boss's


def test_a_service_down_during_the_deletion_erases_when_it_returns(start_consumers):
    up = ["players", "characters", "progression"]
    running = start_consumers()
    users = [user_register(username=f"u{i}", email=f"u{i}@example.com", password="x")
             for i in range(5)]
    wait_until(lambda: counts() == complete_count(5))
    running.stop()
    others = start_consumers(up)
    for user in users[:3]:
        user_delete(user=user)
    wait_until(lambda: counts() == {**complete_count(2), "buildings": complete_count(5)[
        "buildings"]}, message="the running services erased three users")
    others.stop()

    start_consumers(["buildings"])
    wait_until(lambda: counts() == complete_count(2), message="buildings erased on its return")
    for user in users[:3]:
        wait_until(lambda user=user: erased_everywhere(user.pk))
    wait_settled(["buildings"])


def test_erasing_twice_is_harmless(start_consumers):
    start_consumers()
    user = user_register(username="sam", email="sam@example.com", password="x")
    wait_until(lambda: counts() == complete_count(1))
    user_delete(user=user)
    user_delete(user=user)  # the row is gone already: a second deletion event, the same result
    wait_until(lambda: erased_everywhere(user.pk))
    wait_settled()
    assert counts() == NONE
    assert Erasure.objects.filter(key=str(user.pk)).count() == 1


# -- a registration after the deletion creates nothing ------------------------------------------


def test_a_late_registration_after_the_tombstone_creates_nothing(start_consumers):
    running = start_consumers()
    user = user_register(username="late", email="late@example.com", password="x")
    old = OutboxEvent.objects.get(key=str(user.pk))
    wait_until(lambda: counts() == complete_count(1))
    user_delete(user=user)
    wait_until(lambda: erased_everywhere(user.pk))
    wait_settled()
    before = dict(running.runner.processed)

    async def resend(js):
        # The old registration again, as a reconcile repair sent earlier or a copy on another
        # subject would bring it: every service gets it (a new message id, not a duplicate).
        event = parse_event("user.registered", old.payload.encode())
        await js.publish("user.registered", old.payload.encode(),
                         headers=event_headers(event, event_id=uuid.uuid4()))
        for name in get_services():
            await js.publish(f"replay.{name}.user.registered", old.payload.encode(),
                             headers={**(old.headers or {}), "Nats-Msg-Id": str(uuid.uuid4())})

    run_async(resend)
    wait_until(lambda: all(running.runner.processed[n] >= before[n] + 2 for n in get_services()),
               message="each service handled both copies")
    assert counts() == NONE


def test_a_dead_lettered_registration_cannot_come_back_on_replay(start_consumers):
    running = start_consumers(["players", "characters", "progression"])
    user = user_register(username="ghost", email="ghost@example.com", password="x")
    wait_until(lambda: counts() == {**complete_count(1), "buildings": 0})
    event = OutboxEvent.objects.get(key=str(user.pk))
    letter = dead_letter_store(
        consumer="buildings", subject="user.registered", stream=settings.NATS_STREAM,
        stream_seq=event.stream_seq or 1, event_id=str(event.event_id),
        payload=event.payload.encode(), headers=event.headers, deliveries=4,
        error=RuntimeError("ghost@example.com exploded"),
    )
    user_delete(user=user)
    wait_until(lambda: Erasure.objects.filter(stream_erased_at__isnull=False).exists())
    letter = DeadLetter.objects.get(pk=letter.pk)
    assert letter.payload in (b"", "") and "ghost" not in letter.error_message
    assert letter.discarded_at is not None  # closed: nothing to replay
    assert dead_letters_replay(letters=[letter]) == 0
    running.stop()
    start_consumers(["buildings"])
    wait_until(lambda: erased_everywhere(user.pk))
    wait_settled(["buildings"])
    assert counts() == NONE


def incoming(event, seq: int) -> Incoming:
    return Incoming(event, str(uuid.uuid4()), event.subject, seq)


@pytest.mark.parametrize("order", ["registered-deleted", "deleted-registered"])
def test_one_batch_applies_a_registration_and_a_deletion_in_stream_order(order):
    """In one transaction, the handlers run in the stream's order: a registration followed by
    its deletion leaves nothing; a deletion followed by an older registration, nothing too."""
    user_id = uuid.uuid4()
    registered = UserRegistered(user_id=user_id, username="twin", email="twin@example.com",
                                registration_timestamp=timezone.now())
    deleted = UserDeleted(user_id=user_id, deleted_at=timezone.now())
    events = [registered, deleted] if order == "registered-deleted" else [deleted, registered]
    for spec in get_services().values():
        applied = process_events(spec, [incoming(event, n) for n, event in enumerate(events)])
        assert applied == [True, True]
    assert counts() == NONE
    for spec in get_services().values():
        assert Tombstone.objects.using(spec.database).filter(user_id=user_id).exists()


def test_concurrent_deletion_and_registration_of_one_user_leave_it_erased():
    """Two replicas of one service, one applying a user's registration, the other its
    deletion, at the same moment: whichever commits first, the user ends erased (PostgreSQL:
    the deletion locks the tables it erases from; SQLite: one writer at a time)."""
    spec = get_services()["players"]
    users = [uuid.uuid4() for _ in range(20)]
    errors = []

    def apply(event, start: threading.Barrier):
        try:
            start.wait(5)
            process_events(spec, [incoming(event, 1)])
        except Exception as exc:  # noqa: BLE001 — reported below, the test's failure
            errors.append(exc)
        finally:
            close_old_connections()
            connections.close_all()

    for user_id in users:
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=apply, args=(UserRegistered(
                user_id=user_id, username=f"r{user_id.hex[:8]}", email=f"{user_id.hex}@x.org",
                registration_timestamp=timezone.now()), start)),
            threading.Thread(target=apply, args=(UserDeleted(
                user_id=user_id, deleted_at=timezone.now()), start)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert errors == []
    from players.models import Player

    assert not Player.objects.filter(user_id__in=users).exists()
    assert Tombstone.objects.using(spec.database).filter(
        context="players", user_id__in=users).count() == len(users)


# -- renaming -----------------------------------------------------------------------------------


def test_renaming_over_the_api_reaches_players(client, start_consumers):
    from players.models import Player

    start_consumers()
    user_id = uuid.UUID(register(client, "sam").json()["userId"])
    register(client, "bob", "bob@example.com")
    token = token_for(client, "sam")
    wait_until(lambda: counts() == complete_count(2))

    taken = call(client, "patch", ME, token, {"username": "BOB"})
    assert (taken.status_code, list(taken.json())) == (400, ["username"])
    bad = call(client, "patch", ME, token, {"username": "no spaces!"})
    assert (bad.status_code, list(bad.json())) == (400, ["username"])

    renamed = call(client, "patch", ME, token, {"username": "ｓａｍｍｙ"})  # NFKC: "sammy"
    assert renamed.status_code == 200
    assert set(renamed.json()) == {"userId", "username", "email", "registrationTimestamp"}
    assert renamed.json()["username"] == "sammy"
    wait_until(lambda: Player.objects.get(user_id=user_id).username == "sammy",
               message="players took the new name")
    # A case change of one's own name is allowed; logging in by the new name works.
    assert call(client, "patch", ME, token, {"username": "Sammy"}).json()["username"] == "Sammy"
    wait_until(lambda: Player.objects.get(user_id=user_id).username == "Sammy")
    assert token_for(client, "SAMMY")
    assert call(client, "get", ME, token).json()["username"] == "Sammy"
    # A repair sent now carries the current name.
    from accounts.services import user_registered_event

    assert user_registered_event(user=User.objects.get(pk=user_id)).username == "Sammy"


def test_renaming_to_the_same_name_announces_nothing():
    user = user_register(username="sam", email="sam@example.com", password="x")
    user_rename(user=user, username="sam")
    assert not OutboxEvent.objects.filter(subject="user.renamed").exists()


# -- every account announced --------------------------------------------------------------------


def test_createsuperuser_and_the_admins_add_user_are_announced(client, start_consumers,
                                                               monkeypatch):
    from django.core.management import call_command

    start_consumers()
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", STRONG_PASSWORD)
    call_command("createsuperuser", interactive=False, username="root",
                 email="root@example.com", verbosity=0)
    root = User.objects.get(username="root")
    assert root.is_superuser and root.check_password(STRONG_PASSWORD)
    client.login(username="root", password=STRONG_PASSWORD)
    response = client.post(reverse("admin:accounts_user_add"), {
        "username": "added", "email": "added@example.com",
        "password1": STRONG_PASSWORD, "password2": STRONG_PASSWORD, "usable_password": "true",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    added = User.objects.get(username="added")
    assert added.email == "added@example.com" and added.check_password(STRONG_PASSWORD)
    announced = OutboxEvent.objects.filter(subject="user.registered")
    assert sorted(announced.values_list("key", flat=True)) == sorted([str(root.pk),
                                                                      str(added.pk)])
    wait_until(lambda: counts() == complete_count(2), message="both set up everywhere")


def test_the_admins_add_user_refuses_a_taken_email(client):
    User.objects.create_superuser("root", "root@example.com", "pw")
    client.login(username="root", password="pw")
    response = client.post(reverse("admin:accounts_user_add"), {
        "username": "other", "email": "ROOT@example.com",
        "password1": STRONG_PASSWORD, "password2": STRONG_PASSWORD, "usable_password": "true",
    })
    assert response.status_code == 200 and "email" in response.context["adminform"].form.errors
    assert OutboxEvent.objects.count() == 1  # root's own registration only


# -- no personal data left ----------------------------------------------------------------------


def test_no_personal_data_is_left_once_every_service_handled_the_deletion(client,
                                                                          start_consumers):
    name, email = "zqerin7", "zq.erin.7@example.com"
    running = start_consumers(["players", "characters", "progression"])
    user_id = uuid.UUID(register(client, name, email).json()["userId"])
    wait_until(lambda: counts() == {**complete_count(1), "buildings": 0})
    user = User.objects.get(pk=user_id)

    # Copies in Django's own places: an admin's change of the user (LogEntry.object_repr),
    # a failed admin login under the user's name and one under the e-mail (axes), a session.
    boss = User.objects.create_superuser("boss", "boss@example.com", "pw")
    admin = client.__class__()
    admin.login(username="boss", password="pw")
    from django.contrib.admin.models import CHANGE
    from django.contrib.contenttypes.models import ContentType

    # What the admin's change view writes for the user (its name, in object_repr).
    LogEntry.objects.create(
        user=boss, content_type=ContentType.objects.get_for_model(User), object_id=str(user.pk),
        object_repr=str(user), action_flag=CHANGE,
        change_message=json.dumps([{"changed": {"fields": ["Email address"]}}]),
    )
    assert LogEntry.objects.filter(object_id=str(user.pk)).exists()
    for who in (name, email):
        client.post(reverse("admin:login"), {"username": who, "password": "wrong"})
    user_client = client.__class__()
    user_client.login(username=name, password=STRONG_PASSWORD)

    # A dead letter with the payload, then replayed: a replay.* copy on the stream.
    event = OutboxEvent.objects.get(key=str(user_id), subject="user.registered")
    wait_until(lambda: OutboxEvent.objects.get(pk=event.pk).stream_seq is not None)
    letter = dead_letter_store(
        consumer="buildings", subject="user.registered", stream=settings.NATS_STREAM,
        stream_seq=OutboxEvent.objects.get(pk=event.pk).stream_seq,
        event_id=str(event.event_id), payload=event.payload.encode(), headers=event.headers,
        deliveries=4, error=RuntimeError(f"no warehouse for {email}"),
    )
    assert dead_letters_replay(letters=[letter]) == 1
    assert any(s == "replay.buildings.user.registered" for _, s, _, _ in stream_messages())

    before = " ".join(personal_data_found(name, email))
    for place in ("accounts_user", "django_admin_log", "axes_accessattempt",
                  "eventbus_outboxevent", "eventbus_deadletter", "players_player",
                  "stream #", "replay.buildings.user.registered"):
        assert place in before, f"the search must see the copy in {place}"

    # The user goes, from the admin; buildings is down and catches up afterwards.
    admin.post(reverse("admin:accounts_user_delete", args=[user.pk]), {"post": "yes"})
    # Left: the boss's defaults (every account is announced), but in buildings, which is down.
    wait_until(lambda: counts() == {**complete_count(1), "buildings": 0},
               message="three services erased the user")
    running.stop()
    start_consumers(["buildings"])
    wait_until(lambda: erased_everywhere(user_id), timeout=30)
    wait_settled()
    assert counts() == complete_count(1)  # the boss's, announced like every account
    assert personal_data_found(name, email) == []


def test_the_admin_renames_through_the_service_and_refuses_a_taken_name(client,
                                                                        start_consumers):
    from players.models import Player

    start_consumers()
    User.objects.create_superuser("boss", "boss@example.com", "pw")
    client.login(username="boss", password="pw")
    user = user_register(username="sam", email="sam@example.com", password="x")
    wait_until(lambda: counts() == complete_count(2))
    page = reverse("admin:accounts_user_change", args=[user.pk])

    def change(**fields):
        form = client.get(page).context["adminform"].form
        data = {name: form[name].value() for name in form.fields
                if form[name].value() is not None and name != "password"}
        data.update(fields)
        for name in ("groups", "user_permissions"):
            data.pop(name, None)
        now = timezone.localtime(User.objects.get(pk=user.pk).date_joined)
        data.update({"date_joined_0": now.strftime("%Y-%m-%d"),
                     "date_joined_1": now.strftime("%H:%M:%S")})
        return client.post(page, data)

    taken = change(username="BOSS")  # another user's name in another case
    assert taken.status_code == 200
    assert "username" in taken.context["adminform"].form.errors
    assert not OutboxEvent.objects.filter(subject="user.renamed").exists()

    assert change(username="samuel").status_code == 302
    assert User.objects.get(pk=user.pk).username == "samuel"
    renamed = OutboxEvent.objects.get(subject="user.renamed")
    assert renamed.key == str(user.pk) and '"username":"samuel"' in renamed.payload
    wait_until(lambda: Player.objects.get(user_id=user.pk).username == "samuel")


def test_a_service_that_fails_on_the_deletion_keeps_it_open_and_a_replay_erases(
    start_consumers, monkeypatch
):
    """The deletion's own dead letter holds no personal data and is what that service still
    has to do: the erasure neither empties nor closes it, and its replay erases the user."""
    import buildings.consumers
    from onboarding.eventbus import PermanentError

    start_consumers()
    user = user_register(username="stuck", email="stuck@example.com", password="x")
    wait_until(lambda: counts() == complete_count(1))

    def refuse(**kwargs):
        raise PermanentError("the warehouse is locked")

    monkeypatch.setattr(buildings.consumers, "buildings_erase", refuse)
    user_delete(user=user)
    wait_until(lambda: DeadLetter.objects.filter(consumer="buildings",
                                                 subject="user.deleted").exists())
    wait_until(lambda: Erasure.objects.filter(stream_erased_at__isnull=False).exists())
    letter = DeadLetter.objects.get(consumer="buildings", subject="user.deleted")
    assert letter.discarded_at is None and letter.resolved_at is None
    assert str(user.pk) in bytes(letter.payload).decode()
    assert counts()["buildings"] == complete_count(1)["buildings"]  # not erased there yet

    monkeypatch.undo()
    assert dead_letters_replay(letters=[letter]) == 1
    wait_until(lambda: erased_everywhere(user.pk), message="the replay erased buildings' rows")
    wait_until(lambda: DeadLetter.objects.get(pk=letter.pk).resolved_at is not None)
    assert counts() == NONE

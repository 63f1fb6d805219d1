"""``manage.py reconcile``: who lacks a service's defaults, and the repair, on real NATS and DBs."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test.utils import CaptureQueriesContext, override_settings
from django.utils import timezone

from accounts.models import ServiceReadiness, User
from accounts.reconcile import (
    orphan_scan,
    readiness_repair,
    reconcile_scan,
    repair_event_id,
    user_chunks,
)
from accounts.selectors import user_onboarding_get
from accounts.services import user_delete, user_register, user_registered_event
from buildings.models import Building
from conftest import run_async, wait_settled, wait_until
from onboarding.eventbus.models import ProcessedEvent, PublishedMessage, Tombstone
from onboarding.eventbus.registry import get_services
from players.models import Player
from progression.models import MetaProgression
from tests.flow import (
    assert_defaults,
    complete_count,
    counts,
    deliver_announcements,
    handle_as_consumer,
    sample_event,
)


def set_up_and_announced(n: int) -> bool:
    """Every default of ``n`` users exists, and accounts' projection says so (its consumer has
    the services' announcements)."""
    ready = ServiceReadiness.objects.filter(onboarded_at__isnull=False, erased_at__isnull=True)
    return counts() == complete_count(n) and ready.count() == n * len(get_services())


def reconcile(*args) -> tuple[int, str]:
    """The command in this process: (exit code, stdout). CommandError propagates."""
    out = StringIO()
    try:
        call_command("reconcile", "--min-age", "0", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


def reconcile_json(*args) -> tuple[int, dict]:
    code, output = reconcile("--json", *args)
    return code, json.loads(output)


def inbox_counts() -> dict[str, int]:
    return {
        name: ProcessedEvent.objects.using(spec.database).filter(consumer=name).count()
        for name, spec in get_services().items()
    }


def stream_subjects() -> dict[str, int]:
    """Messages in the stream per subject."""
    async def read(js):
        info = await js.stream_info(settings.NATS_STREAM, subjects_filter=">")
        # The services' announcements come and go on their own time: not what is counted here.
        return {subject: count for subject, count in (info.state.subjects or {}).items()
                if not subject.startswith(("user.onboarded.", "user.erased."))}

    return run_async(read)


def register_users(n: int, prefix: str) -> list[User]:
    return [user_register(username=f"{prefix}{i}", email=f"{prefix}{i}@example.com",
                          password="x") for i in range(n)]


def set_up_everywhere(users: list[User]) -> None:
    """What the consumers would have done, without NATS: each context's handler, directly."""
    events = [user_registered_event(user=user) for user in users]
    for spec in get_services().values():
        handle_as_consumer(spec, events)
    deliver_announcements()  # and what consume accounts makes of their announcements


def make_orphans(n: int, services: list[str]) -> list[uuid.UUID]:
    """Rows in ``services`` for ``n`` user ids accounts never had: each context's own
    ``user.registered`` handler, called directly (as a registration whose user is gone left
    them). Sorted, as reconcile lists them."""
    user_ids = sorted(uuid.uuid4() for _ in range(n))
    events = [sample_event(user_id=user_id, username=f"orphan-{user_id.hex[:8]}")
              for user_id in user_ids]
    consumers = get_services()
    for service in services:
        consumers[service].handler_for("user.registered")(events)
    return user_ids


def tombstones(service: str) -> set[uuid.UUID]:
    spec = get_services()[service]
    return set(Tombstone.objects.using(spec.database).filter(context=service)
               .values_list("user_id", flat=True))


def orphan_counts(report: dict) -> dict[str, int]:
    return {name: s["orphans"] for name, s in report["services"].items()}


# -- the flow, with consumers running ---------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases="__all__")
class TestWithConsumers:
    def test_nothing_missing_exits_0(self, start_consumers):
        start_consumers()
        register_users(3, "fine")
        wait_until(lambda: set_up_and_announced(3), message="all defaults, and announced")
        code, output = reconcile()
        assert code == 0, output
        assert "checked 3 user(s)" in output
        assert "nothing missing" in output

    def test_lost_defaults_are_reported_then_repaired_for_that_service_only(
        self, start_consumers
    ):
        running = start_consumers()
        users = register_users(4, "lost")
        wait_until(lambda: set_up_and_announced(4), message="all defaults, and announced")
        wait_settled()
        no_player, half_built = users[0], users[1]
        # Lost after the events were processed: the inbox rows stay.
        Player.objects.filter(user_id=no_player.id).delete()
        Building.objects.filter(user_id=half_built.id, kind="hq").delete()
        inbox_before = inbox_counts()
        processed_before = dict(running.runner.processed)

        code, output = reconcile()
        assert code == 1, output
        assert f"players: missing for 1 user(s):\n  {no_player.id} (lost0)\n" in output
        assert f"buildings: missing for 1 user(s):\n  {half_built.id} (lost1)\n" in output
        code, report = reconcile_json()
        assert code == 1
        assert report["complete"] is False and report["checked"] == 4
        assert {n: s["missing"] for n, s in report["services"].items()} == {
            "players": 1, "characters": 0, "progression": 0, "buildings": 1}
        assert report["services"]["players"]["missing_users"] == [
            {"userId": str(no_player.id), "username": "lost0"}]

        code, output = reconcile("--repair")
        assert code == 0, output
        assert "Re-delivered 2 event(s) to those services only" in output
        wait_until(lambda: counts() == complete_count(4), message="defaults back")
        wait_settled()
        assert_defaults(no_player.id, "lost0")
        assert_defaults(half_built.id, "lost1")
        # Only the durable each repair was addressed to received it.
        assert inbox_counts() == {**inbox_before, "players": inbox_before["players"] + 1,
                                  "buildings": inbox_before["buildings"] + 1}
        processed = running.runner.processed
        assert {n: processed[n] - processed_before[n] for n in get_services()} == {
            "players": 1, "characters": 0, "progression": 0, "buildings": 1}
        subjects = stream_subjects()
        assert subjects["replay.players.user.registered"] == 1
        assert subjects["replay.buildings.user.registered"] == 1
        assert not any(s.startswith(("replay.characters", "replay.progression")) for s in subjects)

        # Idempotent: right away, nothing is missing, so nothing is sent.
        code, report = reconcile_json("--repair")
        assert code == 0 and report["complete"] is True
        assert all(s["repaired"] == 0 for s in report["services"].values())
        assert stream_subjects() == subjects
        code, output = reconcile()
        assert code == 0 and "nothing missing" in output, output

    def test_a_second_repair_before_the_consumer_caught_up_sends_nothing_new(
        self, start_consumers
    ):
        running = start_consumers()
        (user,) = register_users(1, "early")
        wait_until(lambda: set_up_and_announced(1), message="all defaults, and announced")
        wait_settled()
        running.stop()
        Player.objects.filter(user_id=user.id).delete()

        code, first = reconcile_json("--repair")
        assert code == 0 and first["services"]["players"]["repaired"] == 1
        code, second = reconcile_json("--repair")  # the players consumer is still down
        assert code == 0
        assert second["services"]["players"] == {**second["services"]["players"],
                                                 "missing": 1, "repaired": 0, "already_sent": 1}
        assert stream_subjects()["replay.players.user.registered"] == 1  # JetStream dropped it

        late = start_consumers(["players", "accounts"])
        wait_until(lambda: counts() == complete_count(1), message="player back")
        wait_settled(["players"])
        assert late.runner.processed["players"] == 1
        # Its announcement reaches accounts' projection, which the first repair had set back
        # to "not ready" for players (its rows were lost).
        wait_until(lambda: reconcile()[0] == 0, message="players ready again in the projection")

    def test_a_service_added_later_is_backfilled_for_existing_users(self, start_consumers):
        """Its durable sees no history (the stream keeps max_age only): reconcile fills it."""
        running = start_consumers()
        register_users(3, "old")
        wait_until(lambda: set_up_and_announced(3), message="all defaults, and announced")
        wait_settled()
        running.stop()
        # As if progression had never existed: no defaults, no inbox, no stream history.
        MetaProgression.objects.all().delete()
        spec = get_services()["progression"]
        ProcessedEvent.objects.using(spec.database).filter(consumer="progression").delete()
        run_async(lambda js: js.purge_stream(settings.NATS_STREAM))

        code, output = reconcile("--service", "progression")
        assert code == 1 and "missing defaults: progression 3" in output, output
        code, report = reconcile_json("--service", "progression", "--repair")
        assert code == 0 and report["services"]["progression"]["repaired"] == 3
        assert list(report["services"]) == ["progression"]
        late = start_consumers()
        wait_until(lambda: set_up_and_announced(3), message="progression backfilled, and announced")
        wait_settled()
        assert {n: late.runner.processed[n] for n in get_services()} == {
            "players": 0, "characters": 0, "progression": 3, "buildings": 0}
        assert reconcile()[0] == 0

    def test_orphans_are_named_then_erased_in_the_services_holding_them_only(
        self, start_consumers
    ):
        running = start_consumers()
        (user,) = register_users(1, "kept")
        wait_until(lambda: set_up_and_announced(1), message="all defaults, and announced")
        wait_settled()
        both = make_orphans(1, ["players", "buildings"])[0]
        buildings_only = make_orphans(1, ["buildings"])[0]
        processed_before = dict(running.runner.processed)

        code, output = reconcile()
        assert code == 1, output
        assert f"players: orphan rows of 1 user(s) accounts does not know:\n  {both}\n" in output
        assert ("buildings: orphan rows of 2 user(s) accounts does not know:\n"
                f"  {min(both, buildings_only)}\n  {max(both, buildings_only)}\n") in output
        assert "orphans: players 1, buildings 2. `manage.py reconcile --repair`" in output
        assert "nothing missing" not in output and "missing defaults" not in output
        code, report = reconcile_json()
        assert code == 1
        assert report["complete"] is True and report["orphans"] == 3  # nobody lacks defaults
        assert orphan_counts(report) == {
            "players": 1, "characters": 0, "progression": 0, "buildings": 2}
        assert {n: s["held"] for n, s in report["services"].items()} == {
            "players": 2, "characters": 1, "progression": 1, "buildings": 3}
        assert report["services"]["players"]["orphan_users"] == [{"userId": str(both)}]
        assert report["services"]["players"]["orphan_users_truncated"] is False

        code, output = reconcile("--repair")
        assert code == 0, output
        assert "Sent user.deleted for them (3 event(s)) to those services only" in output
        wait_until(lambda: counts() == complete_count(1), message="orphans erased")
        wait_settled()
        assert_defaults(user.id, "kept0")
        processed = running.runner.processed
        assert {n: processed[n] - processed_before[n] for n in get_services()} == {
            "players": 1, "characters": 0, "progression": 0, "buildings": 2}
        subjects = stream_subjects()
        assert subjects["replay.players.user.deleted"] == 1
        assert subjects["replay.buildings.user.deleted"] == 2
        assert not any(s.startswith(("replay.characters", "replay.progression")) for s in subjects)
        assert "user.deleted" not in subjects  # nothing broadcast
        assert tombstones("players") == {both}
        assert tombstones("buildings") == {both, buildings_only}
        assert tombstones("characters") == tombstones("progression") == set()
        # The copies are in the ledger, under their user: an erasure of the key deletes them.
        assert sorted(PublishedMessage.objects.filter(subject__endswith="user.deleted")
                      .values_list("key", "subject")) == sorted([
                          (str(both), "replay.players.user.deleted"),
                          (str(both), "replay.buildings.user.deleted"),
                          (str(buildings_only), "replay.buildings.user.deleted")])

        code, output = reconcile()
        assert code == 0, output
        assert "nothing missing, no orphans" in output
        # The tombstones keep them gone: a late user.registered for them creates nothing.
        get_services()["players"].handler_for("user.registered")(
            [sample_event(user_id=both, username="late")])
        assert not Player.objects.filter(user_id=both).exists()
        assert reconcile()[0] == 0

    def test_an_orphan_on_a_service_whose_consumer_is_down_is_erased_when_it_comes_back(
        self, start_consumers
    ):
        running = start_consumers()
        gone, kept = register_users(2, "raw")
        wait_until(lambda: set_up_and_announced(2), message="all defaults, and announced")
        wait_settled()
        running.stop()
        # Deleted behind the service's back (as before user.deleted existed): no event, and
        # every service keeps the user's rows.
        User.objects.filter(pk=gone.pk).delete()
        others = start_consumers(["characters", "progression", "buildings"])

        code, report = reconcile_json()
        assert code == 1 and orphan_counts(report) == {
            "players": 1, "characters": 1, "progression": 1, "buildings": 1}
        code, report = reconcile_json("--repair")
        assert code == 0 and {n: s["erased"] for n, s in report["services"].items()} == {
            "players": 1, "characters": 1, "progression": 1, "buildings": 1}
        wait_until(lambda: counts() == {**complete_count(1), "players": 2},
                   message="erased where the consumers run")
        wait_settled(["characters", "progression", "buildings"])
        assert others.runner.processed == {"characters": 1, "progression": 1, "buildings": 1}
        # players' copy waits on the stream for its consumer; until then, still an orphan there.
        code, report = reconcile_json()
        assert code == 1 and orphan_counts(report) == {
            "players": 1, "characters": 0, "progression": 0, "buildings": 0}
        assert report["services"]["players"]["orphan_users"] == [{"userId": str(gone.pk)}]

        late = start_consumers(["players"])
        wait_until(lambda: counts() == complete_count(1), message="player erased on return")
        wait_settled(["players"])
        assert late.runner.processed == {"players": 1}
        assert not Player.objects.filter(user_id=gone.pk).exists()
        assert_defaults(kept.id, "raw1")
        assert tombstones("players") == {gone.pk}
        assert reconcile()[0] == 0

    def test_repair_fails_clearly_when_nats_cannot_be_reached(self, monkeypatch):
        (user,) = register_users(1, "refused")
        set_up_everywhere([user])
        Player.objects.filter(user_id=user.id).delete()
        monkeypatch.setattr(settings, "NATS_URL", "nats://127.0.0.1:1")  # nothing listens
        monkeypatch.setattr(settings, "NATS_REQUEST_TIMEOUT", 0.5)
        with pytest.raises(CommandError, match=r"did not answer; 0 repair\(s\) sent"):
            reconcile("--repair")


# -- report mode, filters, arguments, batching: no NATS needed ----------------------------------


# --repair scans on a thread of its own: committed rows, not a test transaction.
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_readiness_projection_is_compared_with_the_rows_and_set_right():
    """An announcement lost (the projection says not ready, the rows are all there), and
    rows lost (the projection says ready, they are not): both reported, and --repair sets
    the projection to what the rows say; the lost rows' user.registered repair makes the
    service announce again once it has them."""
    lost_announcement, lost_rows = register_users(2, "proj")
    set_up_everywhere([lost_announcement, lost_rows])
    ServiceReadiness.objects.filter(user_id=lost_announcement.id, service="players").delete()
    Building.objects.filter(user_id=lost_rows.id).delete()

    code, report = reconcile_json()
    assert code == 1 and report["projection_stale"] == 2
    assert report["services"]["players"]["projection_stale"] == 1
    assert report["services"]["buildings"]["projection_stale"] == 1
    code, output = reconcile()
    assert code == 1 and "readiness projection out of step" in output, output

    with override_settings(NATS_URL="nats://127.0.0.1:1"):  # the projection needs no NATS
        code, report = reconcile_json("--repair", "--service", "players")
    assert code == 0 and report["services"]["players"]["projection_repaired"] == 1
    assert user_onboarding_get(user_id=lost_announcement.id).complete
    # Buildings, not repaired yet: still ready in the projection, still reported. Its
    # repair also re-delivers the registration (TestWithConsumers); here, the projection's.
    assert user_onboarding_get(user_id=lost_rows.id).services["buildings"]
    assert reconcile_json("--service", "buildings")[1]["projection_stale"] == 1
    assert readiness_repair({"buildings": [(lost_rows.id, False)]}, now=timezone.now()) == 1
    assert not user_onboarding_get(user_id=lost_rows.id).services["buildings"]
    assert reconcile_json("--service", "buildings")[1]["projection_stale"] == 0


@pytest.mark.django_db(databases="__all__")
class TestReportOnly:
    def test_service_filter(self):
        users = register_users(2, "svc")
        set_up_everywhere(users)
        Building.objects.filter(user_id=users[0].id).delete()
        code, report = reconcile_json("--service", "buildings")
        assert code == 1 and list(report["services"]) == ["buildings"]
        assert report["services"]["buildings"]["missing"] == 1
        code, report = reconcile_json("--service", "players")
        assert code == 0 and list(report["services"]) == ["players"]

    def test_since_filter_and_grace(self):
        old, new = register_users(2, "when")
        User.objects.filter(pk=old.pk).update(date_joined=dt.datetime(2020, 5, 1, tzinfo=dt.UTC))
        # Neither is set up anywhere.
        code, report = reconcile_json("--since", "2021-01-01")
        assert code == 1 and report["checked"] == 1
        assert report["services"]["players"]["missing_users"][0]["userId"] == str(new.pk)
        assert report["since"] == "2021-01-01T00:00:00Z"
        code, report = reconcile_json("--since", "2020-05-01T00:00:00+00:00")
        assert report["checked"] == 2
        code, report = reconcile_json("--since", "2999-01-01")
        assert code == 0 and report["checked"] == 0
        # Within the grace period a user is still in flight: not checked, no alarm.
        out = StringIO()
        call_command("reconcile", "--since", "2021-01-01", "--min-age", "3600", stdout=out)
        assert "checked 0 user(s)" in out.getvalue()

    @pytest.mark.parametrize("args, message", [
        (["--service", "nope"], "unknown service 'nope'; services: players, characters, "
                                "progression, buildings"),
        (["--since", "yesterday"], "--since: not an ISO date or date-time: 'yesterday'"),
        (["--since", "2026-02-30"], "--since: not an ISO date or date-time: '2026-02-30'"),
        (["--chunk-size", "0"], "--chunk-size must be at least 1"),
        (["--min-age", "-1"], "--min-age must be 0 or more seconds"),
        (["--force"], "--force only makes sense with --repair"),
    ])
    def test_bad_arguments(self, args, message):
        with pytest.raises(CommandError) as error:
            call_command("reconcile", *args, stdout=StringIO())
        assert message in str(error.value)

    def test_users_are_read_in_keyset_chunks(self):
        """250 users, chunks of 50: 6 queries on the users table (5 chunks + an empty one),
        each LIMITed, none with OFFSET, and one query per service and chunk."""
        now = dt.datetime.now(dt.UTC)
        User.objects.bulk_create(
            User(username=f"many{i}", email=f"many{i}@example.com") for i in range(250)
        )
        users = list(User.objects.all())
        set_up_everywhere(users[:200])
        until = now + dt.timedelta(minutes=1)

        chunks = [len(c) for c in user_chunks(since=None, until=until, chunk_size=50)]
        assert chunks == [50] * 5
        seen = [u.pk for c in user_chunks(since=None, until=until, chunk_size=50) for u in c]
        assert seen == sorted(u.pk for u in users)

        aliases = {"default", *settings.CONTEXT_DATABASES.values()}
        with contextlib.ExitStack() as stack:
            captured = {a: stack.enter_context(CaptureQueriesContext(connections[a]))
                        for a in aliases}
            results = list(reconcile_scan(services=list(get_services()), since=None,
                                          until=until, chunk_size=50))
        assert [len(r.users) for r in results] == [50] * 5
        assert sum(len(r.missing["players"]) for r in results) == 50
        queries = [q["sql"] for c in captured.values() for q in c.captured_queries]
        user_queries = [q for q in queries if "accounts_user" in q]
        assert len(user_queries) == 6, user_queries
        assert all("LIMIT 50" in q and "OFFSET" not in q for q in user_queries)
        # Per chunk: one per service, and one on accounts' readiness projection.
        assert len(queries) - len(user_queries) == 5 * len(get_services()) + 5

    def test_repair_event_id_is_per_service_user_and_window(self):
        (user,) = register_users(1, "ids")
        now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        window = dt.timedelta(seconds=settings.NATS_DUPLICATE_WINDOW)
        same = repair_event_id(service="players", user_id=user.pk, now=now)
        assert same == repair_event_id(service="players", user_id=user.pk,
                                       now=now + dt.timedelta(seconds=1))
        assert same != repair_event_id(service="buildings", user_id=user.pk, now=now)
        assert same != repair_event_id(service="players", user_id=user.pk, now=now + window)

    def test_orphans_are_searched_in_keyset_pages(self):
        """Every service's users paged ``--chunk-size`` at a time by keyset on user_id: one
        query on the service's database and one on the users table per page, each LIMITed or
        bounded by the page's ids, none with OFFSET; the orphans counted whole, named bounded."""
        users = register_users(7, "paged")
        set_up_everywhere(users)
        orphans = make_orphans(11, ["players"])
        until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)

        aliases = {"default", *settings.CONTEXT_DATABASES.values()}
        with contextlib.ExitStack() as stack:
            captured = {a: stack.enter_context(CaptureQueriesContext(connections[a]))
                        for a in aliases}
            pages = list(orphan_scan(services=list(get_services()), until=until, chunk_size=5))
        # players holds 18 users (5, 5, 5, 3), each other service 7 (5, 2).
        assert [(p.service, len(p.held)) for p in pages] == [
            ("players", 5), ("players", 5), ("players", 5), ("players", 3),
            ("characters", 5), ("characters", 2), ("progression", 5), ("progression", 2),
            ("buildings", 5), ("buildings", 2)]
        assert [u for p in pages if p.service == "players" for u in p.held] == sorted(
            [u.pk for u in users] + orphans)
        assert [u for p in pages for u in p.orphans] == orphans
        queries = [q["sql"] for c in captured.values() for q in c.captured_queries]
        user_queries = [q for q in queries if "accounts_user" in q]
        assert len(user_queries) == len(pages), user_queries
        assert all("LIMIT" not in q and "OFFSET" not in q for q in user_queries)
        # Told by table, not by alias: with every context in one database, all share default.
        held_queries = [q for q in queries if "accounts_user" not in q
                        and any(f'"{name}_' in q for name in get_services())]
        assert len(held_queries) == len(pages), held_queries
        assert all("LIMIT 5" in q and "OFFSET" not in q for q in held_queries)

        code, report = reconcile_json("--chunk-size", "5")
        assert code == 1 and report["orphans"] == 11 and report["complete"] is True
        assert report["services"]["players"]["held"] == 18
        assert report["services"]["players"]["orphan_users"] == [
            {"userId": str(u)} for u in orphans]
        code, output = reconcile("--chunk-size", "5")
        assert code == 1
        listed = "".join(f"  {u}\n" for u in orphans[:10])
        assert (f"players: orphan rows of 11 user(s) accounts does not know:\n{listed}"
                "  … and 1 more (--json lists 50 per service)\n") in output
        # --service searches that service only; --since does not limit the search.
        code, report = reconcile_json("--service", "buildings")
        assert code == 0 and list(report["services"]) == ["buildings"]
        assert report["orphans"] == 0
        code, report = reconcile_json("--since", "2999-01-01")
        assert code == 1 and report["checked"] == 0 and report["orphans"] == 11

    def test_a_deletion_still_on_its_way_is_no_orphan_within_the_grace(self):
        (user,) = register_users(1, "erasing")
        set_up_everywhere([user])
        user_delete(user=user)  # its user.deleted is written, not handled yet
        out = StringIO()
        call_command("reconcile", "--json", stdout=out)  # the default grace: 60 s
        assert json.loads(out.getvalue())["orphans"] == 0
        code, report = reconcile_json()  # no grace
        assert code == 1 and orphan_counts(report) == {
            "players": 1, "characters": 1, "progression": 1, "buildings": 1}

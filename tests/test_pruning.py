"""Bounded storage: published outbox rows, inbox rows and closed dead letters are pruned once
no guarantee needs them, and never before (``manage.py eventbus_prune``, and in the background).

Registrations go through the real flow (HTTP, the outbox, nats-server, the four consumers); the
windows "pass" by overriding them (0: everything published or processed so far is outside), or,
where a test needs rows on both sides of one line, by asking the prune about a later moment.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import threading
import uuid

import pytest
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone

from conftest import RunningConsumers, RunningRelay, run_async, wait_settled, wait_until
from onboarding.eventbus.deadletters.store import dead_letter_resolve, dead_letters_discard
from onboarding.eventbus.models import Announcement, DeadLetter, OutboxEvent, ProcessedEvent
from onboarding.eventbus.ops.story import user_story
from onboarding.eventbus.outbox.leadership import relay_lock
from onboarding.eventbus.runtime import pruning
from tests.flow import complete_count, counts, register

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

N_CONSUMERS = len(settings.BOUNDED_CONTEXTS)


def inbox_rows() -> int:
    return sum(ProcessedEvent.objects.using(alias).count() for alias in pruning.inbox_databases())


def published_rows() -> int:
    return OutboxEvent.objects.filter(published_at__isnull=False).count()


def publish_poison(n: int) -> None:
    """``n`` messages that break the contract: each consumer dead-letters each one, open."""

    async def publish(js):
        for i in range(n):
            await js.publish("user.registered", b"not json{", headers={"Nats-Msg-Id": f"p{i}"})

    run_async(publish)


class Stack:
    """The relay and every consumer on threads of this process, as a deployment runs them."""

    def __init__(self):
        self.relay = RunningRelay().start()
        self.consumers = RunningConsumers(settings.BOUNDED_CONTEXTS).start()

    def stop(self):
        self.consumers.stop()
        self.relay.stop()


@pytest.fixture
def stack(jetstream):
    started = []
    yield lambda: started.append(Stack()) or started[-1]
    for running in started:
        if running.consumers.thread.is_alive():
            running.stop()


def register_users(client, stack, names) -> list[uuid.UUID]:
    """Register over HTTP; return once every default exists, every durable acked and every
    outbox row is marked published."""
    before = counts()["players"]
    ids = []
    for name in names:
        response = register(client, name)
        assert response.status_code == 201, response.content
        ids.append(uuid.UUID(response.json()["userId"]))
    total = before + len(names)
    wait_until(lambda: counts() == complete_count(total), message="every default")
    wait_settled()
    wait_until(lambda: OutboxEvent.objects.filter(published_at__isnull=True).count() == 0,
               message="every outbox row marked published")
    wait_until(lambda: unpublished_announcements() == 0,
               message="every service's announcement marked published")
    return ids


def unpublished_announcements() -> int:
    return sum(Announcement.objects.using(alias).filter(published_at__isnull=True).count()
               for alias in dict.fromkeys(settings.CONTEXT_DATABASES.values()))


def prune_command(*args) -> dict[str, dict[str, int]]:
    """Run ``eventbus_prune``; its counts as {database alias: {kind: count}}."""
    out = io.StringIO()
    call_command("eventbus_prune", *args, stdout=out)
    found = {}
    for line in out.getvalue().splitlines():
        match = re.fullmatch(r"(\w+) \(.*\): (?:deleted|would delete) (.*)", line)
        if match:
            kinds = dict(re.fullmatch(r"(\d+) (.+)", part).group(2, 1)
                         for part in match.group(2).split(", "))
            found[match.group(1)] = {kind: int(n) for kind, n in kinds.items()}
    assert found, out.getvalue()
    return found


def expected_counts(*, outbox: int, inbox_per_consumer: int, dead_letters: int,
                    access_logs: int = 0, ledger: int = 0,
                    announcements: dict[str, int] | None = None) -> dict:
    """What the command prints, database by database: contexts sharing a database share a line.
    Accounts' consumer (its inbox in default) does not run in these tests. ``announcements``:
    by database alias."""
    expected = {"default": {pruning.OUTBOX: outbox, pruning.LEDGER: ledger}}
    for alias in settings.CONTEXT_DATABASES.values():
        line = expected.setdefault(alias, {})
        line.setdefault(pruning.INBOX, 0)
        line.setdefault(pruning.ANNOUNCEMENTS, 0)
    for context in settings.BOUNDED_CONTEXTS:
        line = expected[settings.CONTEXT_DATABASES[context]]
        line[pruning.INBOX] += inbox_per_consumer
    for alias, count in (announcements or {}).items():
        expected[alias][pruning.ANNOUNCEMENTS] = count
    expected["default"][pruning.DEAD_LETTERS] = dead_letters
    expected["default"][pruning.ACCESS_LOGS] = access_logs
    return expected


def windows(settings, seconds: int) -> None:
    settings.NATS_DUPLICATE_WINDOW = seconds
    settings.NATS_STREAM_MAX_AGE = seconds
    settings.EVENTBUS_DEAD_LETTER_KEEP = seconds


def test_prune_deletes_what_the_windows_let_go_and_keeps_what_the_guarantees_need(
    client, stack, settings
):
    settings.EVENTBUS_PRUNE_INTERVAL = 0  # the command alone prunes here
    running = stack()
    users = register_users(client, running, ["ann", "ben", "cid"])
    publish_poison(2)
    wait_until(lambda: DeadLetter.objects.count() == 2 * N_CONSUMERS, message="dead letters")
    running.stop()

    # Dead letters closed the ways the system closes them: discarded by an operator, resolved by
    # a replay that was processed. The rest stay open.
    first, second = sorted({d.stream_seq for d in DeadLetter.objects.all()})
    assert dead_letters_discard(letters=list(DeadLetter.objects.filter(stream_seq=first)),
                                by="test") == N_CONSUMERS
    resolved = DeadLetter.objects.filter(stream_seq=second).first()
    assert dead_letter_resolve(consumer=resolved.consumer,
                               headers={"Dead-Letter-Id": str(resolved.id)}) == 1
    open_letters = set(
        DeadLetter.objects.filter(resolved_at__isnull=True, discarded_at__isnull=True)
        .values_list("id", flat=True)
    )
    assert len(open_letters) == N_CONSUMERS - 1
    # Outbox rows still owed to the stream, however old: one waiting, one the relay set aside.
    long_ago = timezone.now() - dt.timedelta(days=365)
    waiting = OutboxEvent.objects.create(event_id=uuid.uuid4(), subject="user.registered",
                                         payload="{}", created_at=long_ago)
    set_aside = OutboxEvent.objects.create(event_id=uuid.uuid4(), subject="user.elsewhere",
                                           payload="{}", created_at=long_ago, attempts=10,
                                           set_aside_at=long_ago)
    assert (published_rows(), inbox_rows()) == (3, 3 * N_CONSUMERS)

    # Inside every window (the defaults: hours, days): nothing goes.
    nothing = expected_counts(outbox=0, inbox_per_consumer=0, dead_letters=0)
    assert prune_command() == nothing
    assert (published_rows(), inbox_rows(), DeadLetter.objects.count()) == (
        3, 3 * N_CONSUMERS, 2 * N_CONSUMERS)

    # One announcement per batch that set users up: as many as the consumers' batches were.
    announced = {alias: Announcement.objects.using(alias).count() for alias in dict.fromkeys(
        settings.CONTEXT_DATABASES[context] for context in settings.BOUNDED_CONTEXTS)}
    assert all(announced.values()), announced
    windows(settings, 0)  # the windows pass
    due = expected_counts(outbox=3, inbox_per_consumer=3, dead_letters=N_CONSUMERS + 1,
                          announcements=announced)
    assert prune_command("--dry-run") == due
    assert (published_rows(), inbox_rows(), DeadLetter.objects.count()) == (
        3, 3 * N_CONSUMERS, 2 * N_CONSUMERS), "a dry run deleted something"

    assert prune_command("--batch", "2") == due  # several batches of every kind
    assert published_rows() == 0
    assert inbox_rows() == 0
    assert set(OutboxEvent.objects.values_list("id", flat=True)) == {waiting.id, set_aside.id}
    assert set(DeadLetter.objects.values_list("id", flat=True)) == open_letters
    assert counts() == complete_count(3)  # the services' own rows are not the bus's to prune
    assert prune_command() == nothing

    # The status still tells the story of a user whose event is pruned, and says why.
    story = user_story(user_id=users[0])
    assert story["event"] is None and story["complete"]
    out = io.StringIO()
    call_command("onboarding_status", "--user", str(users[0]), stdout=out)  # complete: exit 0
    assert "pruned after NATS_DUPLICATE_WINDOW" in out.getvalue()


def test_rows_inside_the_window_stay_while_older_ones_go(client, stack, settings):
    """One prune, rows on both sides of its line: the line is drawn per row, by its own age."""
    settings.EVENTBUS_PRUNE_INTERVAL = 0
    running = stack()
    register_users(client, running, ["old1", "old2"])
    line = timezone.now()
    register_users(client, running, ["new1"])
    running.stop()

    # Ask each kind's prune at the moment its window has just passed the line.
    outbox = pruning.outbox_prune(
        now=line + dt.timedelta(seconds=settings.NATS_DUPLICATE_WINDOW))
    assert outbox == 2
    assert OutboxEvent.objects.get().published_at >= line

    later = line + dt.timedelta(seconds=settings.NATS_STREAM_MAX_AGE)
    inbox = sum(pruning.inbox_prune(database=alias, now=later)
                for alias in pruning.inbox_databases())
    assert inbox == 2 * N_CONSUMERS
    assert inbox_rows() == N_CONSUMERS
    assert all(row.processed_at >= line for alias in pruning.inbox_databases()
               for row in ProcessedEvent.objects.using(alias))


def test_batches_cover_more_rows_than_one_batch_and_stop_between_batches():
    rows = ProcessedEvent.objects.using(pruning.inbox_databases()[0])
    old = timezone.now() - dt.timedelta(seconds=settings.NATS_STREAM_MAX_AGE + 60)
    rows.bulk_create(
        ProcessedEvent(consumer="players", event_id=str(i), subject="user.registered",
                       stream_seq=i, processed_at=old)
        for i in range(250)
    )
    rows.create(consumer="players", event_id="fresh", subject="user.registered", stream_seq=999)
    due = pruning.inbox_prunable(database=rows.db)

    calls = []
    assert pruning.delete_in_batches(due, order_by="processed_at", batch=100, pause=0,
                                     should_stop=lambda: calls.append(1) or len(calls) > 1) == 100
    assert pruning.delete_in_batches(due, order_by="processed_at", batch=40, pause=0) == 150
    assert list(rows.values_list("event_id", flat=True)) == ["fresh"]


def test_concurrent_pruners_delete_each_row_once_and_fail_nothing():
    """Replicas of one consumer prune the same rows at the same moment: harmless."""
    alias = pruning.inbox_databases()[0]
    old = timezone.now() - dt.timedelta(seconds=settings.NATS_STREAM_MAX_AGE + 60)
    ProcessedEvent.objects.using(alias).bulk_create(
        ProcessedEvent(consumer="players", event_id=str(i), subject="user.registered",
                       stream_seq=i, processed_at=old)
        for i in range(3000)
    )
    totals, errors = [], []

    def prune():
        from django.db import connections

        try:
            totals.append(pruning.inbox_prune(database=alias, consumer="players", batch=50,
                                              pause=0))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=prune) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    # A pruner stops at a short batch: what another holds, that one deletes. Whatever is left
    # (rows skipped at the very end) goes in the next round; nothing is deleted twice.
    left = ProcessedEvent.objects.using(alias).count()
    assert sum(totals) + left == 3000
    assert pruning.inbox_prune(database=alias) == left
    assert ProcessedEvent.objects.using(alias).count() == 0


@pytest.mark.parametrize("interval", [0.2, 0], ids=["every-0.2s", "off"])
def test_the_relay_and_the_consumers_prune_in_the_background(client, stack, settings, interval):
    settings.EVENTBUS_PRUNE_INTERVAL = interval
    windows(settings, 3600)
    running = stack()
    register_users(client, running, ["bg1", "bg2"])
    publish_poison(1)
    wait_until(lambda: DeadLetter.objects.count() == N_CONSUMERS, message="dead letters")
    windows(settings, 0)  # the windows pass while they run
    if interval:
        wait_until(lambda: (published_rows(), inbox_rows()) == (0, 0), timeout=10,
                   message="the background prune")
    else:  # several rounds' worth of time: a prune that ran would show
        threading.Event().wait(1.0)
    running.stop()
    expected = (0, 0) if interval else (2, 2 * N_CONSUMERS)
    assert (published_rows(), inbox_rows()) == expected
    assert counts() == complete_count(2)
    assert DeadLetter.objects.count() == N_CONSUMERS  # open: never pruned


def test_only_the_active_relay_prunes(settings, jetstream):
    settings.EVENTBUS_PRUNE_INTERVAL = 0.1
    settings.NATS_DUPLICATE_WINDOW = 0
    now = timezone.now()
    OutboxEvent.objects.bulk_create(
        OutboxEvent(event_id=uuid.uuid4(), subject="user.registered", payload="{}",
                    created_at=now, published_at=now)
        for _ in range(5)
    )
    other = relay_lock()
    assert other.acquire()  # another relay is active: this one stands by
    standby = RunningRelay().start()
    try:
        threading.Event().wait(1.0)  # ten intervals
        assert published_rows() == 5
        other.release()  # the active one died: the standby takes over, and prunes
        wait_until(lambda: published_rows() == 0, timeout=15, message="the new active relay")
    finally:
        other.release()
        standby.stop()


def test_background_pruning_survives_a_failure_and_stops_promptly():
    import asyncio

    calls = []

    def flaky(*, should_stop):
        calls.append(should_stop())
        if len(calls) == 1:
            raise RuntimeError("database gone")
        return [pruning.Pruned("default", pruning.OUTBOX, 1)]

    async def main(interval):
        pruner = pruning.BackgroundPruning("test", flaky, interval=interval).start()
        await asyncio.sleep(0.3)
        await pruner.stop()
        return pruner

    off = asyncio.run(main(0))
    assert (calls, off.rounds) == ([], 0)
    on = asyncio.run(main(0.05))
    assert len(calls) >= 3 and on.rounds == len(calls) - 1  # the failed round did not count
    assert on.deleted == on.rounds
    assert not any(calls)  # never asked to stop mid-round before stop()


def test_the_command_refuses_a_batch_below_one():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--batch"):
        call_command("eventbus_prune", "--batch", "0", stdout=io.StringIO())


def test_dead_letters_prunable_never_matches_an_open_or_reopened_one(settings):
    settings.EVENTBUS_DEAD_LETTER_KEEP = 0
    past = timezone.now() - dt.timedelta(days=400)

    def letter(seq, **fields):
        return DeadLetter.objects.create(
            consumer="players", stream="USERS", stream_seq=seq, subject="user.registered",
            payload=b"{}", headers={}, deliveries=1, error_type="X", error_message="x",
            first_failed_at=past, last_failed_at=past, **fields)

    open_one = letter(1)
    reopened = letter(2, replayed_at=past)  # resolved once, failed again: resolved_at cleared
    closed = [letter(3, resolved_at=past), letter(4, discarded_at=past, discarded_by="ops")]
    assert set(pruning.dead_letters_prunable().values_list("id", flat=True)) == {
        c.id for c in closed}
    assert pruning.dead_letters_prune() == 2
    assert set(DeadLetter.objects.values_list("id", flat=True)) == {open_one.id, reopened.id}


def test_the_admin_logins_records_are_pruned_after_their_keep_period(settings):
    """axes keeps a username, an address and a browser per admin login, failed or not: they go
    once ADMIN_ACCESS_LOG_KEEP has passed (never before), with the rest."""
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog

    settings.ADMIN_ACCESS_LOG_KEEP = 3600
    now = timezone.now()
    fields = {"user_agent": "ua", "ip_address": "127.0.0.1", "http_accept": "*/*",
              "path_info": "/admin/login/"}
    for age, name in ((7200, "old"), (60, "new")):
        made = [AccessLog.objects.create(username=name, **fields),
                AccessFailureLog.objects.create(username=name, **fields),
                AccessAttempt.objects.create(username=name, get_data="", post_data="",
                                             failures_since_start=1, **fields)]
        for row in made:  # attempt_time is auto_now_add
            type(row).objects.filter(pk=row.pk).update(
                attempt_time=now - dt.timedelta(seconds=age))
    assert pruning.access_logs_prune(dry_run=True) == 3
    assert pruning.access_logs_prune() == 3
    for model in (AccessLog, AccessFailureLog, AccessAttempt):
        assert list(model.objects.values_list("username", flat=True)) == ["new"]
    assert prune_command()["default"][pruning.ACCESS_LOGS] == 0


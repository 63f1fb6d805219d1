"""The consumer runner under the failure modes a review found (issue 10): settling that raises,
failures that were swallowed, a hung handler, events of different subjects in one batch."""

from __future__ import annotations

import logging
import os

import pytest
from django.core.management import call_command

from conftest import wait_until
from onboarding.eventbus.models import DeadLetter
from tests.flow import complete_count, counts, sample_event
from tests.test_consumer_failures import publish_all, valid

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def short_ack_wait(settings, seconds: float = 2.0) -> None:
    """Give the durables a short ack_wait, so that JetStream's redelivery shows within a test."""
    settings.CONSUMER_ACK_WAIT = seconds
    call_command("setup_jetstream", stdout=open(os.devnull, "w"))


def test_an_ack_that_raises_neither_stops_its_consumer_nor_the_others(
    start_consumers, settings, monkeypatch, caplog
):
    """With ``consume --all`` an escaping exception took all four consumers down."""
    import nats.aio.msg
    import nats.errors

    short_ack_wait(settings)
    original_ack = nats.aio.msg.Msg.ack
    failed = []

    async def ack(msg):
        if msg.metadata.consumer == "players" and not failed:
            failed.append(msg.metadata.sequence.stream)
            raise nats.errors.ConnectionClosedError
        return await original_ack(msg)

    monkeypatch.setattr(nats.aio.msg.Msg, "ack", ack)
    caplog.set_level(logging.WARNING, logger="onboarding.eventbus")
    first = [sample_event(username=f"ack{i}") for i in range(3)]
    publish_all([valid(event) for event in first])
    running = start_consumers()
    wait_until(lambda: counts() == complete_count(3), message="the first events applied")
    wait_until(lambda: failed, message="an ack failed")
    later = sample_event(username="after-the-failed-ack")
    publish_all([valid(later)])
    wait_until(lambda: counts() == complete_count(4), message="every consumer carried on")
    # The message whose ack failed comes back after ack_wait; the inbox skips it.
    wait_until(lambda: running.runner.duplicates["players"] >= 1, timeout=15,
               message="the unacked message redelivered and skipped")
    assert running.thread.is_alive()
    running.stop()
    assert counts() == complete_count(4)
    assert not DeadLetter.objects.exists()
    lines = [r.getMessage() for r in caplog.records if "settling" in r.getMessage()]
    assert lines and f"seq={failed[0]}" in lines[0] and "ConnectionClosedError" in lines[0], lines


def test_a_replay_whose_dead_letter_cannot_be_resolved_says_so(start_consumers, monkeypatch,
                                                                caplog, settings):
    from django.db import OperationalError

    from onboarding.contracts import EVENT_ID_HEADER
    from onboarding.eventbus.consumer import settling
    from onboarding.eventbus.deadletters.replay import dead_letters_replay
    from onboarding.eventbus.deadletters.store import dead_letter_store

    event = sample_event(username="replayed")
    payload, headers = valid(event)
    letter = dead_letter_store(
        consumer="players", subject="user.registered", stream=settings.NATS_STREAM,
        stream_seq=99, event_id=headers[EVENT_ID_HEADER], payload=payload, headers=headers,
        deliveries=4, error=ValueError("failed earlier"),
    )

    def resolve_fails(**kwargs):
        raise OperationalError("the operations database is read-only")

    monkeypatch.setattr(settling, "dead_letter_resolve", resolve_fails)
    caplog.set_level(logging.WARNING, logger="onboarding.eventbus")
    running = start_consumers(["players"])
    assert dead_letters_replay(letters=[letter]) == 1
    wait_until(lambda: counts()["players"] == 1, message="the replay applied")
    wait_until(lambda: any("could not be marked resolved" in r.getMessage()
                           for r in caplog.records), message="the failed resolve logged")
    running.stop()
    line = next(r for r in caplog.records if "could not be marked resolved" in r.getMessage())
    assert line.levelno == logging.ERROR
    assert f"dead letter {letter.id} " in line.getMessage()
    assert headers[EVENT_ID_HEADER] in line.getMessage()
    letter.refresh_from_db()
    assert letter.resolved_at is None  # open, and now someone knows why


def test_a_keepalive_that_fails_is_logged_with_the_ids(start_consumers, settings, monkeypatch,
                                                       caplog):
    import threading

    import nats.aio.msg
    import nats.errors

    import players.consumers

    short_ack_wait(settings, 1.5)  # a beat every 0.5 s

    async def in_progress(msg):
        raise nats.errors.ConnectionClosedError

    monkeypatch.setattr(nats.aio.msg.Msg, "in_progress", in_progress)
    original = players.consumers.players_create_defaults
    slow_once = threading.Event()

    def slow(**kwargs):
        if not slow_once.is_set():
            slow_once.set()
            threading.Event().wait(1.2)  # a slow handler: at least two beats
        return original(**kwargs)

    monkeypatch.setattr(players.consumers, "players_create_defaults", slow)
    caplog.set_level(logging.WARNING, logger="onboarding.eventbus")
    event = sample_event(username="kept-alive")
    publish_all([valid(event)])
    running = start_consumers(["players"])
    wait_until(lambda: counts()["players"] == 1, message="applied despite the keepalive")
    running.stop()
    lines = [r.getMessage() for r in caplog.records if "keepalive" in r.getMessage()]
    assert lines, "the failed keepalive was dropped silently"
    assert "seq=1 " in lines[0] and "ConnectionClosedError" in lines[0], lines


def _log_has(caplog, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def test_a_hung_handler_is_abandoned_rolled_back_and_handed_back(start_consumers, settings,
                                                                 monkeypatch, caplog):
    """The handler writes its rows, then hangs inside the transaction. After
    CONSUMER_BATCH_TIMEOUT the runner gives up on it and hands the batch back; when the handler
    returns at last, its transaction rolls back instead of committing; the redelivery applies
    each event once."""
    import threading

    import players.consumers

    settings.CONSUMER_BATCH_TIMEOUT = 2.0
    release, hung = threading.Event(), threading.Event()
    original = players.consumers.players_create_defaults

    def hangs_once(**kwargs):
        original(**kwargs)  # rows the abandoned transaction must not commit
        if not hung.is_set():
            hung.set()
            release.wait(60)

    monkeypatch.setattr(players.consumers, "players_create_defaults", hangs_once)
    caplog.set_level(logging.INFO, logger="onboarding.eventbus")
    events = [sample_event(username=f"hung{i}") for i in range(3)]
    publish_all([valid(event) for event in events])
    try:
        running = start_consumers(["players"])
        wait_until(lambda: _log_has(caplog, "HandlerTimeout"), timeout=30,
                   message="the hung transaction given up on")
        assert counts()["players"] == 0
    finally:
        release.set()
    wait_until(lambda: running.runner.processed["players"] == 3, timeout=30,
               message="the handed-back events applied")
    running.stop()
    assert counts()["players"] == 3
    # Had the abandoned transaction committed, the redeliveries would have been duplicates.
    assert running.runner.duplicates["players"] == 0
    assert _log_has(caplog, "the abandoned transaction returned and rolled back (Abandoned")
    assert not DeadLetter.objects.exists()




def _on_postgresql() -> bool:
    from django.conf import settings

    alias = settings.CONTEXT_DATABASES["players"]
    return settings.DATABASES[alias]["ENGINE"].endswith("postgresql")


@pytest.mark.parametrize("cap, lock_timeout", [(1.0, 3.0), (30.0, 1.0)],
                         ids=["the-batch-cap-first", "lock_timeout-first"])
def test_a_handler_blocked_on_a_row_lock_is_handed_back_and_applied_once_released(
    start_consumers, settings, monkeypatch, caplog, cap, lock_timeout
):
    """Another transaction holds the row the handler inserts (an uncommitted insert of the same
    player). The consumer's batch is given up on — by the cap, or by PostgreSQL's lock_timeout
    — rolled back and handed back; once the lock is released the event is applied once."""
    if not _on_postgresql():
        pytest.skip("row locks and lock_timeout are PostgreSQL's (SQLite locks the whole file)")
    from django.db import connections, transaction

    import players.consumers
    from players.models import Player

    settings.CONSUMER_BATCH_TIMEOUT = cap
    settings.CONSUMER_LOCK_TIMEOUT = lock_timeout
    attempts = []
    original = players.consumers.players_create_defaults

    def counted(**kwargs):
        attempts.append(1)
        return original(**kwargs)

    monkeypatch.setattr(players.consumers, "players_create_defaults", counted)
    caplog.set_level(logging.INFO, logger="onboarding.eventbus")
    locked, free = sample_event(username="locked"), sample_event(username="free")
    alias = settings.CONTEXT_DATABASES["players"]
    with transaction.atomic(using=alias):
        # The same player, inserted and not committed: the handler's insert waits on it.
        Player.objects.using(alias).create(user_id=locked.user_id, username="holder")
        publish_all([valid(locked), valid(free)])
        running = start_consumers(["players"])
        wait_until(lambda: len(attempts) >= 2, timeout=30,
                   message="the blocked batch given up on and tried again")
        transaction.set_rollback(True, using=alias)  # release the lock: the holder gives up
    connections[alias].close()
    wait_until(lambda: running.runner.processed["players"] == 2, timeout=30,
               message="both applied once the lock was released")
    running.stop()
    assert counts()["players"] == 2
    assert Player.objects.get(user_id=locked.user_id).username == "locked"
    assert running.runner.duplicates["players"] == 0
    assert not DeadLetter.objects.exists()
    expected = "HandlerTimeout" if cap < lock_timeout else "lock timeout"
    assert _log_has(caplog, expected), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("mode", ["per-message", "batch-fallback"])
def test_a_batch_is_not_held_hostage_by_a_transaction_given_up_on(manage, settings, mode):
    """Issue 19. A replica's transaction blocks on a row lock and is given up on
    (CONSUMER_BATCH_TIMEOUT), in --per-message mode or in the batch's one-at-a-time fallback.
    The rest of its batch is handed back at once, so another replica applies it while the lock
    is still held; and a SIGTERM ends the blocked replica within seconds. Before: the next
    message waited for the blocked thread with no limit, the keepalive kept the rest of the
    batch from every other replica, and the process ignored SIGTERM until the database gave up.
    """
    if not _on_postgresql():
        pytest.skip("row locks are PostgreSQL's (SQLite locks the whole file, and a second "
                    "replica could not write either)")
    from django.db import connections, transaction

    from players.models import Player

    alias = settings.CONTEXT_DATABASES["players"]
    locked, *free = (sample_event(username=f"{mode}-{name}") for name in ("locked", "a", "b"))
    blocked_env = {
        "CONSUMER_BATCH_TIMEOUT": "1",
        # Only the cap gives up on it: the database would let it wait ten minutes.
        "CONSUMER_LOCK_TIMEOUT": "600", "CONSUMER_STATEMENT_TIMEOUT": "600",
        # The blocked event, nak'ed with its retry delay, stays away from the other replica
        # (whose batch would otherwise block on it in turn).
        "CONSUMER_RETRY_BASE_DELAY": "300", "CONSUMER_RETRY_MAX_DELAY": "300",
    }
    if mode == "per-message":
        args = ("consume", "players", "--per-message")
    else:
        # The batch's transaction fails first (an injected failure at each event's first
        # attempt), so the batch falls back to one message at a time; the blocked event is first.
        args = ("consume", "players")
        blocked_env["FAULT_FAIL_FIRST"] = "players:1"
    try:
        with transaction.atomic(using=alias):
            # The same player, inserted and not committed: the handler's insert waits on it.
            Player.objects.using(alias).create(user_id=locked.user_id, username="holder")
            publish_all([valid(event) for event in (locked, *free)])
            blocked = manage(*args, faults=mode != "per-message", **blocked_env)
            blocked.wait_for_output("HandlerTimeout", timeout=30)
            other = manage("consume", "players")
            wait_until(
                lambda: Player.objects.filter(
                    user_id__in=[event.user_id for event in free]).count() == 2,
                timeout=30, message="the rest of the batch applied by the other replica")
            assert blocked.poll() is None, blocked.output()
            code, output = blocked.stop(timeout=15)  # its thread is still blocked on the lock
            assert code == 0, output
            assert "handing back 2 message(s)" in output, output
            transaction.set_rollback(True, using=alias)
    finally:
        connections[alias].close()
    code, output = other.stop()
    assert code == 0, output
    assert "processed 2, 0 duplicate(s) skipped" in output, output
    # The transaction given up on never committed; its event waits for its retry delay.
    assert not Player.objects.filter(user_id=locked.user_id).exists()
    assert not DeadLetter.objects.exists()


def test_the_session_timeouts_are_the_consumers_alone(settings):
    """Consumer threads' PostgreSQL connections get statement_timeout and lock_timeout; the
    connections of any other thread (the web's) keep the server's defaults."""
    if not _on_postgresql():
        pytest.skip("session timeouts are PostgreSQL's")
    import asyncio

    from django.db import connections

    from onboarding.eventbus.consumer.runner import Worker

    settings.CONSUMER_STATEMENT_TIMEOUT, settings.CONSUMER_LOCK_TIMEOUT = 7, 3
    alias = settings.CONTEXT_DATABASES["players"]

    def show():
        with connections[alias].cursor() as cursor:
            cursor.execute("SHOW statement_timeout")
            statement = cursor.fetchone()[0]
            cursor.execute("SHOW lock_timeout")
            return statement, cursor.fetchone()[0]

    async def in_a_consumer():
        worker = Worker("players")
        try:
            return await worker.call(show)
        finally:
            await worker.close()

    assert asyncio.run(in_a_consumer()) == ("7s", "3s")
    connections[alias].close()
    assert show() == ("0", "0")


def test_a_batch_of_two_subjects_reaches_the_handlers_in_the_stream_order():
    """``[deleted(A), registered(B), deleted(B)]``: grouped by subject, B's registration ran
    after its deletion and recreated B."""
    from onboarding.contracts import UserRegistered
    from onboarding.eventbus.consumer.inbox import Incoming, process_events
    from onboarding.eventbus.registry import ConsumerSpec, Subscription

    class UserDeleted:  # a second event type, as the contract may grow one
        subject = "user.deleted"

        def __init__(self, user_id):
            self.user_id = user_id

    calls = []
    spec = ConsumerSpec("players", (
        Subscription(UserRegistered, lambda events: calls.append(
            ("registered", [e.username for e in events]))),
        Subscription(UserDeleted, lambda events: calls.append(
            ("deleted", [str(e.user_id) for e in events]))),
    ))
    a, b = sample_event(username="a"), sample_event(username="b")
    c = sample_event(username="c")
    batch = [
        Incoming(UserDeleted(a.user_id), "del-a", UserDeleted.subject, 1),
        Incoming(b, "reg-b", UserRegistered.subject, 2),
        Incoming(c, "reg-c", UserRegistered.subject, 3),
        Incoming(UserDeleted(b.user_id), "del-b", UserDeleted.subject, 4),
        Incoming(b, "reg-b", UserRegistered.subject, 2),  # a repeat: skipped, not reordered
    ]
    assert process_events(spec, batch) == [True, True, True, True, False]
    assert calls == [
        ("deleted", [str(a.user_id)]),
        ("registered", ["b", "c"]),  # consecutive events of one subject: still one call
        ("deleted", [str(b.user_id)]),
    ]


def test_a_stop_is_not_held_up_by_a_handler_that_still_hangs(start_consumers, settings,
                                                             monkeypatch, caplog):
    """Nothing on the event loop waits for a hung thread: once its transaction is given up on,
    the loop fetches nothing more until the thread is free, and a stop ends the runner at once
    (the thread is left to the database's timeouts, or to the process's end)."""
    import threading
    import time

    import players.consumers

    settings.CONSUMER_BATCH_TIMEOUT = 1.0
    # No background pruning: on SQLite, a prune round that begins after the hung transaction
    # (its first one, on a loaded machine) waits for the write lock, up to the busy timeout, and
    # a stop waits for the round in hand. That wait is pruning's; this test is the worker's.
    settings.EVENTBUS_PRUNE_INTERVAL = 0
    release = threading.Event()

    def hangs(**kwargs):
        release.wait(60)

    monkeypatch.setattr(players.consumers, "players_create_defaults", hangs)
    caplog.set_level(logging.INFO, logger="onboarding.eventbus")
    publish_all([valid(sample_event(username="stuck"))])
    running = start_consumers(["players"])
    try:
        wait_until(lambda: _log_has(caplog, "HandlerTimeout"), timeout=30,
                   message="the hung transaction given up on")
        time.sleep(1.0)  # the nak'ed message is due again: the loop must not pick it up
        running.stop(timeout=10)
    finally:
        release.set()
    wait_until(lambda: not any(t.name.startswith("consume-players")
                               for t in threading.enumerate()),
               message="the released thread finished")
    assert counts()["players"] == 0


def test_events_of_different_users_commute_and_each_users_order_is_kept():
    """A mixed batch is one handler call per subject where the users' own orders allow it."""
    import datetime as dt

    from onboarding.contracts import UserDeleted, UserRenamed
    from onboarding.eventbus.consumer.inbox import Incoming, handler_runs

    now = dt.datetime.now(dt.UTC)
    a, b, c = (sample_event(username=name) for name in "abc")
    ren = {e.username: UserRenamed(user_id=e.user_id, username=e.username + "2", renamed_at=now)
           for e in (a, b, c)}
    dele = {e.username: UserDeleted(user_id=e.user_id, deleted_at=now) for e in (a, b, c)}
    stream = [a, ren["a"], b, dele["a"], c, ren["b"], ren["b"], dele["c"], ren["c"]]
    items = [Incoming(event, f"e{n}", event.subject, n) for n, event in enumerate(stream)]
    calls = [(subject, [item.stream_seq for item in run]) for subject, run in handler_runs(items)]
    assert calls == [
        ("user.registered", [0, 2, 4]),  # a, b, c registered
        ("user.renamed", [1, 5, 6]),  # a renamed; b renamed twice, in order
        ("user.deleted", [7, 3]),  # c deleted; a deleted (after its rename)
        ("user.renamed", [8]),  # c's rename after its deletion stays after it
    ]
    # Each user's events, read off the calls, are in stream order.
    order = [seq for _, seqs in calls for seq in seqs]
    for user in (a, b, c):
        mine = [n for n, event in enumerate(stream) if event.user_id == user.user_id]
        assert [seq for seq in order if seq in mine] == mine


def test_a_daemon_thread_runs_in_order_hands_back_errors_and_never_holds_the_exit():
    """The consumer's database threads (runtime/threads.py): a call still blocked when the process
    ends (an abandoned transaction on a row lock) must not keep it alive, as a
    ThreadPoolExecutor's thread would (the interpreter joins those at exit)."""
    import subprocess
    import sys
    import threading

    from onboarding.eventbus.runtime.threads import DaemonThread

    thread = DaemonThread("test-daemon")
    ran = []
    first, second = thread.submit(ran.append, 1), thread.submit(ran.append, 2)
    failing = thread.submit(lambda: 1 / 0)
    assert first.result(5) is None and second.result(5) is None and ran == [1, 2]
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    started, release = threading.Event(), threading.Event()

    def blocks():
        started.set()
        return release.wait()

    blocked = thread.submit(blocks)
    queued = thread.submit(ran.append, 3)
    assert started.wait(5)
    thread.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled() and not blocked.done()
    with pytest.raises(RuntimeError, match="after shutdown"):
        thread.submit(ran.append, 4)
    release.set()
    assert blocked.result(5) is True and ran == [1, 2]

    program = ("import threading; from onboarding.eventbus.runtime.threads import DaemonThread; "
               "DaemonThread('blocked').submit(threading.Event().wait); print('exiting')")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "exiting", done.stderr

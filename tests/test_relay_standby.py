"""One active relay per outbox database: a second one stands by and takes over when it dies.

Real ``outbox_relay`` processes on the test databases and the suite's nats-server. The relays run
with no grace period, so the active one publishes a committed event at once (through its scan,
or through the NOTIFY it listens for on PostgreSQL), and a standby that published anything
would show in its output and its work.
"""

from __future__ import annotations

import pytest
from django.db import connections

from accounts.services import user_register
from conftest import run_async, wait_until
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.outbox import store as outbox
from onboarding.eventbus.outbox import write
from onboarding.eventbus.outbox.leadership import relay_lock

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

RELAY_ENV = {"OUTBOX_RELAY_GRACE": "0"}
ACTIVE = "relay: active (took the outbox lock)"
STANDBY = "relay: standby, another relay holds the outbox lock"


@pytest.fixture
def relays_publish_alone(settings):
    """Only the relays publish: on SQLite the test process's on-commit publisher would too."""
    if write.fast_path() == "publish":
        settings.OUTBOX_PUBLISH_ON_COMMIT = False


async def stream_messages(js):
    from django.conf import settings

    return (await js.stream_info(settings.NATS_STREAM)).state.messages


def unpublished() -> int:
    return OutboxEvent.objects.filter(published_at__isnull=True).count()


def register_and_wait_published(name: str, *, stored: int) -> None:
    user_register(username=name, email=f"{name}@example.com", password="x")
    wait_until(lambda: unpublished() == 0, timeout=15, message=f"{name}'s event marked published")
    assert run_async(stream_messages) == stored


def break_the_lock() -> None:
    """What a lost holder looks like: PostgreSQL ends its session; on SQLite the file goes."""
    connection = connections["default"]
    if connection.vendor == "sqlite":
        relay_lock().path.unlink()
        return
    with outbox.outbox_connection() as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()[0]
    assert ended == 1


def active_and_standby(manage) -> tuple:
    """Two relays on the test's outbox database: the first active, the second standing by."""
    active = manage("outbox_relay", **RELAY_ENV)
    active.wait_for_output(ACTIVE)
    standby = manage("outbox_relay", **RELAY_ENV)
    standby.wait_for_output(STANDBY)
    return active, standby


def test_a_second_relay_stands_by_and_takes_over_when_the_first_is_killed(
    manage, relays_publish_alone
):
    first, second = active_and_standby(manage)

    register_and_wait_published("before", stored=1)
    if write.fast_path() != "notify":  # with notify, it may have published through LISTEN
        assert "relay published" in first.output()
    standing_by = second.output()
    # A standby does nothing but retry the lock: no LISTEN, no scan, no publish.
    for sign_of_work in (ACTIVE, "listening for commits", "relay published"):
        assert sign_of_work not in standing_by, standing_by

    first.kill()  # SIGKILL: no cleanup; the kernel or PostgreSQL releases the lock
    second.wait_for_output(ACTIVE, timeout=10)
    register_and_wait_published("after", stored=2)
    assert second.output().count(STANDBY) == 1  # said once, not at every retry
    code, output = second.stop()
    assert code == 0, output


def test_a_relay_that_lost_its_lock_steps_down(manage, relays_publish_alone):
    first, second = active_and_standby(manage)

    break_the_lock()
    first.wait_for_output("relay: lost the outbox lock", timeout=10)
    # The first one to retry takes the lock afresh: never both.
    wait_until(lambda: first.output().count(ACTIVE) == 2 or ACTIVE in second.output(),
               timeout=10, message="a relay active again")
    assert not (first.output().count(ACTIVE) == 2 and ACTIVE in second.output())
    register_and_wait_published("after", stored=1)
    for process in (first, second):
        code, output = process.stop()
        assert code == 0, output


def test_a_standby_stops_on_sigterm_and_once_does_not_wait_for_the_active_relay(
    manage, relays_publish_alone
):
    active, standby = active_and_standby(manage)
    code, output = standby.stop(timeout=10)
    assert code == 0, output

    once = manage("outbox_relay", "--once", "--grace", "0")
    assert once.wait(30) == 0, once.output()
    assert "another relay is active and publishes the backlog: nothing done" in once.output()

    code, output = active.stop()
    assert code == 0, output
    once = manage("outbox_relay", "--once", "--grace", "0")  # the lock is free again
    assert once.wait(30) == 0, once.output()
    assert "published 0 event(s)" in once.output()


def test_the_relay_lock_admits_one_holder_and_frees_on_release_or_loss():
    first, second = relay_lock(), relay_lock()  # two holders, as two relays on one database
    try:
        assert first.acquire()
        assert not second.acquire()
        assert first.held() and not second.held()
        first.release()
        assert second.acquire()

        break_the_lock()
        assert not second.held()  # its holder notices, and steps down
        assert first.acquire()
    finally:
        first.release()
        second.release()


def test_the_lock_session_asks_postgresql_to_notice_a_vanished_host():
    if connections["default"].vendor != "postgresql":
        pytest.skip("PostgreSQL's session lock")
    lock = relay_lock()
    try:
        assert lock.acquire()
        assert lock._connection.execute("SHOW tcp_keepalives_idle").fetchone()[0] == "5"
    finally:
        lock.release()

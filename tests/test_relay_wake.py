"""SQLite's fast path: a datagram on a local socket wakes the relay, which publishes at once.

The relay runs with a long grace period here, so that an event published within seconds can only
have come through the wake-up, not through the scan's safety net.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from django.db import connections

from accounts.services import user_register
from conftest import RunningRelay, relay_flush, run_async, start_fast_path_relay, wait_until
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.outbox import wake, write
from onboarding.eventbus.outbox.leadership import relay_lock

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture
def sqlite_wake():
    if write.fast_path() != "wake":
        pytest.skip("the wake-up fast path is SQLite's")


@pytest.fixture
def no_publisher(monkeypatch):
    """Any use of the web process's own NATS publisher fails the test."""
    def refuse():
        raise AssertionError("the web process's publisher was used")

    monkeypatch.setattr(write, "get_publisher", refuse)


@pytest.fixture
def relay(settings, sqlite_wake, jetstream, no_publisher):
    running = start_fast_path_relay(settings)
    yield running
    running.stop()


def unpublished() -> int:
    return OutboxEvent.objects.filter(published_at__isnull=True).count()


async def _stream_messages(js):
    from django.conf import settings

    return (await js.stream_info(settings.NATS_STREAM)).state.messages


def stream_messages() -> int:
    return run_async(_stream_messages)


def register(name: str) -> None:
    user_register(username=name, email=f"{name}@example.com", password="x")


def register_silently(settings, name: str) -> None:
    """A registration and its outbox row, without any wake-up (as if the datagram was lost)."""
    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    try:
        register(name)
    finally:
        settings.OUTBOX_PUBLISH_ON_COMMIT = True


def test_auto_is_wake_on_sqlite(settings, sqlite_wake):
    settings.OUTBOX_FAST_PATH = "auto"
    assert write.fast_path() == "wake"


def test_the_relay_publishes_what_the_wake_up_announces(relay, monkeypatch):
    # With the scan blinded, the wake-up is the only way the event can leave; the web process's
    # publisher refuses (no_publisher): no NATS in the web process.
    monkeypatch.setattr("onboarding.eventbus.outbox.relay.outbox_unpublished", lambda **kw: [])
    for i in range(5):
        register(f"woken{i}")
    wait_until(lambda: stream_messages() == 5, timeout=10, message="published")
    wait_until(lambda: unpublished() == 0, timeout=10, message="marked published")


def test_a_lost_wake_up_goes_out_with_the_next_one(relay, settings, monkeypatch):
    monkeypatch.setattr("onboarding.eventbus.outbox.relay.outbox_unpublished", lambda **kw: [])
    register_silently(settings, "lost")
    register("found")
    wait_until(lambda: stream_messages() == 2, timeout=10, message="both published")
    wait_until(lambda: unpublished() == 0, timeout=10, message="marked published")


def test_an_unreadable_wake_up_is_ignored(relay, monkeypatch):
    monkeypatch.setattr("onboarding.eventbus.outbox.relay.outbox_unpublished", lambda **kw: [])
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sender.sendto(b"not a row id", os.fsencode(wake.wake_socket_path()))
    finally:
        sender.close()
    register("after-junk")
    wait_until(lambda: stream_messages() == 1, timeout=10, message="published")
    assert relay.thread.is_alive()


def test_with_no_relay_the_registration_commits_and_the_scan_publishes_it_later(
    sqlite_wake, jetstream, no_publisher
):
    path = wake.wake_socket_path()
    assert not path.exists()
    register("nobody-listens")  # no socket file: ENOENT, dropped
    # A socket file left behind by a relay that died: ECONNREFUSED, dropped.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(os.fsencode(path))
    dead.close()
    try:
        register("relay-died")
        assert wake.wake_relay(1) is False
    finally:
        path.unlink()
    assert unpublished() == 2
    assert relay_flush(grace=0) == 2  # the relay's scan, once it runs
    assert stream_messages() == 2


def test_only_the_active_relay_binds_the_socket(
    settings, sqlite_wake, jetstream, no_publisher, caplog
):
    settings.OUTBOX_RELAY_STANDBY_POLL = 0.1
    settings.OUTBOX_RELAY_GRACE = 60.0
    path = wake.wake_socket_path()
    active = relay_lock()
    assert active.acquire()  # another relay holds the outbox lock
    standby = RunningRelay().start()
    try:
        wait_until(lambda: "relay: standby" in caplog.text, timeout=10, message="standing by")
        register("while-standing-by")
        assert not path.exists() and wake.wake_relay(1) is False  # no wake-up reaches it
        active.release()
        assert standby.relay.listening.wait(10), "the standby never took over"
        assert path.exists()
        # Taking over, it publishes what waits (the first scan), then listens.
        wait_until(lambda: stream_messages() == 1, timeout=10, message="backlog published")
        register("after-takeover")
        wait_until(lambda: stream_messages() == 2, timeout=10, message="woken publish")
    finally:
        active.release()
        standby.stop()
    assert not path.exists()  # removed when it stopped


def test_a_wake_up_is_sent_only_when_the_registration_commits(settings, sqlite_wake, tmp_path):
    from django.db import transaction

    settings.OUTBOX_WAKE_SOCKET = str(tmp_path / "relay.sock")
    listener = wake.WakeListener(wake.wake_socket_path())
    try:
        with pytest.raises(RuntimeError), transaction.atomic():
            register("ghost")
            raise RuntimeError("rolled back")
        assert listener.receive(timeout=0.3) == []
        register("real")
        row = OutboxEvent.objects.get()
        assert wake.row_ids_of(listener.receive(timeout=5)) == [row.pk]
    finally:
        listener.close()


def test_in_a_request_the_wake_up_waits_until_the_response_is_sent(
    settings, sqlite_wake, tmp_path
):
    from django.core.signals import request_finished, request_started

    settings.OUTBOX_WAKE_SOCKET = str(tmp_path / "relay.sock")
    listener = wake.WakeListener(wake.wake_socket_path())
    try:
        request_started.send(sender=None)
        register("in-a-request")
        assert listener.receive(timeout=0.3) == []  # committed, the response not yet sent
        request_finished.send(sender=None)
        row = OutboxEvent.objects.get()
        assert wake.row_ids_of(listener.receive(timeout=5)) == [row.pk]
        register("outside-a-request")  # a command, a consumer: at once
        assert wake.row_ids_of(listener.receive(timeout=5)) == [row.pk + 1]
    finally:
        listener.close()


# --- where the socket is ------------------------------------------------------------------------


def test_the_socket_is_beside_the_outbox_database_by_default(settings):
    settings.OUTBOX_WAKE_SOCKET = ""
    database = connections["default"].settings_dict["NAME"]
    path = wake.wake_socket_path()
    if len(os.fsencode(os.path.abspath(f"{database}.relay.sock"))) <= wake.SOCKET_PATH_MAX:
        assert path == Path(os.path.abspath(f"{database}.relay.sock"))


def test_a_path_too_long_for_a_socket_moves_to_the_temporary_folder(settings, monkeypatch):
    settings.OUTBOX_WAKE_SOCKET = ""
    long_name = "/tmp/" + "d" * 120 + "/outbox.sqlite3"
    monkeypatch.setitem(connections["default"].settings_dict, "NAME", long_name)
    path = wake.wake_socket_path()
    assert len(os.fsencode(path)) <= wake.SOCKET_PATH_MAX
    assert path == wake.wake_socket_path()  # every process derives the same one
    monkeypatch.setitem(connections["default"].settings_dict, "NAME", long_name + "2")
    assert wake.wake_socket_path() != path  # and another database another one


def test_outbox_wake_socket_sets_the_path(settings, tmp_path):
    settings.OUTBOX_WAKE_SOCKET = str(tmp_path / "relay.sock")
    assert wake.wake_socket_path() == tmp_path / "relay.sock"
    listener = wake.WakeListener(wake.wake_socket_path())
    try:
        assert wake.wake_relay(42)
        assert wake.row_ids_of(listener.receive(timeout=5)) == [42]
    finally:
        listener.close()
    assert not (tmp_path / "relay.sock").exists()

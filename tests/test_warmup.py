"""Warm before ready (onboarding/eventbus/runtime/warmup.py).

What an operator reads as ready — a consumer's pull request waiting on its durable, a relay
LISTENing, a web worker serving — now means that the process's first event does not pay for
its first connection, its first imports or its NATS connection. Warming never stops a process
that cannot warm (a database down at start is the outage path's business).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest
from django.conf import settings
from django.db import OperationalError, connections

from conftest import RunningConsumers, RunningRelay, run_async, wait_until
from onboarding.eventbus.outbox import write
from onboarding.eventbus.outbox.publisher import BackgroundPublisher
from onboarding.eventbus.runtime import warmup

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def pulling(durable: str) -> bool:
    async def read(js):
        return (await js.consumer_info(settings.NATS_STREAM, durable)).num_waiting or 0

    return run_async(read) > 0


def test_a_consumer_opens_its_database_connection_before_its_first_fetch(jetstream, monkeypatch):
    warmed = []
    touch_tables = warmup.touch_tables

    def spy(alias, models):
        assert not pulling("players"), "the consumer fetched before warming up"
        touch_tables(alias, models)
        warmed.append((threading.current_thread().name, alias,
                       connections[alias].connection is not None,
                       {model._meta.db_table for model in models}))

    monkeypatch.setattr(warmup, "touch_tables", spy)
    running = RunningConsumers(["players"]).start()
    try:
        wait_until(lambda: pulling("players"), timeout=10, message="players pulling")
        assert len(warmed) == 1, warmed
        thread, alias, connected, tables = warmed[0]
        # On the thread that will run its transactions, whose connection is now open.
        assert thread.startswith("consume-players")
        assert alias == settings.CONTEXT_DATABASES["players"] and connected
        assert {"eventbus_processedevent", "players_player"} <= tables
    finally:
        running.stop()


def test_a_consumer_that_cannot_warm_up_starts_all_the_same(jetstream, monkeypatch, caplog):
    def down(alias, models):
        raise OperationalError("connection refused")

    monkeypatch.setattr(warmup, "touch_tables", down)
    running = RunningConsumers(["players"]).start()
    try:
        wait_until(lambda: pulling("players"), timeout=10, message="players pulling")
    finally:
        running.stop()
    assert "could not warm up its database connection" in caplog.text


def test_the_relay_is_connected_to_nats_before_it_listens(jetstream, monkeypatch):
    if write.fast_path() != "notify":
        pytest.skip("the relay listens on PostgreSQL only")
    submitted_before_connected = []
    running = RunningRelay()
    original = running.relay._start_fast_path

    async def start_listening():
        await original()
        # The listener is up: its first notification must find the publisher connected.
        submitted_before_connected.append(running.relay._fast_path.publisher._nc is None)

    monkeypatch.setattr(running.relay, "_start_fast_path", start_listening)
    running.start()
    try:
        assert running.relay.listening.wait(10), "the relay never listened"
        wait_until(lambda: submitted_before_connected, timeout=10)
        assert submitted_before_connected == [False]
    finally:
        running.stop()


def test_starting_a_publisher_that_cannot_connect_returns_and_raises_nothing(monkeypatch):
    connecting, given_up, ended = threading.Event(), threading.Event(), threading.Event()

    async def unanswered(name, **kwargs):  # NATS that does not answer (connect keeps trying)
        connecting.set()
        while not given_up.is_set():
            await asyncio.sleep(0.01)
        ended.set()
        raise asyncio.CancelledError  # ends the publisher's connecting task, for a clean close

    monkeypatch.setattr("onboarding.eventbus.outbox.publisher.connect", unanswered)
    publisher = BackgroundPublisher()
    try:
        assert publisher.start(0.3) is False
        assert connecting.is_set()
    finally:
        given_up.set()
        assert ended.wait(5), "the connecting task never saw it was given up"
        publisher.close(timeout=2)


def test_loading_the_web_application_imports_its_views_and_opens_no_connection(tmp_path):
    # A fresh interpreter, as gunicorn's master loading the app before it forks (preload_app):
    # the views are imported there, once, and nothing a fork would share is opened.
    script = (
        "import sys\n"
        "from onboarding.wsgi import application\n"
        "from django.db import connections\n"
        "assert 'onboarding.urls' in sys.modules and 'accounts.apis' in sys.modules\n"
        "assert all(connections[a].connection is None for a in connections), 'connected'\n"
        "import threading; assert threading.active_count() == 1, threading.enumerate()\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "onboarding.settings_test",
           "NATS_URL": settings.NATS_URL}
    result = subprocess.run([sys.executable, "-c", script], cwd=settings.BASE_DIR, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]

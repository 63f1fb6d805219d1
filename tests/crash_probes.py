"""Tests whose runners crash, for ``tests/test_suite_fixtures.py`` to run in a pytest of their
own and read the outcomes. The suite never collects this file (its name does not match
``python_files``): a test run on its own path is collected whatever its name."""

from __future__ import annotations

import pytest
from django.conf import settings

from conftest import run_async, wait_until

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


async def crash(*args, **kwargs):
    """In place of connecting to NATS: the crash leaves no connection behind to clean up."""
    raise RuntimeError("injected crash")


def pulling(durable: str) -> bool:
    async def waiting(js):
        return (await js.consumer_info(settings.NATS_STREAM, durable)).num_waiting

    return run_async(waiting) > 0


def up(start_consumers) -> None:
    """The relay and the consumers that did not crash up and working: stopped while they still
    connect, they would leave their connection's tasks behind, whose warnings blur the probe."""
    for running in start_consumers.started:
        if hasattr(running, "relay"):
            if running.thread.is_alive():
                assert running.relay.scanned.wait(20), "the relay never scanned"
        elif running.thread.is_alive():
            wait_until(lambda: pulling("players"), timeout=20, message="the consumer pulling")


def test_a_consumer_runner_that_crashes_unseen(start_consumers, monkeypatch):
    monkeypatch.setattr("onboarding.eventbus.consumer.runner.connect", crash)
    running = start_consumers(["players"])
    wait_until(lambda: not running.thread.is_alive(), timeout=20, message="the runner's end")
    up(start_consumers)


def test_a_relay_that_crashes_unseen(start_consumers, monkeypatch):
    monkeypatch.setattr("onboarding.eventbus.outbox.relay.connect", crash)
    start_consumers(["players"])
    relay = start_consumers.started[0]
    wait_until(lambda: not relay.thread.is_alive(), timeout=20, message="the relay's end")
    up(start_consumers)


def test_a_crash_the_test_stops_and_sees(start_consumers, monkeypatch):
    monkeypatch.setattr("onboarding.eventbus.consumer.runner.connect", crash)
    running = start_consumers(["players"])
    wait_until(lambda: not running.thread.is_alive(), timeout=20, message="the runner's end")
    up(start_consumers)
    with pytest.raises(RuntimeError, match="injected crash"):
        running.stop()


def test_runners_that_stop_cleanly(start_consumers):
    start_consumers(["players"])
    up(start_consumers)

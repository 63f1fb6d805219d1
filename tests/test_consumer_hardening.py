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

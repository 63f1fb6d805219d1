"""Faults nobody announces: a NATS connection that dies silently (no FIN, no RST: a NAT or a
firewall that forgot it), staged with a proxy that stops forwarding without closing
(``onboarding.dev.silentproxy``). The process must notice by its pings, make a new connection
and go on, with nothing lost. (This kernel has no ``netem``; network namespaces are for the
rehearsal.)
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from django.conf import settings

from accounts.services import user_register
from conftest import relay_flush, wait_until
from onboarding.dev.silentproxy import SilentProxy
from players.models import Player

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

# Pings each second, stale after two unanswered: noticed within 3 s (the defaults: 24 s).
FAST_PINGS = {"NATS_PING_INTERVAL": "1", "NATS_MAX_OUTSTANDING_PINGS": "2"}


@pytest.fixture
def proxy(jetstream):
    parts = urlsplit(settings.NATS_URL)
    silent = SilentProxy((parts.hostname, parts.port)).start()
    yield silent
    silent.stop()


def has_player(user) -> bool:
    return Player.objects.using(settings.CONTEXT_DATABASES["players"]).filter(
        user_id=user.id).exists()


def test_a_consumer_whose_connection_dies_silently_notices_and_goes_on(proxy, manage):
    consumer = manage("consume", "players", NATS_URL=proxy.url, **FAST_PINGS)
    before = user_register(username="before", email="before@example.com", password="x")
    relay_flush()  # published here, straight to the server
    wait_until(lambda: has_player(before), timeout=30, message="the consumer works")
    assert proxy.silence() >= 1
    after = user_register(username="after", email="after@example.com", password="x")
    relay_flush()
    # Its fetches time out quietly on the dead connection until its pings give it up; then a
    # new connection (the proxy lets new ones through) and the event: delivered into the dead
    # connection if a pull was open there, so redelivered after CONSUMER_ACK_WAIT.
    wait_until(lambda: has_player(after), timeout=20,
               message="the user registered after the connection died silently")
    assert consumer.poll() is None, consumer.output()
    assert proxy.accepted >= 2  # it connected again
    said = consumer.output()
    assert "nats consume:players: disconnected" in said and "reconnected" in said, said


def test_the_defaults_notice_within_30_seconds():
    """The settings the processes connect with (options.py): a silent death is noticed within
    (NATS_MAX_OUTSTANDING_PINGS + 1) * NATS_PING_INTERVAL, under 30 s; nats-py's own defaults
    (120 s, 2) took 4-6 minutes."""
    from onboarding.eventbus.nats.options import connect_options

    options = connect_options()
    assert (options["max_outstanding_pings"] + 1) * options["ping_interval"] <= 30


def test_a_relay_whose_connection_dies_silently_notices_and_publishes(proxy, manage):
    from onboarding.eventbus.models import OutboxEvent

    def published(user) -> bool:
        return OutboxEvent.objects.filter(key=str(user.id), published_at__isnull=False).exists()

    relay = manage("outbox_relay", NATS_URL=proxy.url, **FAST_PINGS)
    before = user_register(username="before", email="before@example.com", password="x")
    wait_until(lambda: published(before), timeout=30, message="the relay works")
    assert proxy.silence() >= 1
    after = user_register(username="after", email="after@example.com", password="x")
    # Its publishes go unacknowledged on the dead connection until its pings give it up;
    # then a new connection, and the row published (JetStream keeps one copy by its id).
    wait_until(lambda: published(after), timeout=20,
               message="the event registered after the connection died silently")
    assert relay.poll() is None, relay.output()
    said = relay.output()
    assert "nats outbox-relay: disconnected" in said and "reconnected" in said, said


def test_a_consumer_on_a_silent_connection_stops_saying_alive_until_it_reconnects(
    proxy, manage, tmp_path
):
    """The heartbeat follows the loop's ticks, and the loop ticks only when the server was heard
    from (or the connection is known to be down): fetches that time out on a dead connection
    are not life. Pings slow enough here to see the frozen heartbeat before they notice."""
    import time

    heartbeat = tmp_path / "consumer.alive"
    consumer = manage("consume", "players", NATS_URL=proxy.url, HEARTBEAT_FILE=str(heartbeat),
                      NATS_PING_INTERVAL="5", NATS_MAX_OUTSTANDING_PINGS="1")
    consumer.wait_for_output("consumers started")

    def age() -> float:
        return time.time() - heartbeat.stat().st_mtime

    wait_until(lambda: age() < 2, timeout=20, message="a fresh heartbeat")
    proxy.silence()
    wait_until(lambda: age() > 3, timeout=10, message="the heartbeat frozen")
    assert consumer.poll() is None
    user = user_register(username="later", email="later@example.com", password="x")
    relay_flush()
    # The pings give the connection up, a new one is made: alive again, and working.
    wait_until(lambda: age() < 2, timeout=30, message="the heartbeat moving again")
    wait_until(lambda: has_player(user), timeout=30, message="the event, over the new connection")


def test_a_relay_that_cannot_publish_steps_down_for_a_standby_that_can(proxy, manage):
    """The active relay's connection dies silently and its pings are slow to notice (nats-py's
    defaults here): after RELAY_STALL_SECONDS of failed batches it gives up the outbox lock, and
    the standby, whose connection works, takes over and publishes."""
    from onboarding.eventbus.models import OutboxEvent

    def published(user) -> bool:
        return OutboxEvent.objects.filter(key=str(user.id), published_at__isnull=False).exists()

    stuck = manage("outbox_relay", NATS_URL=proxy.url, NATS_PING_INTERVAL="120",
                   RELAY_STALL_SECONDS="3")
    stuck.wait_for_output("relay: active")
    standby = manage("outbox_relay", RELAY_STALL_SECONDS="3")
    standby.wait_for_output("relay: standby")
    proxy.silence()
    user = user_register(username="waits", email="waits@example.com", password="x")
    wait_until(lambda: published(user), timeout=30,
               message="the event, published by the standby after the active relay stepped down")
    assert "giving up the outbox lock" in stuck.output(), stuck.output()
    assert "relay: active (took the outbox lock)" in standby.output()
    assert stuck.poll() is None and standby.poll() is None

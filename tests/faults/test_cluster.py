"""The production NATS shape: a 3-node JetStream cluster, secured, losing its stream leader.

Three ``nats-server``s from ``deploy/nats/cluster-node.conf`` as it is (authorization and TLS
included) on 127.0.0.1, the stream provisioned with three replicas, the relay and the four
consumers each on its own NATS user with all three servers in ``NATS_URL``. A burst of
registrations runs while the stream leader is SIGKILLed, and the node comes back later: every
registration must get all four defaults exactly once, and the test prints how long publishing
and consuming stalled around the kill.
"""

from __future__ import annotations

import time

import pytest

from conftest import wait_until
from onboarding.dev.natsserver import SecuredNats
from onboarding.eventbus.models import OutboxEvent
from onboarding.eventbus.registry import get_consumers
from tests.faults.test_faults import assert_exactly, report
from tests.flow import Burst, complete_count, counts

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, databases="__all__")]


def longest_gap(times: list) -> float:
    times = sorted(t for t in times if t is not None)
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    return max(gaps, default=0.0)


def _state(cluster: SecuredNats, settings, processes=()):
    """What a timed-out wait saw: the defaults counted, the outbox not yet published, the stream
    and its durables as the cluster reports them, and the last lines each process wrote."""
    def describe() -> str:
        lines = [f"counts={counts()}",
                 "outbox unpublished="
                 f"{OutboxEvent.objects.filter(published_at__isnull=True).count()}",
                 cluster.describe(settings.NATS_STREAM)]
        for process in processes:
            tail = process.output().splitlines()[-15:]
            lines.append(f"--- {' '.join(process.args[2:])} (exit {process.poll()}):")
            lines.extend(tail)
        return "\n".join(lines)
    return describe


def _stack(cluster: SecuredNats, manage, settings):
    """The stream provisioned with three replicas, the relay and every consumer on its own NATS
    user; this test process registers, and only the relay publishes (the in-process publisher
    is the suite's, not a role of this cluster)."""
    def provisioned():  # the cluster elects its meta leader within a second or so
        process = manage("setup_jetstream", "--wait", "10", **cluster.env_for("provision"),
                         NATS_STREAM_REPLICAS="3")
        return process.wait(30) == 0

    wait_until(provisioned, timeout=30, interval=1, message="stream provisioned (R3)")
    relay = manage("outbox_relay", **cluster.env_for("relay"), OUTBOX_RELAY_GRACE="0.5")
    consumers = [manage("consume", name, **cluster.env_for(name)) for name in get_consumers()]
    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    return relay, consumers


def test_killing_the_stream_leader_mid_burst_loses_and_duplicates_nothing(
    manage, tmp_path, settings
):
    from buildings.models import Building
    from characters.models import Character
    from players.models import Player
    from progression.models import MetaProgression

    cluster = SecuredNats(tmp_path / "cluster", nodes=3).start()
    try:
        relay, consumers = _stack(cluster, manage, settings)
        n = 300
        burst = Burst(n, 0.04, "cluster").start()
        wait_until(lambda: burst.done >= n // 3, timeout=60, message="a third of the burst")
        leader = cluster.stream_leader(settings.NATS_STREAM)
        killed = cluster.server_named(leader)
        killed.kill()
        killed_at = time.monotonic()
        wait_until(lambda: burst.done >= 2 * n // 3, timeout=60, message="two thirds")
        cluster.start_server(killed)  # the node comes back with its store as it was
        restarted_after = time.monotonic() - killed_at
        burst.join()
        wait_until(lambda: counts() == complete_count(n), timeout=120, message="all defaults",
                   detail=_state(cluster, settings, (relay, *consumers)))
        wait_until(lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists(),
                   timeout=30, message="every outbox row marked published")
        for process in (relay, *consumers):
            assert process.poll() is None, process.output()
            code, output = process.stop()
            assert code == 0, output
        assert_exactly(n)
        new_leader = cluster.stream_leader(settings.NATS_STREAM)
        publish_stall = longest_gap(list(OutboxEvent.objects.values_list("published_at",
                                                                           flat=True)))
        consume_stall = max(
            longest_gap(list(model.objects.values_list("created_at", flat=True)))
            for model in (Player, Character, MetaProgression, Building)
        )
        report(
            "cluster leader kill", engine=settings.DATABASES["default"]["ENGINE"].split(".")[-1],
            registrations=n, killed=leader, new_leader=new_leader,
            restarted_after_s=f"{restarted_after:.1f}",
            publish_stall_s=f"{publish_stall:.1f}", consume_stall_s=f"{consume_stall:.1f}",
            lost=0, duplicated=0, dead_letters=0,
        )
    finally:
        cluster.stop()


def test_a_node_whose_store_was_wiped_catches_up_from_the_others(manage, tmp_path, settings):
    """Issue 19: a follower loses its disk mid-burst (SIGKILL, its JetStream store deleted) and
    comes back empty. It must catch up from the other two: its leader reports it current with
    no lag, and every registration still gets its defaults exactly once."""
    cluster = SecuredNats(tmp_path / "cluster", nodes=3).start()
    try:
        relay, consumers = _stack(cluster, manage, settings)
        n = 150
        burst = Burst(n, 0.04, "wiped").start()
        wait_until(lambda: burst.done >= n // 3, timeout=60, message="a third of the burst")
        leader = cluster.stream_leader(settings.NATS_STREAM)
        wiped = next(server for server in cluster.servers if server.name != leader)
        cluster.wipe(wiped)
        wait_until(lambda: burst.done >= 2 * n // 3, timeout=60, message="two thirds")
        cluster.start_server(wiped)  # empty: everything it holds again came from the others
        burst.join()
        state = _state(cluster, settings, (relay, *consumers))
        wait_until(lambda: counts() == complete_count(n), timeout=120, message="all defaults",
                   detail=state)
        wait_until(lambda: cluster.stream_followers(settings.NATS_STREAM).get(wiped.name)
                   == (True, 0), timeout=60, message="the wiped node current, no lag",
                   detail=state)
        for process in (relay, *consumers):
            assert process.poll() is None, process.output()
            code, output = process.stop()
            assert code == 0, output
        assert_exactly(n)
        report("cluster node wiped", registrations=n, wiped=wiped.name, leader=leader,
               followers=cluster.stream_followers(settings.NATS_STREAM), lost=0, duplicated=0)
    finally:
        cluster.stop()

"""The production NATS configs fsync each write before they acknowledge it (issue 19).

Jepsen's analysis of NATS 2.12.1 (https://jepsen.io/analyses/nats-2.12.1, December 2025): with
the default ``sync_interval`` (2 minutes) JetStream acknowledges a publish before it reaches the
disk, and a coordinated power loss, or an OS crash with a partition, lost acknowledged messages
even at R3. ``deploy/nats/single.conf`` and ``cluster-node.conf`` set ``sync_interval: always``;
these tests start them as they are and ask the running server (its ``/varz``) what it applies, so
a misspelt or misplaced option fails here. docs/deploy.md has the trade-off.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from onboarding.dev.natsserver import NatsServer, SecuredNats, free_port


def applied_sync_always(server: NatsServer, monitor_port: int) -> bool:
    """Whether the running ``server`` fsyncs every write, as its monitoring endpoint says."""
    url = f"http://127.0.0.1:{monitor_port}/varz"
    with urllib.request.urlopen(url, timeout=5) as response:
        config = json.load(response)["jetstream"]["config"]
    # Without the option the field is absent; the interval stays at its 2 minutes either way.
    return bool(config.get("sync_always"))


def with_monitoring(server: NatsServer) -> int:
    port = free_port()
    server.args = ("-m", str(port))
    return port


@pytest.mark.parametrize("nodes", [1, 3], ids=["single.conf", "cluster-node.conf"])
def test_the_deploy_configs_fsync_every_write_before_the_ack(tmp_path, nodes):
    nats = SecuredNats(tmp_path / "secured", nodes=nodes)
    ports = {server.name: with_monitoring(server) for server in nats.servers}
    nats.start()
    try:
        for server in nats.servers:
            assert applied_sync_always(server, ports[server.name]), server.name
    finally:
        nats.stop()


@pytest.mark.parametrize("sync_always", [False, True])
def test_the_embedded_server_syncs_as_asked(tmp_path, sync_always):
    """make run and the tests keep NATS's default; ``bench/run.py --nats-sync always`` (and
    ``NatsServer(sync_always=True)``) get what the deploy files have."""
    server = NatsServer(tmp_path / "nats", sync_always=sync_always)
    port = with_monitoring(server)
    server.start()
    try:
        assert applied_sync_always(server, port) is sync_always
    finally:
        server.stop()

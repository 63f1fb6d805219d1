"""A partition staged for real (issue 19): a link taken down between a process and PostgreSQL.

The process runs in a network namespace of the test's own; it reaches PostgreSQL through a veth
pair and a forwarder on the host's end. Taking the host's end of the link down is a black hole:
no FIN, no RST, no ICMP, whatever the client sends vanishes. A proxy that stops forwarding
(``onboarding/dev/silentproxy.py``, enough for NATS' pings) cannot stage this one, because the
proxy's kernel still acknowledges every byte: the TCP-level timeouts never fire through it.

What the connection options of ``onboarding.databases.prepare`` must give (measured figures in
docs/architecture.md, "Faults nobody announces"):

- a query sent into the dead link fails once ``tcp_user_timeout`` passes (keepalives wait while
  sent data is unacknowledged; without it the kernel retransmits for ~15 minutes);
- a query whose answer is awaited when the link dies fails from the keepalives.

Needs root and iproute2 (CI runs as root), and a PostgreSQL database; skips, saying why, without.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from django.conf import settings

from onboarding.databases import prepare
from onboarding.dev.silentproxy import SilentProxy

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, databases="__all__")]

# The client, run inside the namespace: two connections with the project's options. One waits
# for the answer to a long query while the link dies; the other sends a query once it is dead.
CLIENT = r"""
import json, sys, threading, time
import psycopg

host, port, dbname, user, options = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], \
    json.loads(sys.argv[5])
def connect():
    return psycopg.connect(host=host, port=port, dbname=dbname, user=user, autocommit=True,
                           application_name="partition-test", **options)
waiting, sending = connect(), connect()
sending.execute("SELECT 1")
outcome = {}
def wait_for_answer():
    try:
        waiting.execute("SELECT pg_sleep(600)")
        outcome["waiting"] = "answered"
    except Exception as exc:
        outcome["waiting"] = [type(exc).__name__, time.monotonic() - down_at[0]]
down_at = [None]
print("ready", flush=True)
assert sys.stdin.readline().strip() == "down"
down_at[0] = time.monotonic()
thread = threading.Thread(target=wait_for_answer, daemon=True)
started = time.monotonic()
thread.start()
try:
    sending.execute("SELECT 2")
    outcome["sending"] = "answered"
except Exception as exc:
    outcome["sending"] = [type(exc).__name__, time.monotonic() - down_at[0]]
thread.join(300)
print(json.dumps(outcome), flush=True)
"""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Namespace:
    """A network namespace joined to the host by a veth pair: ``host_ip`` on the host's end."""

    def __init__(self) -> None:
        n = os.getpid() % 250
        self.name = f"onb{os.getpid()}"
        self.host_if, self.ns_if = f"{self.name}h"[:15], f"{self.name}n"[:15]
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"

    def create(self) -> Namespace:
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        inside = ("ip", "netns", "exec", self.name)
        _run(*inside, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _run(*inside, "ip", "link", "set", self.ns_if, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        return self

    def cut(self) -> None:
        """Take the host's end down: what the namespace sends vanishes, and nothing says so."""
        _run("ip", "link", "set", self.host_if, "down")

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("a network namespace needs root and iproute2's `ip` (CI has both)")
    space = Namespace()
    try:
        space.create()
    except subprocess.CalledProcessError as exc:
        space.delete()
        pytest.skip(f"this machine refuses network namespaces: {exc.stderr.strip()}")
    yield space
    space.delete()


def _postgresql() -> dict:
    config = settings.DATABASES[settings.CONTEXT_DATABASES["players"]]
    if not config["ENGINE"].endswith("postgresql"):
        pytest.skip("a partition from the database needs a networked one: PostgreSQL")
    return config


def test_a_dead_link_to_postgresql_fails_the_calls_it_holds(namespace):
    config = _postgresql()
    options = {key: value for key, value in prepare(dict(config), test_dir=settings.BASE_DIR)
               ["OPTIONS"].items() if key.startswith(("keepalives", "tcp_", "connect_"))}
    assert options["tcp_user_timeout"] > 0  # what this test is about
    proxy = SilentProxy((config.get("HOST") or "127.0.0.1", int(config.get("PORT") or 5432)),
                        host=namespace.host_ip).start()
    client = subprocess.Popen(
        ["ip", "netns", "exec", namespace.name, sys.executable, "-c", CLIENT, namespace.host_ip,
         str(proxy.port), config["NAME"], config.get("USER") or "postgres", json.dumps(options)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout.readline().strip() == "ready", client.stderr.read()
        namespace.cut()
        client.stdin.write("down\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=240)
    finally:
        client.kill()
        proxy.stop()
        _end_sessions()
    outcome = json.loads(out.strip().splitlines()[-1])
    print("partition outcome:", outcome)  # the measured times, for docs/architecture.md
    # Both calls fail with an error the consumer's failure rules know (a database error), in
    # a bounded time: well under the kernel's ~15 minutes of retransmissions.
    for call in ("sending", "waiting"):
        kind, seconds = outcome[call]
        assert kind == "OperationalError", (call, outcome, err)
        assert seconds < 120, (call, outcome)


def _end_sessions() -> None:
    """The server still runs the long query of the dead connection: end it."""
    from django.db import connections

    alias = settings.CONTEXT_DATABASES["players"]
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE application_name = 'partition-test'")

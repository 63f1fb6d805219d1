"""Metrics, liveness and logs of the real processes: scraped, stat'ed and parsed from outside."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from accounts.services import user_register
from conftest import run_async, wait_until
from onboarding.dev.natsserver import free_port
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

CONSUMERS = ("players", "characters", "progression", "buildings")


def metrics_env(port: int) -> dict:
    return {"METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1",
            "METRICS_REFRESH_INTERVAL": "0.5"}


def scrape(port: int) -> dict:
    """{(sample name, frozenset of labels): value} from the process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: dict, name: str, **labels) -> float:
    """The sum over every label set that includes ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (its sockets in LISTEN state, from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_consumer_and_relay_processes_serve_metrics_and_log_json(manage, settings):
    settings.OUTBOX_PUBLISH_ON_COMMIT = False  # the relay's scan publishes
    consumer_port, relay_port = free_port(), free_port()
    consumers = manage(
        "consume", "--all", faults=True, LOG_FORMAT="json",
        FAULT_FAIL_FIRST="buildings:2",  # each event fails twice in buildings, then works
        **metrics_env(consumer_port),
    )
    relay = manage("outbox_relay", OUTBOX_RELAY_GRACE="0", **metrics_env(relay_port))
    consumers.wait_for_output("consumers started")
    relay.wait_for_output("relay: active")
    users = [
        user_register(username=f"metric{i}", email=f"metric{i}@example.com", password="x")
        for i in range(5)
    ]
    # A message that breaks the contract: every consumer dead-letters it.
    run_async(lambda js: js.publish("user.registered", b"not json",
                                    headers={"Nats-Msg-Id": "poison-metrics"}))
    wait_until(lambda: counts() == complete_count(5), timeout=30, message="defaults")

    def settled():
        samples = scrape(consumer_port)
        return all(
            value(samples, "onboarding_consumer_events_handled_total",
                  consumer=name, outcome="processed") == 5
            and value(samples, "onboarding_consumer_events_dead_lettered_total",
                      consumer=name, reason="permanent") == 1
            and value(samples, "onboarding_consumer_pending_messages", consumer=name) == 0
            and value(samples, "onboarding_consumer_ack_pending_messages", consumer=name) == 0
            for name in CONSUMERS
        ) and samples

    samples = wait_until(settled, timeout=20, message="consumer metrics")
    for name in CONSUMERS:
        assert value(samples, "onboarding_consumer_events_failed_total",
                     consumer=name, kind="permanent") == 1
        assert total(samples, "onboarding_consumer_handler_duration_seconds_count",
                     consumer=name) >= 1
        assert value(samples, "onboarding_consumer_batch_duration_seconds_count",
                     consumer=name) >= 1
        assert value(samples, "onboarding_consumer_batch_size_sum", consumer=name) >= 6
        last_loop = value(samples, "onboarding_consumer_last_loop_timestamp_seconds",
                          consumer=name)
        assert time.time() - 5 < last_loop <= time.time()
    # Two failed attempts per event, each nak'ed for a retry.
    assert value(samples, "onboarding_consumer_events_retried_total", consumer="buildings") >= 5
    assert value(samples, "onboarding_consumer_events_failed_total",
                 consumer="buildings", kind="transient") >= 5
    assert value(samples, "onboarding_consumer_events_retried_total", consumer="players") is None
    assert value(samples, "process_resident_memory_bytes") > 0  # the standard collectors too
    # Only its role's metrics: a consumer showing onboarding_relay_active 0 would read as a
    # relay on standby.
    assert not any(name.startswith("onboarding_relay_") for name, _ in samples)

    def relay_settled():
        samples = scrape(relay_port)
        return (
            value(samples, "onboarding_relay_published_total", path="scan") == 5
            and value(samples, "onboarding_relay_backlog_events") == 0
            and samples
        )

    samples = wait_until(relay_settled, timeout=20, message="relay metrics")
    assert value(samples, "onboarding_relay_backlog_age_seconds") == 0
    assert value(samples, "onboarding_relay_active") == 1
    assert time.time() - 5 < value(samples, "onboarding_relay_last_loop_timestamp_seconds")
    assert not any(name.startswith("onboarding_consumer_") for name, _ in samples)

    # Each process listens on its metrics port and on nothing else.
    assert listening_ports(consumers.popen.pid) == {consumer_port}
    assert listening_ports(relay.popen.pid) == {relay_port}

    code, output = consumers.stop()
    assert code == 0, output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]  # JSON only
    handled = [r for r in records if r.get("outcome") == "processed"]
    for user in users:
        for name in CONSUMERS:
            (line,) = [r for r in handled
                       if r["user_id"] == str(user.id) and r["consumer"] == name]
            assert line["level"] == "INFO"
            assert line["logger"] == "onboarding.eventbus.events"
            assert isinstance(line["stream_seq"], int) and line["event_id"]
            assert line["duration_ms"] >= 0 and line["time"]
    retried = [r for r in records if r.get("outcome") == "retried"]
    assert {r["consumer"] for r in retried} == {"buildings"}
    assert {r["user_id"] for r in retried} == {str(user.id) for user in users}
    assert {r["consumer"] for r in records if r.get("outcome") == "dead_lettered"} == set(
        CONSUMERS
    )
    assert relay.stop()[0] == 0


def test_without_metrics_port_nothing_listens(manage):
    consumers = manage("consume", "--all")
    relay = manage("outbox_relay")
    consumers.wait_for_output("consumers started")
    relay.wait_for_output("relay: active")
    assert listening_ports(consumers.popen.pid) == set()
    assert listening_ports(relay.popen.pid) == set()
    assert "metrics on" not in consumers.output() + relay.output()


def test_a_metrics_port_in_use_stops_the_command_with_one_line(manage):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = manage("consume", "players", **metrics_env(port))
        assert process.wait(20) == 1
    assert "processes on one host need a METRICS_PORT each" in process.output()


def mtime(path) -> float:
    return os.stat(path).st_mtime


def written(path) -> float:
    """When ``path`` was last written: its ctime (a heartbeat write sets the mtime it reports)."""
    return os.stat(path).st_ctime


def test_heartbeat_freezes_while_a_handler_hangs_and_advances_when_healthy(manage, tmp_path):
    """Stuck = a unit of work (here one handler transaction) that has not returned: the file's
    mtime stays at the loop's last tick, while the keepalive still holds the message."""
    heartbeat, attempts = tmp_path / "consumer.alive", tmp_path / "attempts"
    port = free_port()
    hang = 6.0  # seconds the handler hangs
    consumer = manage(
        "consume", "players", faults=True, FAULT_SLOW=f"players:{hang}",
        FAULT_LOG=str(attempts), HEARTBEAT_FILE=str(heartbeat), **metrics_env(port),
    )
    relay_heartbeat = tmp_path / "relay.alive"
    manage("outbox_relay", HEARTBEAT_FILE=str(relay_heartbeat))
    consumer.wait_for_output("consumers started")

    # Healthy and idle: the heartbeat follows the fetch loop, second by second.
    first = mtime(heartbeat)
    wait_until(lambda: mtime(heartbeat) >= first + 2, timeout=10, message="heartbeat advancing")
    assert time.time() - mtime(heartbeat) < 3

    user = user_register(username="hangs", email="hangs@example.com", password="x")
    wait_until(attempts.exists, timeout=20, message="the handler to start")
    hung_at = float(attempts.read_text().split()[2])
    # Each write of the file sets its mtime (to the loop's last tick) and so its ctime (to now).
    wait_until(lambda: written(heartbeat) > hung_at, timeout=10,
               message="a heartbeat write after the handler began")
    frozen, frozen_written = mtime(heartbeat), written(heartbeat)
    gauge = value(scrape(port), "onboarding_consumer_last_loop_timestamp_seconds",
                  consumer="players")
    wait_until(lambda: written(heartbeat) > frozen_written + 1, timeout=10,
               message="two more heartbeat writes")
    assert counts()["players"] == 0, "the handler is still hanging"
    assert mtime(heartbeat) == frozen <= hung_at
    assert value(scrape(port), "onboarding_consumer_last_loop_timestamp_seconds",
                 consumer="players") == gauge == pytest.approx(frozen, abs=0.01)

    # The handler returns: the loop moves again, and so does the heartbeat.
    wait_until(lambda: counts()["players"] == 1, timeout=20, message="the slow handler")
    wait_until(lambda: mtime(heartbeat) > hung_at + hang, timeout=10, message="heartbeat again")
    assert f"user_id={user.id}" in consumer.output()

    # The relay's heartbeat follows its scans, and a standby's its polls for the lock.
    assert time.time() - mtime(relay_heartbeat) < 3
    standby_heartbeat = tmp_path / "standby.alive"
    standby = manage("outbox_relay", HEARTBEAT_FILE=str(standby_heartbeat))
    standby.wait_for_output("relay: standby")
    start = mtime(standby_heartbeat)
    wait_until(lambda: mtime(standby_heartbeat) >= start + 2, timeout=10,
               message="standby heartbeat advancing")
    assert time.time() - mtime(relay_heartbeat) < 3


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_one_web_request_logs_one_line(log_format, manage):
    """Under DEBUG (as `make run`) Django's own console handler printed django.request's lines
    a second time, and runserver's access lines bypassed the configured format."""
    port = free_port()
    web = manage("runserver", f"127.0.0.1:{port}", "--noreload", DJANGO_DEBUG="true",
                 LOG_FORMAT=log_format)
    web.wait_for_output("Quit the server with")

    def post(path: str, body: dict) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert post("/api/auth/register", {"username": "bad"}) == 400
    assert post("/api/auth/register", {"username": "web", "email": "web@example.com",
                                       "password": "correct-horse-battery"}) == 201
    wait_until(lambda: web.output().count("/api/auth/register HTTP/1.1") == 2, timeout=10)
    time.sleep(0.5)  # anything printed twice would be there by now
    output = web.output()

    def lines_with(*parts: str) -> int:
        return sum(all(part in line for part in parts) for line in output.splitlines())

    assert lines_with("Bad Request: /api/auth/register") == 1, output
    assert lines_with("POST /api/auth/register HTTP/1.1", " 400 ") == 1, output
    assert lines_with("POST /api/auth/register HTTP/1.1", " 201 ") == 1, output
    assert lines_with("user registered user_id=") == 1, output
    if log_format == "json":
        records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        access = [r for r in records if r["logger"] == "django.server"]
        assert [r["status_code"] for r in access] == [400, 201]
        assert "request" not in access[0]  # the socket is not a log field
    else:
        access = [line for line in output.splitlines() if "django.server" in line]
        assert [line.split()[2] for line in access] == ["WARNING", "INFO"]  # our format

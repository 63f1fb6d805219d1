"""Replicated consumers: several ``consume players`` processes share the one durable.

JetStream hands each message of a durable pull consumer to one of the pull requests waiting on
it, so replicas of a consumer (on any machines) split its work; the inbox makes the redelivery
of an event already committed (its replica died before the ack) a skipped duplicate. These
tests run three real ``manage.py consume players`` processes and one ``outbox_relay`` (it
publishes each commit: woken by NOTIFY on PostgreSQL, by a datagram on SQLite) against a paced
burst of real registrations.

Each replica says on stop what it did (``consumers stopped: players (processed N, D
duplicate(s) skipped)``), and each batch it committed (``processed N event(s) in one
transaction (D duplicate(s) skipped)``); the test adds both up and checks they agree.

The replicas run with ``--batch 10`` and the burst is paced (one registration every 10 ms, 4-5 s
in all), so that events arrive while all three pull requests wait and none can take more than
ten at once. Measured here, the default batch of 100 split an unpaced burst evenly too
(99/102/99 on SQLite), so the smaller batch is a margin against one replica taking a run of
events before the others ask again, not a necessity.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from django.conf import settings

from accounts.models import User
from conftest import run_async, wait_settled, wait_until
from onboarding.eventbus.models import DeadLetter, ProcessedEvent
from onboarding.eventbus.outbox.write import fast_path
from players.models import Player
from tests.flow import Burst

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

N = 300
REPLICAS = 3
BATCH = "10"
INTERVAL = 0.01  # seconds between registrations
PROCESS_ENV = {"OUTBOX_RELAY_GRACE": "0.5", "LOG_LEVEL": "INFO"}

STOPPED = re.compile(r"consumers stopped: .*?\bplayers \(processed (\d+), (\d+) duplicate")
BATCH_LINE = re.compile(
    r"consumer players: processed (\d+) event\(s\) in one transaction \((\d+) duplicate"
)
ONE_LINE = re.compile(r"consumer players: (processed|duplicate skipped) seq=")


def logged(output: str) -> tuple[int, int]:
    """(processed, duplicates skipped) summed over a replica's per-batch and per-message lines."""
    processed = duplicates = 0
    for done, skipped in BATCH_LINE.findall(output):
        processed += int(done)
        duplicates += int(skipped)
    for outcome in ONE_LINE.findall(output):
        processed += outcome == "processed"
        duplicates += outcome == "duplicate skipped"
    return processed, duplicates


def totals_on_stop(output: str) -> tuple[int, int]:
    """(processed, duplicates skipped) from the replica's last line."""
    match = STOPPED.search(output)
    assert match, output[-2000:]
    return int(match[1]), int(match[2])


def inbox_count() -> int:
    alias = settings.CONTEXT_DATABASES["players"]
    return ProcessedEvent.objects.using(alias).filter(consumer="players").count()


def pull_requests_waiting() -> int:
    async def read(js):
        return (await js.consumer_info(settings.NATS_STREAM, "players")).num_waiting

    return run_async(read)


def start_replicas(manage, **first) -> tuple:
    """The relay and the replicas, all up and waiting; ``first``: how to start the first one."""
    relay = manage("outbox_relay", **PROCESS_ENV)
    options = [first] + [{}] * (REPLICAS - 1)
    replicas = [manage("consume", "players", "--batch", BATCH, **PROCESS_ENV, **extra)
                for extra in options]
    for replica in replicas:
        replica.wait_for_output("consumers started: players", timeout=30)
    # The relay publishes each commit (PostgreSQL: NOTIFY; SQLite: wake-ups).
    listening = {"notify": "relay: listening for commits", "wake": "relay: listening for wake-ups"}
    if fast_path() in listening:
        relay.wait_for_output(listening[fast_path()], timeout=30)
    wait_until(lambda: pull_requests_waiting() >= REPLICAS, timeout=30,
               message="a pull request of every replica waiting")
    return relay, replicas


def stop_all(processes, timeout: float = 15.0) -> list[tuple[int, str]]:
    """SIGTERM to all at once (each takes up to a fetch timeout to stop), then (code, output)
    of each. One signal only: once its loop is closed, a process dies of a second one."""
    for process in processes:
        process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            code = process.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            raise AssertionError(f"{process.args[2:]} did not exit within {timeout}s of SIGTERM")
        results.append((code, process.output()))
    return results


def assert_each_user_has_one_player(user_ids) -> None:
    assert Player.objects.count() == len(user_ids)
    assert set(Player.objects.values_list("user_id", flat=True)) == set(user_ids)
    assert User.objects.count() == len(user_ids)
    assert inbox_count() == len(user_ids)
    assert not DeadLetter.objects.exists()


def test_three_replicas_split_a_burst_and_handle_each_event_once(manage):
    relay, replicas = start_replicas(manage)
    started = time.monotonic()
    burst = Burst(N, INTERVAL, "rep").start()
    burst.join()
    burst_seconds = time.monotonic() - started
    wait_until(lambda: Player.objects.count() >= N, timeout=30, message="every player")
    wait_until(lambda: inbox_count() >= N, timeout=10, message="every inbox row")
    wait_settled(["players"], timeout=15)  # every message acked

    results = stop_all([*replicas, relay])
    for code, output in results:
        assert code == 0, output[-2000:]
    split = [totals_on_stop(output) for _, output in results[:REPLICAS]]
    per_batch = [logged(output) for _, output in results[:REPLICAS]]
    figures = "/".join(str(processed) for processed, _ in split)
    print(f"\nREPLICAS players: {figures} (burst {N} in {burst_seconds:.1f}s, --batch {BATCH})")

    assert split == per_batch  # the stop line adds up what the batch lines said
    assert sum(processed for processed, _ in split) == N
    assert sum(duplicates for _, duplicates in split) == 0  # nothing handled twice
    assert all(processed > 0 for processed, _ in split), f"a replica got nothing: {figures}"
    assert_each_user_has_one_player(burst.user_ids)


@pytest.mark.slow
def test_a_replica_killed_mid_burst_loses_and_duplicates_nothing(manage, tmp_path):
    """SIGKILL one of three replicas mid-burst, while its handler holds a batch: what it held
    unacked is redelivered to the others after ack_wait (CONSUMER_ACK_WAIT, 10 s in tests), and
    what it had committed but not acked would be found in the inbox and skipped.

    The victim's handler is slowed (0.3 s a batch, tests/faults/faulty_manage.py) and logs each
    event it starts on, so the kill lands while it holds events it has not committed."""
    attempts = tmp_path / "victim-attempts.log"
    attempts.touch()
    relay, replicas = start_replicas(manage, faults=True, FAULT_SLOW="players:0.3",
                                     FAULT_LOG=str(attempts))
    victim, survivors = replicas[0], replicas[1:]
    burst = Burst(N, INTERVAL, "kill").start()
    wait_until(lambda: "consumer players: processed" in victim.output(), timeout=30,
               message="the victim at work")
    # A batch in the victim's handler: it started on more events than it has committed.
    wait_until(lambda: len(attempts.read_text().splitlines()) > logged(victim.output())[0],
               timeout=30, interval=0.01, message="the victim holding a batch")
    victim.kill()  # SIGKILL: no hand-back; its batch in hand stays unacked until ack_wait
    killed = time.monotonic()
    killed_at = len(burst.user_ids)
    burst.join()
    wait_until(lambda: Player.objects.count() >= N, timeout=60, message="every player")
    recovered_in = time.monotonic() - killed
    wait_until(lambda: inbox_count() >= N, timeout=10, message="every inbox row")
    wait_settled(["players"], timeout=30)

    results = stop_all([*survivors, relay])
    for code, output in results:
        assert code == 0, output[-2000:]
    victim_logged, _ = logged(victim.output())
    held = len(attempts.read_text().splitlines()) - victim_logged
    split = [totals_on_stop(output) for _, output in results[: REPLICAS - 1]]
    print(f"\nREPLICAS players, one killed after {killed_at} registrations holding {held} "
          f"event(s): killed {victim_logged} / "
          + "/".join(f"{processed} (+{duplicates} dup)" for processed, duplicates in split)
          + f"; all {N} players {recovered_in:.1f}s after the kill")
    assert held > 0  # the kill stranded events: they came back only after ack_wait
    assert recovered_in >= settings.CONSUMER_ACK_WAIT - 2
    # The survivors applied what the victim did not commit. It may have committed (or acked)
    # more than it logged: those came back to a survivor as duplicates, found in the inbox.
    applied = sum(processed for processed, _ in split)
    skipped = sum(duplicates for _, duplicates in split)
    assert applied + victim_logged <= N <= applied + skipped + victim_logged
    assert_each_user_has_one_player(burst.user_ids)

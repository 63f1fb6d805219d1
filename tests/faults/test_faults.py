"""Fault injection with real processes, a real nats-server and real databases.

Each test runs the real ``consume`` / ``outbox_relay`` processes and asserts exact counts:
N registrations → exactly N of each default, 0 duplicates, 0 lost. Slow: ``make test`` skips
them, ``make test-all`` and CI run them.
"""

from __future__ import annotations

import os
import time

import pytest
from django.conf import settings
from django.db import connections

from accounts.services import user_register
from conftest import run_async, wait_until
from onboarding.eventbus.models import DeadLetter, OutboxEvent, ProcessedEvent
from tests.faults.harness import nats_stopped
from tests.flow import Burst, complete_count, counts, register, sample_event
from tests.test_consumer_failures import poison_messages, publish_all, valid
from tests.test_replicas import logged

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, databases="__all__")]

OUTAGE_SECONDS = float(os.environ.get("FAULT_OUTAGE_SECONDS", "60"))
PROCESS_ENV = {"OUTBOX_RELAY_GRACE": "0.5"}


def report(name: str, **figures) -> None:
    """Print the test's figures (shown with -s, and in CI logs via -rA)."""
    print(f"\nFAULT {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def inbox_counts() -> dict[str, int]:
    return {
        name: ProcessedEvent.objects.using(alias).filter(consumer=name).count()
        for name, alias in ((c, settings.CONTEXT_DATABASES[c]) for c in settings.BOUNDED_CONTEXTS)
    }


def assert_exactly(n: int) -> None:
    assert counts() == complete_count(n)
    assert inbox_counts() == dict.fromkeys(settings.BOUNDED_CONTEXTS, n)
    assert not DeadLetter.objects.exists()


def test_kill_9_consumers_repeatedly_during_a_burst(manage, fault_timings, tmp_path):
    """Each kill lands while the consumer holds a batch it has not committed: its players
    handler is slowed (0.3 s a batch, tests/faults/faulty_manage.py) and logs each event it
    starts on, and after a random wait the kill waits for it to hold more than it committed."""
    n, kills = 300, 4
    relay = manage("outbox_relay", **PROCESS_ENV)

    def consume(incarnation: int):
        attempts = tmp_path / f"attempts-{incarnation}.log"
        attempts.touch()
        process = manage("consume", "--all", faults=True, FAULT_SLOW="players:0.3",
                         FAULT_LOG=str(attempts), LOG_LEVEL="INFO")
        return process, attempts

    def holding(process, attempts) -> int:
        """Players events its handler started on, less those it logged as committed."""
        started = sum(line.startswith("players ") for line in attempts.read_text().splitlines())
        return started - logged(process.output())[0]

    consumer, attempts = consume(0)
    burst = Burst(n, 0.01, "kill").start()
    held = []
    for kill in range(kills):
        time.sleep(fault_timings.uniform(0.5, 1.5))
        # Once the burst is over, what the last kill stranded comes back after ack_wait.
        wait_until(lambda c=consumer, a=attempts: holding(c, a) > 0,
                   timeout=settings.CONSUMER_ACK_WAIT + 30, interval=0.01,
                   message="the consumer holding a batch")
        consumer.kill()  # SIGKILL: no cleanup, messages in flight stay unacked
        held.append(holding(consumer, attempts))
        consumer, attempts = consume(kill + 1)
    burst.join()
    wait_until(lambda: counts() == complete_count(n), timeout=90, message="all defaults")
    # The last consumer may have found nothing left to do: the defaults can be complete before
    # it is even up. Stopping it while it still starts would end it by the signal's default
    # action (-15), not by its clean shutdown, which is what this checks.
    consumer.wait_for_output("consumers started")
    code, _ = consumer.stop()
    assert code == 0
    relay.stop()
    assert_exactly(n)
    report("kill -9", registrations=n, kills=kills, held=held, dead_letters=0, lost=0,
           duplicated=0, seed=fault_timings.fault_seed)
    # The kills stranded events in flight. Each waited for a batch in hand; one that came a
    # millisecond after its batch committed would find none, so not every kill must show one.
    assert sum(held) > 0, held


def test_nats_restart_during_a_burst(client, manage, nats_server):
    n = 120
    relay = manage("outbox_relay", **PROCESS_ENV)
    consumer = manage("consume", "--all")
    statuses = []

    def burst(numbers):
        for i in numbers:
            statuses.append(register(client, f"restart{i}").status_code)
            time.sleep(0.02)

    burst(range(n // 3))
    with nats_stopped(nats_server):  # the session's server: up again even if this fails
        burst(range(n // 3, 2 * n // 3))
    burst(range(2 * n // 3, n))
    assert statuses == [201] * n  # registration never depended on NATS
    wait_until(lambda: counts() == complete_count(n), timeout=90, message="all defaults")
    wait_until(lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists())
    for process in (consumer, relay):
        code, output = process.stop()
        assert code == 0, output
    assert_exactly(n)
    report("nats restart", registrations=n, restarts=1, dead_letters=0, lost=0, duplicated=0)


class DatabaseOutage:
    """Make one context's database unavailable, the way it happens in production.

    PostgreSQL: refuse new connections and end the existing ones. SQLite: another process holds
    the write lock (an exclusive transaction) for the whole time.
    """

    def __init__(self, alias: str):
        self.config = settings.DATABASES[alias]
        self.sqlite = self.config["ENGINE"].endswith("sqlite3")
        self._lock = None

    def _admin(self, sql: str) -> None:
        import psycopg

        conn = psycopg.connect(
            host=self.config.get("HOST") or "127.0.0.1", port=self.config.get("PORT") or 5432,
            user=self.config.get("USER") or None, password=self.config.get("PASSWORD") or None,
            dbname="postgres", autocommit=True,
        )
        with conn:
            conn.execute(sql)

    def begin(self) -> None:
        if self.sqlite:
            import sqlite3

            self._lock = sqlite3.connect(self.config["NAME"], isolation_level=None, timeout=30)
            self._lock.execute("BEGIN EXCLUSIVE")
            return
        name = self.config["NAME"]
        self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )

    def end(self) -> None:
        if self.sqlite:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            return
        self._admin(f'ALTER DATABASE "{self.config["NAME"]}" ALLOW_CONNECTIONS true')


def test_a_context_database_outage_dead_letters_nothing(manage):
    target = settings.CONTEXT_DATABASES["buildings"]
    shared_with_accounts = target == "default"
    before, during = 20, 20
    relay = manage("outbox_relay", **PROCESS_ENV)
    # SQLite's outage here is another process holding the write lock; a transaction waits for it
    # up to the 20 s busy timeout, so a shorter outage would pass for contention. The cap makes
    # the consumer notice any outage longer than a few seconds (FAULT_OUTAGE_SECONDS=5, 10, 60):
    # after it, a transaction the database never let begin is worth a probe, which fails.
    consumer = manage("consume", "--all", CONSUMER_BATCH_TIMEOUT="2")
    for i in range(before):
        user_register(username=f"pre{i}", email=f"pre{i}@example.com", password="x")
    if shared_with_accounts:  # the outage takes accounts down too: publish everything first
        wait_until(lambda: counts() == complete_count(before), timeout=30)
    outage = DatabaseOutage(target)
    connections.close_all()
    outage.begin()
    started = time.monotonic()
    try:
        if shared_with_accounts:  # registration is down too: events arrive straight on NATS
            publish_all([valid(sample_event(username=f"out{i}")) for i in range(during)])
        else:
            for i in range(during):
                user_register(username=f"out{i}", email=f"out{i}@example.com", password="x")
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - started)))
        assert consumer.poll() is None, consumer.output()
    finally:
        outage.end()
        connections.close_all()
    n = before + during
    wait_until(lambda: counts() == complete_count(n), timeout=90, message="all defaults")
    code, output = consumer.stop()
    assert code == 0, output
    relay.stop()
    assert "unavailable" in output and "is back; resuming" in output
    assert_exactly(n)
    report("database outage", engine="sqlite" if outage.sqlite else "postgresql",
           seconds=OUTAGE_SECONDS, events=n, during_outage=during,
           registered_during_outage=not shared_with_accounts,
           dead_letters=0, lost=0, duplicated=0)


def test_poison_messages_interleaved_with_valid_ones(manage):
    consumer = manage("consume", "--all")
    poison = poison_messages()
    events = [sample_event(username=f"valid{i}") for i in range(len(poison) + 1)]
    interleaved = [valid(events[0])]
    for event, bad in zip(events[1:], poison.values(), strict=True):
        interleaved += [bad, valid(event)]
    publish_all(interleaved)
    wait_until(lambda: counts() == complete_count(len(events)), timeout=30)
    wait_until(lambda: DeadLetter.objects.count() == 4 * len(poison), timeout=30)
    assert consumer.poll() is None  # it never stopped
    code, output = consumer.stop()
    assert code == 0, output
    report("poison", valid=len(events), poison=len(poison), dead_letters=4 * len(poison),
           lost=0)


def test_a_handler_failing_k_times_is_retried_with_growing_delays(manage, tmp_path):
    log = tmp_path / "attempts.log"
    k = 3
    consumer = manage("consume", "players", faults=True, FAULT_FAIL_FIRST=f"players:{k}",
                      FAULT_LOG=str(log), CONSUMER_RETRY_BASE_DELAY="0.5",
                      CONSUMER_RETRY_MAX_DELAY="10")
    event = sample_event(username="flaky")
    publish_all([valid(event)])
    wait_until(lambda: counts()["players"] == 1, timeout=30)
    code, output = consumer.stop()
    assert code == 0, output
    times = [float(line.split()[2]) for line in log.read_text().splitlines()]
    assert len(times) == k + 1
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[0] >= 0.5 * 0.9
    assert inbox_counts()["players"] == 1 and not DeadLetter.objects.exists()
    report("retry", failures=k, gaps=[round(g, 2) for g in gaps], processed=1)


def test_replay_after_the_fix_reaches_only_that_consumer(manage, tmp_path):
    manage("outbox_relay", **PROCESS_ENV)
    broken = manage("consume", "--all", faults=True, FAULT_FAIL_ALWAYS="buildings")
    user = user_register(username="replayed", email="replayed@example.com", password="x")
    wait_until(lambda: DeadLetter.objects.filter(consumer="buildings").exists(), timeout=30)
    letter = DeadLetter.objects.get(consumer="buildings")
    assert letter.user_id == str(user.id) and letter.error_type == "InjectedFault"
    assert letter.deliveries == settings.CONSUMER_MAX_DELIVER

    # Replayed before the fix: it fails again and stays a dead letter, with the new error.
    replay = manage("deadletters", "replay", "--consumer", "buildings", "--id", str(letter.id))
    assert replay.wait() == 0, replay.output()
    wait_until(lambda: DeadLetter.objects.get(id=letter.id).replays == 1
               and DeadLetter.objects.get(id=letter.id).last_failed_at > letter.last_failed_at,
               timeout=30)
    assert DeadLetter.objects.get(id=letter.id).resolved_at is None
    assert DeadLetter.objects.count() == 1
    broken.stop()

    fixed = manage("consume", "--all")
    replay = manage("deadletters", "replay", "--consumer", "buildings", "--all")
    assert replay.wait() == 0, replay.output()
    assert "replayed 1 dead letter(s) to buildings" in replay.output()
    wait_until(lambda: counts()["buildings"] == 2, timeout=30)
    wait_until(lambda: DeadLetter.objects.get(id=letter.id).resolved_at is not None)
    code, output = fixed.stop()
    assert code == 0, output
    assert counts() == complete_count(1)
    assert inbox_counts() == dict.fromkeys(settings.BOUNDED_CONTEXTS, 1)
    for other in ("players", "characters", "progression"):
        assert f"consumer {other}: processed" not in output  # only buildings saw the replay

    async def pending(js):
        return {name: (await js.consumer_info(settings.NATS_STREAM, name)).num_pending
                for name in settings.BOUNDED_CONTEXTS}

    assert run_async(pending) == dict.fromkeys(settings.BOUNDED_CONTEXTS, 0)
    report("replay", dead_letters=1, replays=2, processed_by="buildings only")


def test_sigterm_finishes_the_message_in_hand_and_hands_back_the_rest(manage, settings):
    # With a 5-minute ack_wait, anything not handed back would stall the restart below.
    settings.CONSUMER_ACK_WAIT = 300.0
    from django.core.management import call_command

    call_command("setup_jetstream", stdout=open(os.devnull, "w"))
    manage("outbox_relay", **PROCESS_ENV)
    consumer = manage("consume", "players", "--batch", "20", "--per-message", faults=True,
                      FAULT_SLOW="players:0.5")
    for i in range(20):
        user_register(username=f"slow{i}", email=f"slow{i}@example.com", password="x")
    consumer.wait_for_output("consumer players: processed")
    started = time.monotonic()
    code, output = consumer.stop()
    stopped_in = time.monotonic() - started
    assert code == 0, output
    done = counts()["players"]
    assert 0 < done < 20
    again = manage("consume", "players")
    wait_until(lambda: counts()["players"] == 20, timeout=60, message="the rest, handed back")
    again.stop()
    assert inbox_counts()["players"] == 20
    report("sigterm", in_batch=20, processed_before_exit=done, exit_seconds=round(stopped_in, 2))


def test_a_slow_handler_keeps_its_message(manage, settings):
    settings.CONSUMER_ACK_WAIT = 2.0
    from django.core.management import call_command

    call_command("setup_jetstream", stdout=open(os.devnull, "w"))
    manage("outbox_relay", **PROCESS_ENV)
    consumer = manage("consume", "players", faults=True, FAULT_SLOW="players:5",
                      CONSUMER_ACK_WAIT="2")
    user_register(username="slowpoke", email="slowpoke@example.com", password="x")
    wait_until(lambda: counts()["players"] == 1, timeout=30)
    code, output = consumer.stop()
    assert code == 0, output

    async def redelivered(js):
        return (await js.consumer_info(settings.NATS_STREAM, "players")).num_redelivered

    assert run_async(redelivered) == 0  # in_progress() kept it from being redelivered
    assert output.count("consumer players: processed") == 1

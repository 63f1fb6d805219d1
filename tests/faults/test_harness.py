"""The fault tests' harness: failures stay contained (the shared NATS comes back) and random
timings are replayable (FAULT_SEED). Fast: not marked slow."""

from __future__ import annotations

import random

import pytest

from onboarding.dev.natsserver import NatsServer, answers
from tests.faults.harness import FaultTimings, nats_stopped


def test_nats_comes_back_even_when_the_test_fails_while_it_is_down(tmp_path):
    server = NatsServer(tmp_path / "nats", name="fuzz-harness").start()
    try:
        with pytest.raises(AssertionError, match="failed mid-outage"):
            with nats_stopped(server):
                assert not answers(server.url)
                raise AssertionError("failed mid-outage")
        assert answers(server.url)  # later tests find it where it was
        with nats_stopped(server):
            server.start()  # a test that restarts it itself: no second start
        assert answers(server.url)
    finally:
        server.stop()


def test_fault_seed_replays_the_timings(monkeypatch):
    monkeypatch.setenv("FAULT_SEED", "1234")
    timings = FaultTimings()
    expected = random.Random(1234)
    assert timings.fault_seed == 1234
    assert [timings.uniform(0.5, 1.5) for _ in range(4)] == [
        expected.uniform(0.5, 1.5) for _ in range(4)
    ]
    assert timings.replay == "FAULT_SEED=1234 replays this test's random timings"


def test_without_fault_seed_each_run_draws_a_seed_it_can_replay(monkeypatch):
    monkeypatch.delenv("FAULT_SEED", raising=False)
    first = FaultTimings()
    again = FaultTimings(first.fault_seed)
    assert [first.random() for _ in range(4)] == [again.random() for _ in range(4)]


def test_the_fixture_prints_its_seed(capsys, fault_timings):
    assert f"FAULT_SEED={fault_timings.fault_seed} replays" in capsys.readouterr().out

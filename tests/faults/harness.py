"""What the fault tests share so that a failure is reproducible and contained.

- The ``fault_timings`` fixture (tests/faults/conftest.py): a test's random timings (when to
  kill what), seeded from ``FAULT_SEED`` when it is set, from a fresh seed otherwise. The seed
  is printed before the test runs (pytest shows it with a failure's captured output, ``-s`` and
  ``-rA`` show it always), so ``FAULT_SEED=<seed> make test-slow`` replays the same timings.
- ``nats_stopped(server)``: the shared nats-server down for a block and up again after it,
  whatever the block raised, so that a failing test does not take later tests down with it.
"""

from __future__ import annotations

import contextlib
import os
import random

from onboarding.dev.natsserver import NatsServer, answers

SEED_VARIABLE = "FAULT_SEED"


class FaultTimings(random.Random):
    """A ``random.Random`` that remembers its seed, to report it."""

    def __init__(self, seed: int | None = None):
        if seed is None:
            raw = os.environ.get(SEED_VARIABLE, "").strip()
            seed = int(raw) if raw else random.SystemRandom().randrange(2**32)
        super().__init__(seed)
        self.fault_seed = seed
        self.replay = f"{SEED_VARIABLE}={seed} replays this test's random timings"


@contextlib.contextmanager
def nats_stopped(server: NatsServer):
    server.stop()
    try:
        yield server
    finally:
        if not answers(server.url):
            server.start()

"""The suite's own fixtures keep nothing from the test: a consumer runner or a relay that crashed
on its thread fails the test that started it, even when the test itself did not look."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from django.conf import settings


def test_a_crashed_consumer_runner_or_relay_fails_its_test(tmp_path):
    # tests/crash_probes.py in a pytest of its own, on SQLite files of its own (the crash is the
    # fixture's business, not the database's), serially, with its own nats-server.
    env = {
        name: value for name, value in os.environ.items()
        if not name.endswith("DATABASE_URL") and not name.startswith(("PYTEST_", "DJANGO_"))
    }
    env["TEST_SQLITE_DIR"] = str(tmp_path / "db")
    env["COLUMNS"] = "400"  # the summary's lines in full
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/crash_probes.py", "-p", "no:cacheprovider",
         "-q", "-rfE", "--basetemp", str(tmp_path / "pytest")],
        cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = output.splitlines()
    # Unseen crashes: the test body passed, its teardown fails it with what the thread raised.
    assert any(line.startswith("ERROR tests/crash_probes.py::test_a_consumer_runner_that_"
                               "crashes_unseen - AssertionError: the consumer runner on a "
                               "thread of the test crashed: RuntimeError('injected crash')")
               for line in lines), output
    assert any(line.startswith("ERROR tests/crash_probes.py::test_a_relay_that_crashes_unseen"
                               " - AssertionError: the relay on a thread of the test crashed: "
                               "RuntimeError('injected crash')")
               for line in lines), output
    # The bodies of all four passed; a crash the test saw (its own stop() raised it) is not
    # reported again, and runners that stop cleanly fail nothing.
    assert re.match(r"4 passed(, \d+ warnings?)?, 2 errors in ", lines[-1]), output

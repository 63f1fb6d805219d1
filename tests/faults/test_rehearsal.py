"""``make rehearsal`` as a slow test: the production shape under fire loses and duplicates nothing.

Runs ``deploy/rehearsal.py`` as a separate program, as a person would (on PostgreSQL when
``DATABASE_URL`` points at one: it makes its own five databases beside it), with a shorter
burst than its default. The rehearsal's own checks decide: its exit code is the verdict.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.conf import settings

pytestmark = pytest.mark.slow


def test_the_rehearsal_loses_and_duplicates_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(settings.BASE_DIR / "deploy" / "rehearsal.py"),
         "--registrations", "400", "--rate", "20", "--workdir", str(tmp_path / "rehearsal")],
        capture_output=True, text=True, timeout=600, cwd=settings.BASE_DIR,
    )
    print(result.stdout[-4000:])  # the report, in CI logs (-rA)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "REHEARSAL PASSED" in result.stdout

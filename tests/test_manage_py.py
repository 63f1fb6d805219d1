"""manage.py as a newcomer uses it: piped into ``head``, a command ends quietly.

``head`` closes the pipe after the lines it wanted; the command's next write (or the flush of
its buffered output at exit) then fails with EPIPE. Python ignores SIGPIPE, so that is a
``BrokenPipeError``: a traceback, or "Exception ignored ... BrokenPipeError" at exit. manage.py
ends such a command quietly with status 141 (128 + SIGPIPE: what ``yes | head`` reports for
``yes``), as the Python docs' recipe for SIGPIPE does.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.conf import settings

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

MANAGE = str(settings.BASE_DIR / "manage.py")


def run_into_closed_pipe(args, env, log_dir, *, buffered: bool):
    """``manage.py <args>`` writing into a real pipe whose reader is gone before it writes:
    (exit status, stderr)."""
    env = dict(env)
    if buffered:
        env.pop("PYTHONUNBUFFERED", None)  # a pipe: Python buffers, and fails at the flush
    stderr_path = log_dir / "stderr.log"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, MANAGE, *args], env=env, stdout=subprocess.PIPE, stderr=stderr,
        )
    process.stdout.close()  # the reader leaves, as head does after its lines
    try:
        return process.wait(timeout=60), stderr_path.read_text()
    finally:
        process.kill()


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [
    ["onboarding_status"],
    ["onboarding_status", "--json"],
    ["onboarding_status", "--user", "{user_id}"],
    ["dumpdata", "accounts.user"],  # catches every Exception (as a CommandError)
    ["help"],
], ids=" ".join)
def test_a_command_whose_reader_left_ends_quietly(process_env, tmp_path, args, buffered):
    from accounts.services import user_register

    user = user_register(username="sam", email="sam@example.com", password="x")
    args = [arg.format(user_id=user.pk) for arg in args]
    status, stderr = run_into_closed_pipe(args, process_env, tmp_path, buffered=buffered)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    assert status == 141, stderr


def test_piped_into_head_the_command_ends_quietly(process_env):
    """The shell's own pipeline. More output than a pipe holds (64 KiB), so the command is
    still writing when head leaves: its failure is certain, not a race."""
    from accounts.models import User

    User.objects.bulk_create(
        User(username=f"user{i}", email=f"user{i}@example.com") for i in range(1500)
    )
    script = (f"{sys.executable} {MANAGE} dumpdata accounts.user --indent 2 | head -n 1; "
              "echo \"status=${PIPESTATUS[0]}\"")
    env = {key: value for key, value in process_env.items() if key != "PYTHONUNBUFFERED"}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.splitlines() == ["[", "status=141"], (result.stdout[-300:], result.stderr)
    assert result.stderr == "", result.stderr


def test_a_broken_pipe_elsewhere_is_not_hidden(process_env):
    """Only stdout's reader leaving is quiet: a BrokenPipeError from anything else (a socket)
    while stdout is fine still fails loudly, with its traceback."""
    code = (
        "import runpy, django.core.management as management\n"
        "def command(argv):\n"
        "    raise BrokenPipeError(32, 'Broken pipe (a socket)')\n"
        "management.execute_from_command_line = command\n"
        f"runpy.run_path({MANAGE!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=process_env, capture_output=True,
                            text=True, timeout=60, cwd=settings.BASE_DIR)
    assert result.returncode == 1, result
    assert "Traceback" in result.stderr
    assert "BrokenPipeError: [Errno 32] Broken pipe (a socket)" in result.stderr

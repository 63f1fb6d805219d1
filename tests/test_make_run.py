"""``make run`` at a terminal: Ctrl-C stops it all and ends with status 0, no make error line;
a real failure still fails (onboarding/dev/foreground.py says why make needs the help).

make runs on a pseudo-terminal of its own, as from a developer's shell, and Ctrl-C and Ctrl-Z
are typed on it: the terminal then signals its foreground process group, as a real one does.
The first tests run the foreground wrapper under make with a small stand-in for honcho (fast);
the slow ones run the real ``make run``: migrations on fresh SQLite files, honcho, runserver on
a free port, the relay and a consumer per context against a nats-server of the test's own.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from onboarding.dev.natsserver import NatsServer, free_port

ROOT = Path(settings.BASE_DIR)
CTRL_C, CTRL_Z = b"\x03", b"\x1a"


def shell_env(**extra) -> dict:
    """The environment of a developer's shell: no outer make's (make test-slow runs this), no
    pytest's settings module, no database or NATS of the suite's."""
    env = {
        key: value for key, value in os.environ.items()
        if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
                       "DJANGO_SETTINGS_MODULE", "DJANGO_DEBUG", "NATS_URL", "CACHE_URL")
        and not key.endswith("DATABASE_URL")
    }
    return {**env, **extra}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (honcho starts its processes in sessions of their own: a
    signal to make's group does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Terminal:
    """``argv`` on a new pseudo-terminal: a session of its own, the terminal its controlling
    one, and the process the foreground group, as a shell starts a command."""

    def __init__(self, argv: list[str], env: dict, cwd: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: never return into pytest
            try:
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.output = b""
        self.status: int | None = None

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def _read(self, timeout: float) -> bool:
        """Read what is there (up to ``timeout``); False once the terminal is closed."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: every process on the terminal has closed it
                return False
            if not data:
                return False
            self.output += data
        return True

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            if time.monotonic() > deadline or not self._read(0.2):
                raise AssertionError(f"{text!r} not seen within {timeout}s:\n{self.text()[-3000:]}")

    def wait_until(self, predicate, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{message}: not within {timeout}s:\n{self.text()[-3000:]}")
            self._read(0.2)

    def stopped(self, timeout: float) -> bool:
        """Whether the process stops (Ctrl-Z) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
            if pid and os.WIFSTOPPED(status):
                return True
            self._read(0.1)
        return False

    def wait(self, timeout: float) -> int:
        """The exit status (as a shell's ``$?``), reading the output to the end."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                if self.status < 0:
                    self.status = 128 - self.status
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s:\n{self.text()[-3000:]}")
            self._read(0.1)
        while self._read(0.1) and select.select([self.fd], [], [], 0)[0]:
            pass
        return self.status

    def close(self) -> None:
        """Kill whatever is left (after a failed assertion) and close the terminal."""
        if self.status is None:
            left = [self.pid, *descendants(self.pid)]
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def open_terminal(argv, env, cwd=ROOT):
        opened.append(Terminal(argv, env, cwd))
        return opened[-1]

    yield open_terminal
    for term in opened:
        term.close()


# -- the foreground wrapper under make, with a stand-in for honcho -------------------------------

STAND_IN = """\
import signal, sys, time
def interrupted(*_):
    print("SIGINT received", flush=True)
    sys.exit(130)  # as honcho does
signal.signal(signal.SIGINT, interrupted)
signal.signal(signal.SIGCONT, lambda *_: print("continued", flush=True))
print("up", flush=True)
if sys.argv[1] != "run":
    sys.exit(int(sys.argv[1]))
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(99)
"""


def stand_in_makefile(tmp_path: Path, how: str) -> list[str]:
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    (tmp_path / "Makefile").write_text(
        "run:\n"
        f"\tcd {ROOT} && {sys.executable} -m onboarding.dev.foreground "
        f"{sys.executable} {tmp_path / 'stand_in.py'} {how}\n"
    )
    return ["make", "-C", str(tmp_path), "--no-print-directory", "run"]


def test_ctrl_c_ends_make_with_status_0_and_no_error_line(terminal, tmp_path):
    make = terminal(stand_in_makefile(tmp_path, "run"), shell_env())
    make.wait_for("up", timeout=20)
    make.type(CTRL_C)
    assert make.wait(timeout=20) == 0, make.text()
    assert "SIGINT received" in make.text()
    assert "make: ***" not in make.text() and "Interrupt" not in make.text(), make.text()


def test_a_failure_still_fails_make(terminal, tmp_path):
    make = terminal(stand_in_makefile(tmp_path, "3"), shell_env())
    assert make.wait(timeout=20) == 2, make.text()
    assert "make: *** [Makefile:2: run] Error 3" in make.text()


def test_ctrl_z_stops_make_and_fg_continues_it(terminal, tmp_path):
    """As from an interactive shell: Ctrl-Z stops the job (make with it) and gives the shell
    back; ``fg`` continues it; Ctrl-C then stops it, status 0. bash with job control (set -m)
    stands in for the developer's shell."""
    make = stand_in_makefile(tmp_path, "run")
    script = f"set -m; {' '.join(make)}; echo \"[stopped $?]\"; fg; echo \"[exited $?]\""
    shell = terminal(["bash", "--norc", "--noprofile", "-c", script], shell_env())
    shell.wait_for("up", timeout=20)
    shell.type(CTRL_Z)
    shell.wait_for("[stopped 148]", timeout=20)  # 128 + SIGTSTP: the shell has its prompt
    shell.wait_for("continued", timeout=20)  # fg: the stand-in runs, in the foreground again
    shell.type(CTRL_C)
    shell.wait_for("[exited 0]", timeout=20)
    assert "make: ***" not in shell.text(), shell.text()


# -- the real make run ---------------------------------------------------------------------------


@pytest.fixture
def stack_env(tmp_path):
    """``make run``'s environment: fresh SQLite files, a nats-server of this test's own (its
    JetStream store in tmp_path, not the checkout's var/nats), a free web port."""
    nats = NatsServer(tmp_path / "nats", name="make-run").start()
    env = shell_env(
        NATS_URL=nats.url,
        DATABASE_URL=f"sqlite:///{tmp_path / 'accounts.sqlite3'}",
        **{f"{context.upper()}_DATABASE_URL": f"sqlite:///{tmp_path / f'{context}.sqlite3'}"
           for context in settings.BOUNDED_CONTEXTS},
    )
    yield env, free_port()
    nats.stop()


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_on_make_run_stops_everything_with_status_0(terminal, stack_env):
    env, port = stack_env
    make = terminal(["make", "run", f"WEB_PORT={port}"], env)
    make.wait_until(
        lambda: answers(port) and all(
            f"consumers started: {context}" in make.text()
            for context in settings.BOUNDED_CONTEXTS
        ) and "relay: active" in make.text(),
        timeout=180, message="the stack up (web answering, relay active, every consumer)",
    )
    make.type(CTRL_C)
    assert make.wait(timeout=60) == 0, make.text()[-3000:]
    output = make.text()
    assert "SIGINT received" in output
    assert "make: ***" not in output and "Interrupt" not in output, output[-3000:]
    assert "Traceback" not in output, output
    assert not answers(port), "the web process outlived make run"


@pytest.mark.slow
def test_make_run_still_fails_when_a_process_fails(terminal, stack_env):
    """The web port taken: runserver exits 1, honcho stops the rest and exits 1, make fails."""
    env, port = stack_env
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        make = terminal(["make", "run", f"WEB_PORT={port}"], env)
        status = make.wait(timeout=180)
    assert status == 2, make.text()[-3000:]
    assert "That port is already in use" in make.text()
    assert "make: *** [Makefile:" in make.text() and "run] Error 1" in make.text()

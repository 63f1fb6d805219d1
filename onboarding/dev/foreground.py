"""Run a command as the terminal's foreground job, the way a shell runs one (``make run``).

    python -m onboarding.dev.foreground COMMAND [ARG ...]

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. Under ``make run``
that group holds make too, and GNU make, once its child has exited, kills itself with the
same signal whatever the child did: honcho stops every process cleanly and exits 130, then
make prints ``make: *** [Makefile:..: run] Error 130`` (or ``Interrupt``) and the shell sees
make killed by SIGINT. A recipe cannot change how make takes a signal it receives; it can keep
the signal from reaching make. A shell does exactly that for its jobs (job control), and this
does it for one command:

- the command runs in a process group of its own, made the terminal's foreground group while
  it runs, so Ctrl-C reaches the command (honcho) alone, never make;
- the exit status is the command's, except that a stop by Ctrl-C (130: honcho's status on
  SIGINT, or the command killed by SIGINT) is 0, since stopping is what was asked for. Any
  other failure keeps its status, and make fails on it as before;
- Ctrl-Z stops the command's group, and then make's too, so the shell that runs make sees its
  job stop as it did before; ``fg`` gives the terminal back to the command and continues it.

Without a terminal to take over (no controlling terminal, as in CI, or make running in the
background) the command runs as a plain child, in make's group: Ctrl-C and friends reach
everyone as before, and this only passes the status on (130 included: make dies of the signal
anyway, there is nothing to make clean).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# A stop by Ctrl-C: 128 + SIGINT, what honcho (and a shell, for a child killed by SIGINT) gives.
INTERRUPTED = 128 + signal.SIGINT


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: python -m onboarding.dev.foreground COMMAND [ARG ...]\n")
        return 2
    terminal = foreground_terminal()
    if terminal is None:
        status = run_plain(argv)
    else:
        try:
            status = run_in_foreground(argv, terminal)
        finally:
            os.close(terminal)
    return 0 if status == INTERRUPTED else status


def foreground_terminal() -> int | None:
    """A descriptor of this process's controlling terminal if its process group is the
    terminal's foreground group (it owns the keyboard), else None."""
    try:
        terminal = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        return None  # no controlling terminal
    try:
        if os.tcgetpgrp(terminal) == os.getpgrp():
            return terminal
    except OSError:
        pass
    os.close(terminal)
    return None


def run_plain(argv: list[str]) -> int:
    child = subprocess.Popen(argv)
    # As a shell does for the command it waits for: a Ctrl-C is the command's to act on; this
    # waits for it to finish rather than leave it behind (set after the start: not inherited).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return exit_status(os.waitpid(child.pid, 0)[1])


def run_in_foreground(argv: list[str], terminal: int) -> int:
    ours = os.getpgrp()
    child = subprocess.Popen(argv, process_group=0)  # a group of its own, led by the child
    # Giving the terminal away, and taking it back, from what is then a background group: the
    # terminal would stop this process with SIGTTOU (set after the start: not inherited).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    # A stop signal sent to make's group rather than typed (an IDE's stop button, kill -INT
    # -<pgid>) no longer reaches the command by itself: pass it on, so that the command stops
    # cleanly rather than outlive make.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda signum, frame: signal_group(child.pid, signum))
    try:
        os.tcsetpgrp(terminal, child.pid)
        while True:
            _, status = os.waitpid(child.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                return exit_status(status)
            # Ctrl-Z stopped the command. Take the terminal back and stop make's group (this
            # process included) so that the shell sees its job stop, as before.
            os.tcsetpgrp(terminal, ours)
            os.killpg(ours, signal.SIGTSTP)
            # Continued: by fg (the terminal is this group's again: hand it over) or by bg.
            if os.tcgetpgrp(terminal) == ours:
                os.tcsetpgrp(terminal, child.pid)
            os.killpg(child.pid, signal.SIGCONT)
    finally:
        try:
            os.tcsetpgrp(terminal, ours)
        except OSError:
            pass  # the terminal is gone (its window closed)


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # already gone


def exit_status(wait_status: int) -> int:
    """A shell's ``$?`` for a ``waitpid`` status: the exit code, or 128 + the killing signal."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

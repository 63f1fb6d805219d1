"""Run a Python script, profiled with cProfile in every thread from SIGUSR1 to its exit, for
``bench/run.py --profile``.

    python bench/profiled.py OUT_PREFIX SCRIPT [ARGS...]

``python -m cProfile`` sees the main thread only, from the start: both the project's consumers
and the FastStream peer do their ORM work on a worker thread, and their start-up (imports,
``django.setup()``) would swamp a short drain. So profiling starts when the bench sends SIGUSR1
(just before it lets the consumers loose on the backlog): the main thread at once, every other
thread at its next call. Each thread's profile is written to ``OUT_PREFIX.<n>.prof`` when the
script exits normally (both handle SIGTERM as a clean stop); ``pstats.Stats(*files)`` adds them
up.
"""

from __future__ import annotations

import atexit
import cProfile
import runpy
import signal
import sys
import threading
from pathlib import Path

profiles: list[cProfile.Profile] = []
lock = threading.Lock()
started = threading.Event()


def profile_this_thread() -> None:
    profile = cProfile.Profile()
    with lock:
        profiles.append(profile)
    profile.enable()  # replaces this thread's hook, if any, with the profiler


def other_thread_hook(*_) -> None:
    # sys.setprofile hook of every thread but the main one, until SIGUSR1.
    if started.is_set():
        profile_this_thread()


def start(*_) -> None:
    started.set()
    profile_this_thread()  # signal handlers run in the main thread


def dump(prefix: str) -> None:
    for n, profile in enumerate(profiles):
        profile.dump_stats(f"{prefix}.{n}.prof")


def main() -> None:
    prefix, script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # as if the script were run itself
    atexit.register(dump, prefix)
    threading.setprofile(other_thread_hook)
    signal.signal(signal.SIGUSR1, start)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()

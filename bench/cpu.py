"""Where the CPU of a registration goes, process by process (the profile behind docs/benchmarks.md).

Runs the register endpoint the way ``bench/run.py``'s register scenario does (gunicorn, 2 sync
workers; 4 clients in a closed loop; the relay running; MD5 hasher) with events on and off, and
reads each process's CPU time from ``/proc/<pid>/stat`` around the measured requests: gunicorn,
the relay, nats-server, every PostgreSQL backend, and the load generator itself. Prints CPU
milliseconds per registration, by process, and the request rate.

    DATABASE_URL=postgres://... .venv/bin/python bench/cpu.py --engine postgres

Linux only (``/proc``). Bounded: ``--requests`` per round (at most 5,000), ``--rounds`` (at
most 6).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: the same stack and load generator)

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the ")": state is field 3, utime 14 and stime 15 (1-based, whole line).
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    taken = {name: sum(cpu_ms(pid) for pid in pids) for name, pids in groups.items()}
    taken["load generator"] = (time.process_time()) * 1000
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.requests = min(args.requests, 5000)
    args.rounds = min(args.rounds, 6)

    from onboarding.eventbus.natsserver import NatsServer, free_port

    with tempfile.TemporaryDirectory(prefix="onboarding-cpu-") as tmp:
        workdir = Path(tmp)
        nats = NatsServer(workdir / "nats", name="onboarding-cpu").start(
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        env = {
            **os.environ,
            **bench.bench_databases(args.engine, workdir),
            "NATS_URL": nats.url,
            "DJANGO_SETTINGS_MODULE": "onboarding.settings",
            "DJANGO_PASSWORD_HASHERS": bench.FAST_HASHER,
            "REGISTER_THROTTLE_RATE": "",
            "LOG_LEVEL": "WARNING",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        }
        os.environ.update(env)
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate_all", verbosity=0, stdout=open(os.devnull, "w"))
        port = free_port()
        rows = []
        try:
            for r in range(args.rounds):
                modes = ("with_events", "without_events")
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    bench.reset_data()
                    bench.reset_jetstream()
                    with bench.Stack(env, workdir) as stack:
                        relay = stack.manage("outbox_relay")
                        web = stack.gunicorn(
                            port,
                            ACCOUNTS_PUBLISH_EVENTS="true" if mode == "with_events" else "false",
                        )
                        bench.closed_loop(port, 200, 4, f"warm{mode}{r}")
                        groups = {
                            "gunicorn": [web.pid, *children(web.pid)],
                            "relay": [relay.pid],
                            "nats-server": [nats.process.pid],
                        }
                        if args.engine == "postgres":
                            groups["postgres"] = postgres_pids()
                        before = snapshot(groups)
                        rate = bench.closed_loop(port, args.requests, 4, f"reg{mode}{r}")
                        time.sleep(1)  # let the relay and the publisher finish the tail
                        if args.engine == "postgres":
                            groups["postgres"] = postgres_pids()  # and new backends
                        after = snapshot(groups)
                        per = {k: (after[k] - before.get(k, 0)) / args.requests for k in after}
                        rows.append((mode, rate, per))
        finally:
            from django.db import connections

            connections.close_all()
            nats.stop()

    names = list(rows[0][2])
    print(f"### CPU ms per registration ({args.engine}; {args.requests} requests per round, "
          "4 clients)\n")
    print("| mode | req/s | " + " | ".join(names) + " | total |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " | --- |")
    for mode, rate, per in sorted(rows, key=lambda row: row[0]):
        cells = " | ".join(f"{per[n]:.2f}" for n in names)
        print(f"| {mode} | {rate:.0f} | {cells} | {sum(per.values()):.2f} |")


if __name__ == "__main__":
    main()

"""Where the CPU goes, process by process (the profiles behind docs/benchmarks.md).

Reads each process's CPU time from ``/proc/<pid>/stat`` around the measured work and prints CPU
milliseconds per registration (or per event), by process:

- ``--scenario register`` (default): the register endpoint as ``bench/run.py``'s register
  scenario runs it (gunicorn, 2 sync workers; 4 clients in a closed loop; the relay running;
  MD5 hasher), with events on and off: gunicorn, the relay, nats-server, every PostgreSQL
  process, and the load generator (this process).
- ``--scenario drain``: the four consumers draining a published backlog (their start-up not
  counted; "load generator" is this process publishing the backlog and polling the counts),
  then the bulk_create ceiling of the same rows in this process.

    DATABASE_URL=postgres://... .venv/bin/python bench/cpu.py --engine postgres [--scenario drain]

Linux only (``/proc``). Bounded: ``--requests`` per round (at most 5,000), ``--events`` (at most
100,000), ``--rounds`` (at most 6).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The same stack, load generator and backlog as bench/run.py's scenarios.
from backlog import publish_backlog  # noqa: E402
from harness import (  # noqa: E402
    CONTEXTS,
    Stack,
    children,
    cpu_ms,
    reset_data,
    reset_jetstream,
    setup_django,
    wait_for_counts,
)
from scenario_drain import ceiling_rate  # noqa: E402
from scenario_register import closed_loop  # noqa: E402


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    taken = {name: sum(cpu_ms(pid) for pid in pids) for name, pids in groups.items()}
    taken["load generator"] = (time.process_time()) * 1000
    return taken


def profile_register(env, workdir, nats, engine, requests, rounds) -> list:
    from onboarding.dev.natsserver import free_port

    port = free_port()
    rows = []
    for r in range(rounds):
        modes = ("with_events", "without_events")
        for mode in modes if r % 2 == 0 else modes[::-1]:
            reset_data()
            reset_jetstream()
            with Stack(env, workdir) as stack:
                relay = stack.manage("outbox_relay")
                web = stack.gunicorn(
                    port, ACCOUNTS_PUBLISH_EVENTS="true" if mode == "with_events" else "false"
                )
                closed_loop(port, 200, 4, f"warm{mode}{r}")
                groups = {
                    "gunicorn": [web.pid, *children(web.pid)],
                    "relay": [relay.pid],
                    "nats-server": [nats.process.pid],
                }
                if engine == "postgres":
                    groups["postgres"] = postgres_pids()
                before = snapshot(groups)
                rate = closed_loop(port, requests, 4, f"reg{mode}{r}")
                time.sleep(1)  # let the relay and the publisher finish the tail
                if engine == "postgres":
                    groups["postgres"] = postgres_pids()  # and new backends
                after = snapshot(groups)
                per = {k: (after[k] - before.get(k, 0)) / requests for k in after}
                rows.append((mode, f"{rate:.0f} req/s", per))
    return rows


def profile_drain(env, workdir, nats, engine, events, batch, rounds) -> list:
    rows = []
    for _ in range(rounds):
        reset_data()
        reset_jetstream()
        with Stack(env, workdir) as stack:
            consumers = [
                stack.manage("consume", context, "--batch", str(batch))
                for context in CONTEXTS
            ]
            time.sleep(5)  # started and bound: their start-up is not counted
            groups = {"consumers": [p.pid for p in consumers], "nats-server": [nats.process.pid]}
            if engine == "postgres":
                groups["postgres"] = postgres_pids()
            before = snapshot(groups)
            started = time.monotonic()
            publish_backlog(events)
            wait_for_counts(events, timeout=600, label="drain")
            elapsed = time.monotonic() - started
            if engine == "postgres":
                groups["postgres"] = postgres_pids()
            after = snapshot(groups)
        per = {k: (after[k] - before.get(k, 0)) / events for k in after}
        rows.append(("drain (4 consumers)", f"{events / elapsed:.0f} ev/s", per))

        reset_data()
        groups = {"consumers": [], "nats-server": [nats.process.pid]}
        if engine == "postgres":
            groups["postgres"] = postgres_pids()
        before = snapshot(groups)
        rate = ceiling_rate(events, batch)
        after = snapshot(groups)
        per = {k: (after[k] - before.get(k, 0)) / events for k in after}
        rows.append(("ceiling (bulk_create)", f"{rate:.0f} ev/s", per))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--scenario", choices=["register", "drain"], default="register")
    parser.add_argument("--requests", type=int, default=1500, help="register: per round")
    parser.add_argument("--events", type=int, default=20_000, help="drain: backlog")
    parser.add_argument("--batch", type=int, default=100, help="drain: consumer batch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.requests = min(args.requests, 5000)
    args.events = min(args.events, 100_000)
    args.rounds = min(args.rounds, 6)

    from onboarding.dev.natsserver import NatsServer

    with tempfile.TemporaryDirectory(prefix="onboarding-cpu-") as tmp:
        workdir = Path(tmp)
        nats = NatsServer(workdir / "nats", name="onboarding-cpu").start(
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            env = setup_django(args.engine, workdir, nats.url)
            if args.scenario == "register":
                rows = profile_register(
                    env, workdir, nats, args.engine, args.requests, args.rounds
                )
                unit = f"registration; {args.requests} requests per round, 4 clients"
            else:
                rows = profile_drain(
                    env, workdir, nats, args.engine, args.events, args.batch, args.rounds
                )
                unit = f"event; {args.events:,} events, batch {args.batch}"
        finally:
            from django.db import connections

            connections.close_all()
            nats.stop()

    names = list(rows[0][2])
    print(f"### CPU ms per {unit} ({args.engine})\n")
    print("| mode | rate | " + " | ".join(names) + " | total |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " | --- |")
    for mode, rate, per in sorted(rows, key=lambda row: row[0]):
        cells = " | ".join(f"{per[n]:.2f}" for n in names)
        print(f"| {mode} | {rate} | {cells} | {sum(per.values()):.2f} |")


if __name__ == "__main__":
    main()

"""Benchmarks of the event pipeline: ``make bench`` (see docs/benchmarks.md).

One engine per run (``--engine sqlite`` or ``--engine postgres``, the latter from
``DATABASE_URL``). Everything it needs is started here and torn down after: a nats-server on a
free port with a temporary store (NATS's default fsync every 2 minutes, as in development;
``--nats-sync always`` fsyncs each write before the ack, as ``deploy/nats/`` does), bench databases
(SQLite files in a temporary folder; on PostgreSQL five databases, ``<name>_bench`` for accounts
and ``<name>_bench_<context>`` for each context, as a deployment has them, or with
``--shared-database`` all in ``<name>_bench``), the real ``consume`` / ``outbox_relay``
processes and gunicorn. Only 127.0.0.1 is used; every loop is bounded in count and time.

Scenarios:
  drain     a backlog of N events (``--events``, 5,000; e.g. ``--events 5000,50000``) published
            up front, then drained by the project's four consumers (one process each) and, in
            the same run, by the FastStream peer (bench/peer_faststream.py, four processes) on
            its own durables and emptied tables; the time until every row is visible in the
            databases, polled from outside, against the bare bulk_create ceiling of the same rows
            in batches of the same size (one process, no NATS).
  drain-mixed
            a backlog of N events (``--mixed-events``, 5,000) of registrations, renames and
            deletions (``--mix``, 70,15,15 percent; per user in stream order: registration, then
            rename, then deletion) drained by the project's four consumers, beside a
            registration-only backlog of the same size drained in the same run, against the
            registration ceiling and a mixed one (bulk statements, one process, no NATS). The
            FastStream peer handles user.registered only: it is not run on this one.
  latency   registrations over HTTP at a steady rate (fast MD5 hasher); time from the 201 to
            the last of the four services' default rows.
  readiness the latency scenario, also polling each user's GET /api/users/{userId}/onboarding
            from outside (a staff token, every ``--endpoint-poll-ms``) until it says
            ``complete: true``: time from the 201 to that answer (the services' announcements,
            through ``consume accounts``, into accounts' projection).
  erasure   users registered, set up and given a token first (not timed), the stack restarted,
            then deleted over HTTP (DELETE /api/auth/me) at ``--rate`` for ``--warmup`` +
            ``--seconds``; time from the 204 to the last of the four services' tombstones
            (cold: the first deletions after the restart; steady: after the warm-up).
  register  the register endpoint with and without event publishing (same hasher, same run);
            ``--hasher argon2`` measures it with the production hasher.
  relay     an outbox backlog of N rows flushed by the relay; events/s.
  grown     PostgreSQL: a 50,000-event drain (``--grown-events``) and the latency, on empty
            tables and on tables prefilled with N users (``--prefill``, 1,000,000: their inbox,
            outbox, accounts and default rows, bench/grown.py), in one run; the fall in drain
            rate, the database server's WAL and buffer traffic per event, and each table's and
            index's size per million users.

Passwords are hashed with MD5 (``DJANGO_PASSWORD_HASHERS``) so that hashing does not hide the
pipeline; per-event INFO logs are off (``LOG_LEVEL=WARNING``), as they would be at volume.

Layout: this file parses the flags, runs the scenarios one after the other and writes the
results; ``harness.py`` holds what they share (databases, processes, resets), ``backlog.py`` the
published backlog and its held durables, ``scenario_<name>.py`` each scenario, and ``report.py``
the tables printed at the end. ``peer_faststream.py``, ``profiled.py`` and ``grown.py`` are what
the scenarios start or load; ``cpu.py`` and ``latency.py`` are tools of their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import (
    CONTEXTS,
    HASHERS,
    ROOT,
    Stack,
    databases_label,
    reset_data,
    reset_jetstream,
    setup_django,
)
from report import machine, markdown
from scenario_drain import peer_available, scenario_drain
from scenario_drain_mixed import scenario_drain_mixed
from scenario_erasure import scenario_erasure
from scenario_grown import scenario_grown
from scenario_latency import scenario_latency
from scenario_register import scenario_register
from scenario_relay import scenario_relay

# In the order they run (and the default of --only).
SCENARIOS = ("drain", "drain-mixed", "latency", "readiness", "erasure", "register", "relay",
             "grown")


def median_of(runs: list[dict]) -> dict:
    """Field by field, the median of several runs' results (numbers; anything else: run 1's)."""
    merged = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, dict):
            merged[key] = median_of(values)
        elif isinstance(first, int | float) and not isinstance(first, bool):
            median = statistics.median(values)
            merged[key] = round(median) if isinstance(first, int) else round(median, 3)
        else:
            merged[key] = first
    return merged


def backlogs(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1 or max(sizes) > 200_000:
        raise argparse.ArgumentTypeError("backlog sizes between 1 and 200000, comma-separated")
    return sizes


def shares(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(part) for part in text.split(","))
    except ValueError:
        parts = ()
    if (len(parts) != 3 or min(parts) < 0 or sum(parts) != 100 or parts[1] > parts[0]
            or parts[2] > parts[0]):
        raise argparse.ArgumentTypeError("registrations,renames,deletions in percent, summing "
                                         "to 100, no more renames or deletions than "
                                         "registrations (e.g. 70,15,15)")
    return parts


def parse_args() -> argparse.Namespace:
    """The flags (docs/benchmarks.md), each clamped to its bounds."""
    parser = argparse.ArgumentParser(description="Benchmarks of the onboarding event pipeline")
    parser.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--shared-database", action="store_true",
                        help="postgres: every context in one database (default: five databases, "
                             "accounts + one per context)")
    parser.add_argument("--events", type=backlogs, default=[5_000, 50_000],
                        help="drain backlog(s), comma-separated, e.g. 5000,50000 (max 200000)")
    parser.add_argument("--batch", type=int, default=100, help="consumer fetch/commit batch")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="drain: leave out the FastStream peer")
    parser.add_argument("--profile", action="store_true",
                        help="drain: run the consumers under cProfile and print where their "
                             "time goes per event (slows them: not for the ratios)")
    parser.add_argument("--profile-dir", help="drain, with --profile: keep the .prof files "
                        "there (pstats) instead of in the run's temporary folder")
    parser.add_argument("--mixed-events", type=backlogs, default=[5_000],
                        help="drain-mixed: backlog size(s), comma-separated (max 200000)")
    parser.add_argument("--mix", type=shares, default=(70, 15, 15),
                        help="drain-mixed: registrations,renames,deletions in percent")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="latency: registrations/s; erasure: deletions/s")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="latency, erasure: steady-state duration, after --warmup")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="latency, erasure: seconds after the cold start before steady "
                             "state")
    parser.add_argument("--poll-ms", type=float, default=2.0,
                        help="latency, erasure: the database watcher's interval between "
                             "queries")
    parser.add_argument("--endpoint-poll-ms", type=float, default=20.0,
                        help="readiness: the interval between polls of each pending user's "
                             "onboarding endpoint")
    parser.add_argument("--requests", type=int, default=1000, help="register: per round")
    parser.add_argument("--hasher", choices=sorted(HASHERS), default="md5",
                        help="the password hasher (md5: fast, so that hashing does not hide the "
                             "pipeline; argon2: production's, e.g. --only register --requests 40)")
    parser.add_argument("--rounds", type=int, default=4, help="register: rounds (median)")
    parser.add_argument("--relay-rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3,
                        help="drain, drain-mixed, latency, erasure, relay: runs (the table "
                             "shows their medians)")
    parser.add_argument("--prefill", type=int, default=1_000_000,
                        help="grown: users prefilled (inbox, outbox, users, defaults); "
                             "1,000 to 5,000,000")
    parser.add_argument("--grown-events", type=int, default=50_000,
                        help="grown: the backlog drained on empty and on grown tables")
    parser.add_argument("--grown-ordered-ids", action="store_true",
                        help="grown, an experiment: time-ordered (UUIDv7) user ids too "
                             "(event ids are, as the project mints them)")
    parser.add_argument("--nats-sync", choices=["default", "always"], default="default",
                        help="the bench nats-server's jetstream sync_interval: default (fsync "
                             "every 2 minutes, as make run) or always (fsync each write before "
                             "the ack, as deploy/nats/; e.g. --only relay,drain --nats-sync "
                             "always)")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    args.relay_rows = min(args.relay_rows, 200_000)
    args.runs = max(1, min(args.runs, 10))
    args.prefill = max(1_000, min(args.prefill, 5_000_000))
    args.grown_events = max(args.batch, min(args.grown_events, 200_000))
    args.rate = max(1.0, min(args.rate, 500.0))
    args.seconds = max(1.0, min(args.seconds, 600.0))
    args.warmup = max(0.0, min(args.warmup, 60.0))
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenario(s) {sorted(unknown)}; one of {SCENARIOS}")
    return args


def run_scenario(name: str, stack: Stack, args: argparse.Namespace, events: int | None,
                 run: int, port: int, nats_pid: int, workdir: Path) -> dict:
    """One run of the scenario ``name`` on a fresh ``stack``: the flags, as its arguments."""
    if name == "drain":
        return scenario_drain(
            stack, events, args.batch, args.peer, run, nats_pid=nats_pid,
            profile_dir=(Path(args.profile_dir) if args.profile_dir else workdir / "profiles")
            if args.profile else None)
    if name == "drain-mixed":
        return scenario_drain_mixed(stack, events, args.batch, args.mix, run, nats_pid=nats_pid)
    if name in ("latency", "readiness"):
        return scenario_latency(stack, args.rate, args.seconds, port, args.engine,
                                warmup=args.warmup, tick=args.poll_ms / 1000,
                                endpoint_poll=args.endpoint_poll_ms / 1000
                                if name == "readiness" else None, nats_pid=nats_pid)
    if name == "erasure":
        return scenario_erasure(stack, args.rate, args.seconds, port, args.engine,
                                warmup=args.warmup, tick=args.poll_ms / 1000)
    if name == "register":
        return scenario_register(stack, args.requests, args.rounds, port)
    if name == "grown":
        return scenario_grown(
            stack, args.prefill, args.grown_events, args.batch, run, port, args.rate,
            args.seconds, nats_pid=nats_pid, ordered_ids=args.grown_ordered_ids,
            latency_options={"warmup": args.warmup, "tick": args.poll_ms / 1000})
    return scenario_relay(args.relay_rows, 500)


def main() -> None:
    args = parse_args()
    scenarios = set(args.only.split(","))
    if "grown" in scenarios and args.engine != "postgres":
        # Prefilled with generate_series and sized with pg_relation_size; SQLite, the
        # development database, is not what grows to a million users.
        print("grown: skipped on SQLite (PostgreSQL only: --engine postgres)", file=sys.stderr)
        scenarios.discard("grown")
    peer_version = peer_available() if "drain" in scenarios and args.peer else None
    if "drain" in scenarios and args.peer and not peer_version:
        raise SystemExit("the drain's FastStream peer needs bench/requirements.txt "
                         "(make bench installs it; or pass --no-peer)")

    from onboarding.dev.natsserver import NatsServer, free_port

    with tempfile.TemporaryDirectory(prefix="bench-onboarding-") as tmp:
        workdir = Path(tmp)
        nats = NatsServer(workdir / "nats", name="bench-onboarding",
                          sync_always=args.nats_sync == "always").start(
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        env = setup_django(args.engine, workdir, nats.url, args.shared_database,
                           HASHERS[args.hasher])
        label = databases_label(args.engine, {
            key: value for key, value in env.items() if key.endswith("DATABASE_URL")
            and key in ("DATABASE_URL", *(f"{c.upper()}_DATABASE_URL" for c in CONTEXTS))})
        results = {"engine": args.engine, "databases": label, "machine": machine(),
                   "hasher": HASHERS[args.hasher], "runs": args.runs,
                   "nats_sync_interval": "always" if args.nats_sync == "always" else "2m"}
        if peer_version:
            results["peer"] = f"FastStream {peer_version}"
        port = free_port()
        try:
            for name in SCENARIOS:
                if name not in scenarios:
                    continue
                sizes = {"drain": args.events, "drain-mixed": args.mixed_events}
                for events in sizes.get(name, [None]):
                    # The register scenario already takes the median of its ABBA rounds.
                    runs = []
                    for run in range(1 if name == "register" else args.runs):
                        print(f"{args.engine}, {label}: {name}"
                              f"{f' {events:,} events' if events else ''} (run {run + 1})",
                              file=sys.stderr)
                        reset_data()
                        reset_jetstream()
                        with Stack(env, workdir) as stack:
                            runs.append(run_scenario(name, stack, args, events, run, port,
                                                     nats.process.pid, workdir))
                    merged = median_of(runs)
                    if len(runs) > 1:
                        merged["runs"] = runs
                    if name in sizes:
                        results.setdefault(name.replace("-", "_"), {})[str(events)] = merged
                    else:
                        results[name] = merged
        finally:
            from django.db import connections

            connections.close_all()
            nats.stop()

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    # A grown-tables run on its own (minutes of prefill) keeps a file of its own, so that it does
    # not replace the drain, latency and register figures of the same engine.
    path = output / (f"{args.engine}{'-shared' if args.shared_database else ''}"
                     f"{'' if args.hasher == 'md5' else '-' + args.hasher}"
                     f"{'-sync-always' if args.nats_sync == 'always' else ''}"
                     f"{'-grown' if scenarios == {'grown'} else ''}.json")
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\n(results: {path})")


if __name__ == "__main__":
    main()

"""The grown scenario (PostgreSQL): the drain and the latency on empty tables and on tables
prefilled with N users' rows (``bench/grown.py``), in one run.
"""

from __future__ import annotations

import sys
import uuid

from backlog import publish_backlog
from harness import CONTEXTS, Stack, reset_data, reset_jetstream
from scenario_drain import ceiling_rate, drain_phase
from scenario_latency import scenario_latency


def grown_latency(stack: Stack, rate: float, seconds: float, port: int,
                  **options) -> dict:
    """The latency scenario's measurement (from a cold start, rows polled from outside), on
    PostgreSQL's tables as they are (grown or empty)."""
    return scenario_latency(stack, rate, seconds, port, "postgres", **options)


def scenario_grown(stack: Stack, prefill: int, events: int, batch: int, run: int, port: int,
                   rate: float, seconds: float, nats_pid: int | None = None,
                   ordered_ids: bool = False, latency_options: dict | None = None) -> dict:
    """The drain and the latency on empty tables and on tables grown by ``prefill`` users
    (bench/grown.py: their inbox and outbox rows and their default rows, before any pruning),
    in one run; the order alternates across runs, so drift over a run cancels out.

    Event ids are time-ordered (UUIDv7), as the project mints them; user ids random (uuid4),
    as accounts makes them. ``ordered_ids``: an experiment — user ids, prefilled and drained,
    time-ordered too. The latency scenario's registrations keep the project's ids.
    """
    import grown

    from onboarding.eventbus.ids import uuid7

    new_user_id = uuid7 if ordered_ids else uuid.uuid4
    parts = ["empty", "grown"] if run % 2 == 0 else ["grown", "empty"]
    result: dict = {"prefill_users": prefill, "events": events, "batch": batch,
                    "user_ids": "time-ordered (UUIDv7)" if ordered_ids else "random (uuid4)",
                    "event_ids": "time-ordered (UUIDv7)"}
    for part in parts:
        print(f"  grown: {part} tables", file=sys.stderr)
        reset_data()
        reset_jetstream()
        prefilled = prefill if part == "grown" else 0
        if prefilled:
            result["disk"] = grown.check_disk(prefill)
            result["prefill"] = grown.prefill(prefill, CONTEXTS, ordered=ordered_ids)
            result["sizes"] = grown.sizes(prefill, CONTEXTS)
        users = [new_user_id() for _ in range(events)]
        publish_backlog(events, users, uuid7)
        drained = drain_phase(stack, "project", batch, users, nats_pid, prefilled=prefilled,
                              counters=grown.server_counters)
        latency = grown_latency(stack, rate, seconds, port, **(latency_options or {}))
        if not prefilled:
            reset_data()
        # On grown tables the ceiling inserts beside the prefilled rows: how much of the fall
        # the business tables' growth explains (the ceiling writes no inbox).
        ceiling = ceiling_rate(events, batch)
        result[part] = {
            "drain_events_per_s": drained["events_per_s"],
            "drain_seconds": drained["seconds"],
            "drain_cpu_ms_per_event": drained["cpu_ms_per_event"],
            "per_consumer_events_per_s": drained["per_consumer_events_per_s"],
            # Where the database server's work went, per event drained (WAL, buffers).
            "server_per_event": {key: round(value / drained["events_drained"], 3)
                                 for key, value in drained["counters"].items()},
            "ceiling_events_per_s": round(ceiling),
            "latency": latency,
        }
    if not prefill:
        return result
    empty_ceiling = result["empty"]["ceiling_events_per_s"]
    for part in ("empty", "grown"):
        # One ceiling for both (empty tables'): the ratios fall exactly as the drain rate does.
        result[part]["ratio_to_ceiling"] = round(
            result[part]["drain_events_per_s"] / empty_ceiling, 3)
    result["drain_fall"] = round(
        1 - result["grown"]["drain_events_per_s"] / result["empty"]["drain_events_per_s"], 3)
    result["ceiling_fall"] = round(
        1 - result["grown"]["ceiling_events_per_s"] / empty_ceiling, 3)
    reset_data()  # TRUNCATE gives the prefill's gigabytes back to the disk
    return result

"""What a run prints: the markdown tables of docs/benchmarks.md, and the machine it ran on
(recorded in the results file)."""

from __future__ import annotations

import datetime as dt
import os
import platform

from harness import FAST_HASHER


def cpu_row(figures: dict, scenario: str) -> str:
    """The CPU each process spent per registration over a latency run, ms."""
    cpu = figures["cpu_ms_per_registration"]
    spent = ", ".join(f"{name} {ms:g}" for name, ms in cpu.items())
    return (f"| {scenario}: CPU ms per registration, since the stack was ready (total "
            f"{sum(cpu.values()):.1f}) | {spent} | — |")


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def markdown(results: dict) -> str:
    engine = results["engine"]
    lines = [f"### {engine}, {results.get('databases', '')} (drain, drain-mixed, latency, "
             f"erasure, relay: median of {results.get('runs', 1)} runs; register: median of its "
             "rounds)", "",
             f"nats-server `sync_interval`: {results.get('nats_sync_interval', '2m')}", "",
             "| scenario | result | target |", "| --- | --- | --- |"]
    for d in results.get("drain", {}).values():
        project = d["project"]
        peer = d.get("faststream")
        versus = (f" vs {results.get('peer', 'peer')} **{peer['ratio_to_ceiling']:.0%}**"
                  if peer else "")
        lines.append(f"| drain {d['events']:,} events, batch {d['batch']} | project "
                     f"**{project['ratio_to_ceiling']:.0%}** of the ceiling{versus} "
                     f"(ceiling {d['ceiling_events_per_s']:,} ev/s) | ≥ the peer's; aim ≥ 90% |")
    for d in results.get("drain_mixed", {}).values():
        m, r = d["mixed"], d["registrations"]
        lines.append(f"| drain, mixed: {d['events']:,} events ({mix_label(d)}), batch "
                     f"{d['batch']} | project **{m['events_per_s']:,} ev/s**, "
                     f"**{m['ratio_to_ceiling']:.0%}** of the registration ceiling, "
                     f"{m['ratio_to_mixed_ceiling']:.0%} of the mixed one "
                     f"({d['mixed_ceiling_events_per_s']:,} ev/s); registration-only in the "
                     f"same run {r['events_per_s']:,} ev/s, {r['ratio_to_ceiling']:.0%} "
                     f"(ceiling {d['ceiling_events_per_s']:,} ev/s); FastStream peer: n/a, "
                     "user.registered only | the registration drain must not fall |")
    if "latency" in results:
        la = results["latency"]
        lines.append(
            f"| latency, steady, at {la['rate_per_s']:g}/s ({la['steady']['count']} regs after "
            f"the warm-up; polled every {la['poll_tick_ms']:g} ms, intervals p50 "
            f"{la['poll_interval_p50_ms']} / p99 {la['poll_interval_p99_ms']} ms) | p50 "
            f"**{la['steady']['p50_ms']} ms**, p95 {la['steady']['p95_ms']}, p99 "
            f"**{la['steady']['p99_ms']} ms**, max {la['steady']['max_ms']} | p99 ≤ 25 |")
        for key, what in (("cold_first_20", "first 20"), ("cold_first_second", "first second")):
            c = la[key]
            lines.append(
                f"| latency, cold: the {what} after the stack is ready ({c['count']} regs; ready "
                f"{la['ready_after_s']} s after start) | p50 {c['p50_ms']} ms, p95 "
                f"{c['p95_ms']}, p99 {c['p99_ms']}, max **{c['max_ms']} ms** | ≤ 50 |")
        if "cpu_ms_per_registration" in la:
            lines.append(cpu_row(la, "latency"))
    if "readiness" in results:
        ra = results["readiness"]
        for key, what in (("endpoint_steady", "steady"), ("endpoint_cold_first_20",
                                                          "cold, the first 20")):
            c = ra[key]
            lines.append(
                f"| readiness: 201 → `complete: true` on GET /api/users/{{id}}/onboarding, "
                f"{what}, at {ra['rate_per_s']:g}/s ({c['count']} regs; each pending user "
                f"polled every {ra['endpoint_poll_interval_ms']:g} ms, rounds p50 "
                f"{ra['endpoint_round_p50_ms']} ms) | p50 **{c['p50_ms']} ms**, p95 "
                f"{c['p95_ms']}, p99 **{c['p99_ms']} ms**, max {c['max_ms']} | — |")
        s = ra["steady"]
        lines.append(
            f"| readiness run: 201 → the last service's rows (the same registrations) | p50 "
            f"{s['p50_ms']} ms, p99 {s['p99_ms']} ms | — |")
        if "cpu_ms_per_registration" in ra:
            lines.append(cpu_row(ra, "readiness"))
    if "erasure" in results:
        lines += erasure_rows(results["erasure"])
    if "register" in results:
        r = results["register"]
        hasher = results.get("hasher", FAST_HASHER).rsplit(".", 1)[-1]
        lines.append(f"| register: the endpoint's time (1 client, both modes interleaved, "
                     f"median; {hasher}) | "
                     f"{r['with_events_ms']} ms vs {r['without_events_ms']} ms without events: "
                     f"event costs **{r['event_time_fraction']:.1%}** | ≤ 10% |")
        if r.get("registrations_per_s_per_core"):
            lines.append(f"| register: web workers' CPU per registration ({hasher}) | "
                         f"{r['web_cpu_ms_per_request_with_events']} ms with events, "
                         f"{r['web_cpu_ms_per_request_without_events']} ms without: "
                         f"**{r['registrations_per_s_per_core']:g} registrations/s per core** "
                         "| — |")
        lines.append(f"| register: capacity (4 clients, everything on 2 cores) | "
                     f"{r['with_events_req_per_s']:,} vs {r['without_events_req_per_s']:,} "
                     f"req/s without events: event costs **{r['event_cost_fraction']:.1%}** "
                     "| — |")
    if "relay" in results:
        rl = results["relay"]
        lines.append(f"| relay {rl['rows']:,} rows | **{rl['events_per_s']:,} ev/s** | ≥ 5,000 |")
    if "grown" in results:
        g = results["grown"]
        grown_rate, empty_rate = (g[part]["drain_events_per_s"] for part in ("grown", "empty"))
        lines.append(f"| grown: drain {g['events']:,} events after {g['prefill_users']:,} users "
                     f"| {grown_rate:,} vs {empty_rate:,} ev/s on empty tables: falls "
                     f"**{g['drain_fall']:.0%}**; steady p99 "
                     f"{g['grown']['latency']['steady']['p99_ms']} vs "
                     f"{g['empty']['latency']['steady']['p99_ms']} ms "
                     "| fall ≤ 20% |")
    if results.get("drain"):
        lines += ["", f"Drain, side by side ({results.get('databases', '')}): from the moment "
                  "the four consumers, already started, are let loose on the backlog until every "
                  "row is visible, polled from outside; CPU over the same window, ms per event, "
                  "the four consumer processes together:", "",
                  "| backlog | drained by | ev/s | ratio to ceiling | players / characters / "
                  "progression / buildings ev/s | consumers CPU ms/ev | nats-server CPU ms/ev | "
                  "database server CPU ms/ev |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for d in results["drain"].values():
            lines.append(f"| {d['events']:,} | ceiling (bulk_create, 1 process, no NATS) | "
                         f"{d['ceiling_events_per_s']:,} | 100% | | | | |")
            for phase, who in (("project", "project (4 consumers)"),
                               ("faststream", f"{results.get('peer', 'peer')} (4 processes)")):
                if phase not in d:
                    continue
                x = d[phase]
                per = " / ".join(f"{v:,}" for v in x["per_consumer_events_per_s"].values())
                cpu = x["cpu_ms_per_event"]
                lines.append(f"| {d['events']:,} | {who} | {x['events_per_s']:,} | "
                             f"**{x['ratio_to_ceiling']:.0%}** | {per} | "
                             f"{cpu['consumers']:.2f} | {cpu.get('nats-server', 0):.2f} | "
                             + (f"{cpu['postgres']:.2f} |" if "postgres" in cpu else "— |"))
        for d in results["drain"].values():
            profiled = {phase: d[phase]["profile_ms_per_event"] for phase in
                        ("project", "faststream") if d.get(phase, {}).get("profile_ms_per_event")}
            if not profiled:
                continue
            lines += ["", f"Where the consumers' time goes, {d['events']:,} events (cProfile, "
                      "every thread, from the drain's start to the processes' exit; ms per "
                      "event, the four processes summed; the profiler inflates Python-heavy "
                      "parts, so compare shares, not totals):", "",
                      "| part | " + " | ".join(profiled) + " |",
                      "| --- | " + " | ".join("---" for _ in profiled) + " |"]
            for part in next(iter(profiled.values())):
                cells = [profiled[phase].get(part, 0) for phase in profiled]
                if any(cells):
                    lines.append(f"| {part} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    if results.get("drain_mixed"):
        lines += mixed_markdown(results)
    if "grown" in results:
        lines += grown_markdown(results["grown"])
    return "\n".join(lines)


def mix_label(d: dict) -> str:
    mix = d["mix"]
    return (f"{mix['registrations']:,} registrations, {mix['renames']:,} renames, "
            f"{mix['deletions']:,} deletions")


def erasure_rows(e: dict) -> list[str]:
    """The erasure scenario's rows in the summary table: steady, then cold."""
    s = e["steady"]
    lines = [f"| erasure, steady, at {e['rate_per_s']:g}/s ({s['count']} deletions after the "
             f"warm-up; 204 → the last of the four tombstones, polled every "
             f"{e['poll_tick_ms']:g} ms, intervals p50 {e['poll_interval_p50_ms']} / p99 "
             f"{e['poll_interval_p99_ms']} ms) | p50 **{s['p50_ms']} ms**, p95 {s['p95_ms']}, "
             f"p99 **{s['p99_ms']} ms**, max {s['max_ms']} | — |"]
    for key, what in (("cold_first_20", "first 20"), ("cold_first_second", "first second")):
        c = e[key]
        lines.append(f"| erasure, cold: the {what} after the stack is ready ({c['count']} "
                     f"deletions; ready {e['ready_after_s']} s after start) | p50 {c['p50_ms']} "
                     f"ms, p95 {c['p95_ms']}, p99 {c['p99_ms']}, max **{c['max_ms']} ms** | — |")
    return lines


def mixed_markdown(results: dict) -> list[str]:
    """The mixed drain beside the registration-only drain of the same run and the ceilings;
    the FastStream peer's ratio from the drain scenario of the same size, when it ran."""
    lines = ["", f"Mixed drain ({results.get('databases', '')}): registrations, renames and "
             "deletions in one backlog (per user in stream order), timed as the drain is; "
             "events are the stream's (a rename reaches players only), ratios to the same "
             "run's registration ceiling. The FastStream peer handles user.registered only: "
             "not run on the mixed backlog (its registration-only figure is the drain "
             "scenario's).", "",
             "| backlog | drained by | ev/s | ratio to ceiling | players / characters / "
             "progression / buildings ev/s | consumers CPU ms/ev | nats-server CPU ms/ev | "
             "database server CPU ms/ev |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in results["drain_mixed"].values():
        size = f"{d['events']:,}"
        lines.append(f"| {size} | ceiling, registrations (bulk_create, 1 process, no NATS) | "
                     f"{d['ceiling_events_per_s']:,} | 100% | | | | |")
        lines.append(f"| {size} | ceiling, mixed (bulk statements, 1 process, no NATS) | "
                     f"{d['mixed_ceiling_events_per_s']:,} | "
                     f"{d['mixed_ceiling_events_per_s'] / d['ceiling_events_per_s']:.0%} "
                     "| | | | |")
        for phase, who in (("registrations", "project, registrations only"),
                           ("mixed", f"project, mixed ({mix_label(d)})")):
            x = d[phase]
            per = " / ".join(f"{v:,}" for v in x["per_consumer_events_per_s"].values())
            cpu = x["cpu_ms_per_event"]
            lines.append(f"| {size} | {who} | {x['events_per_s']:,} | "
                         f"**{x['ratio_to_ceiling']:.0%}** | {per} | {cpu['consumers']:.2f} | "
                         f"{cpu.get('nats-server', 0):.2f} | "
                         + (f"{cpu['postgres']:.2f} |" if "postgres" in cpu else "— |"))
        peer = results.get("drain", {}).get(str(d["events"]), {}).get("faststream")
        lines.append(f"| {size} | {results.get('peer', 'FastStream peer')} | "
                     + (f"registrations only (drain scenario): {peer['events_per_s']:,} | "
                        f"{peer['ratio_to_ceiling']:.0%} of its run's ceiling | | | | |"
                        if peer else "n/a: user.registered only | | | | | | |"))
    return lines


def grown_markdown(g: dict) -> list[str]:
    """The grown scenario's tables: empty against grown, then what the grown tables weigh."""
    lines = ["", f"Grown tables: the same {g['events']:,}-event drain (project, 4 consumers, batch "
             f"{g['batch']}) and latency, on empty tables and after prefilling "
             f"{g['prefill_users']:,} users (inbox and outbox rows, users, default rows; "
             f"{g.get('user_ids', 'random')} user ids, {g.get('event_ids', 'random')} event ids); "
             "ratios to the empty tables' ceiling:", "",
             "| tables | drain ev/s | ratio to ceiling | consumers CPU ms/ev | ceiling ev/s | "
             "latency, steady p50 / p99 ms | server per event drained: WAL kB (full-page images), "
             "blocks read from the OS, buffers written by backends, checkpoints in the drain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for part in ("empty", "grown"):
        x = g[part]
        server = x["server_per_event"]
        lines.append(f"| {part} | {x['drain_events_per_s']:,} | {x['ratio_to_ceiling']:.0%} | "
                     f"{x['drain_cpu_ms_per_event']['consumers']:.2f} | "
                     f"{x['ceiling_events_per_s']:,} | {x['latency']['steady']['p50_ms']} / "
                     f"{x['latency']['steady']['p99_ms']} | {server['wal_bytes'] / 1000:.1f} "
                     f"({server['wal_full_page_images']:.2f}), {server['blocks_read']:.1f}, "
                     f"{server['buffers_written_by_backends']:.1f}, "
                     f"{server['checkpoints'] * g['events']:.0f} |")
    lines.append(f"| fall | **{g['drain_fall']:.0%}** | | | {g['ceiling_fall']:.0%} | | |")
    lines += ["", f"Sizes per million users (prefill {g['prefill']['seconds']} s; MB; B-tree "
              "levels in brackets):", "",
              "| database.table | heap | indexes | total | each index |",
              "| --- | --- | --- | --- | --- |"]
    for table, x in g["sizes"].items():
        each = ", ".join(
            f"{name} {i['mb_per_million']}" + (f" [{i['btree_levels']}]" if "btree_levels" in i
                                                else "")
            for name, i in x["indexes"].items())
        lines.append(f"| {table} | {x['table_mb_per_million']} | "
                     f"{x['indexes_mb_per_million']} | {x['total_mb_per_million']} | {each} |")
    return lines

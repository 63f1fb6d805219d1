"""The register scenario: the register endpoint with and without event publishing, in the same
run: its own time (one client, both modes interleaved) and its capacity (a closed loop of four
clients), with the relay running.
"""

from __future__ import annotations

import http.client
import statistics
import subprocess
import threading
import time

from harness import Stack, cpu_ms, http_register, progress, reset_data


def closed_loop(port: int, requests: int, concurrency: int, prefix: str) -> float:
    """Send ``requests`` registrations from ``concurrency`` clients; return requests/s."""
    counter = iter(range(requests))
    lock = threading.Lock()
    failures = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, payload, _ = http_register(conn, f"{prefix}{i}")
            if status != 201:
                failures.append(payload)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} failed registrations: {failures[:3]}")
    return requests / (time.monotonic() - started)


def web_cpu_ms(web: subprocess.Popen) -> float:
    """CPU the gunicorn master and its workers have used, in ms (Linux; 0 elsewhere)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(web.pid)], capture_output=True,
                             text=True).stdout
    except FileNotFoundError:
        return 0.0
    return cpu_ms(web.pid) + sum(cpu_ms(int(pid)) for pid in out.split())


# The endpoint's own time is measured with this pause after each request: what the relay and
# nats-server do for an event then happens beside the requests, not inside the next one (on two
# shared cores they would otherwise take its core).
REGISTER_GAP_SECONDS = 0.01


def interleaved_times(ports: dict[str, int], requests: int, prefix: str,
                      webs: dict[str, subprocess.Popen]) -> tuple[dict, dict]:
    """One client, one registration at a time, alternating between the servers (ABBA order):
    each mode's request times in ms, and its web workers' CPU per request in ms."""
    conns = {mode: http.client.HTTPConnection("127.0.0.1", port, timeout=60)
             for mode, port in ports.items()}
    modes = list(ports)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_before = {mode: web_cpu_ms(web) for mode, web in webs.items()}
    for i in range(requests):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            started = time.perf_counter()
            status, payload, _ = http_register(conns[mode], f"{prefix}{mode}{i}")
            times[mode].append((time.perf_counter() - started) * 1000)
            if status != 201:
                raise RuntimeError(f"registration failed: {status} {payload}")
            time.sleep(REGISTER_GAP_SECONDS)
    cpu = {mode: (web_cpu_ms(web) - cpu_before[mode]) / requests for mode, web in webs.items()}
    return times, cpu


def scenario_register(stack: Stack, requests: int, rounds: int, port: int) -> dict:
    from onboarding.dev.natsserver import free_port

    modes = ("with_events", "without_events")
    rates = {mode: [] for mode in modes}
    # The endpoint's own time: one client at a time, so nothing queues and each request's time is
    # what the web worker spends on it. Both servers run at once and the requests alternate
    # between them, so that both modes see the same machine: on a shared one, the time of a
    # whole round moves by more than the event costs.
    times = {mode: [] for mode in modes}
    round_fractions = []
    # The web workers' CPU per sequential request: with a slow hasher, what bounds
    # registrations per second per core.
    web_cpu = {mode: [] for mode in modes}
    sequential = min(300, requests)
    ports = {"with_events": port, "without_events": free_port()}
    for r in range(rounds):
        reset_data()
        # The relay runs for both, on the same cores: with OUTBOX_FAST_PATH=notify (PostgreSQL)
        # or wake (SQLite) it is what publishes, and its CPU is part of the event's cost.
        stack.manage("outbox_relay")
        webs = {mode: stack.gunicorn(ports[mode], ACCOUNTS_PUBLISH_EVENTS="true"
                                     if mode == "with_events" else "false") for mode in modes}
        for mode in modes:
            closed_loop(ports[mode], min(200, requests), 4, f"warm{mode}{r}")  # warm up
        got, cpu = interleaved_times(ports, sequential, f"seq{r}", webs)
        for mode in modes:
            times[mode] += got[mode]
            web_cpu[mode].append(cpu[mode])
        round_fractions.append(round(statistics.median(got["with_events"])
                                     / statistics.median(got["without_events"]) - 1, 3))
        # Capacity: each mode alone in a closed loop, ABBA order across rounds.
        for mode in modes if r % 2 == 0 else modes[::-1]:
            rates[mode].append(closed_loop(ports[mode], requests, 4, f"reg{mode}{r}"))
        progress("register", r + 1, rounds, time.monotonic())
        stack.stop()
    with_events = statistics.median(rates["with_events"])
    without = statistics.median(rates["without_events"])
    time_with = statistics.median(times["with_events"])
    time_without = statistics.median(times["without_events"])
    cpu_with = statistics.median(web_cpu["with_events"])
    return {
        "sequential_requests_per_round": sequential,
        "gap_after_each_request_s": REGISTER_GAP_SECONDS,
        "with_events_ms": round(time_with, 2),
        "without_events_ms": round(time_without, 2),
        "event_time_fraction": round(time_with / time_without - 1, 3),
        "event_time_fraction_rounds": round_fractions,
        "web_cpu_ms_per_request_with_events": round(cpu_with, 2),
        "web_cpu_ms_per_request_without_events": round(
            statistics.median(web_cpu["without_events"]), 2),
        # One core spends this much per registration in the web workers: how many it serves.
        "registrations_per_s_per_core": round(1000 / cpu_with, 1) if cpu_with else None,
        "requests_per_round": requests,
        "concurrency": 4,
        "gunicorn_workers": 2,
        "relay_running": True,
        "rounds": rounds,
        "with_events_rounds": [round(x) for x in rates["with_events"]],
        "without_events_rounds": [round(x) for x in rates["without_events"]],
        "with_events_req_per_s": round(with_events),
        "without_events_req_per_s": round(without),
        "event_cost_fraction": round(1 - with_events / without, 3),
    }

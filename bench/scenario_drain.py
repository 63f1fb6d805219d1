"""The drain scenario: a published backlog drained by the project's four consumers and by the
FastStream peer (``bench/peer_faststream.py``), each on its own durables and emptied tables,
against the bare ``bulk_create`` ceiling of the same rows; with ``--profile``, where the
consumers' time goes.

``drain_phase`` and ``ceiling_rate`` serve the grown scenario too (``scenario_grown.py``).
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

from backlog import hold_durables, publish_backlog, resume_durables, wait_bound
from harness import (
    CONTEXTS,
    ROOT,
    Stack,
    check_alive,
    cpu_ms,
    default_models,
    progress,
    reset_data,
)


def ceiling_rate(events: int, batch: int) -> float:
    """The same default rows, bulk_create in batches of ``batch``, one process, no NATS."""
    from django.conf import settings
    from django.db import transaction

    from buildings.defaults import STARTER_BUILDINGS
    from characters.defaults import DEFAULT_CHARACTER_NAME
    from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS

    models = default_models()

    users = [(uuid.uuid4(), f"ceil{i}") for i in range(events)]
    builders = {
        "players": lambda u, n: [models["players"](user_id=u, username=n)],
        "characters": lambda u, n: [models["characters"](
            user_id=u, name=DEFAULT_CHARACTER_NAME, is_active=True)],
        "progression": lambda u, n: [models["progression"](
            user_id=u, unlocked_weapons=list(STARTER_WEAPONS),
            unlocked_skills=list(STARTER_SKILLS))],
        "buildings": lambda u, n: [models["buildings"](user_id=u, kind=k, level=lv)
                                   for k, lv in STARTER_BUILDINGS],
    }
    started = time.monotonic()
    for name, build in builders.items():
        model, alias = models[name], settings.CONTEXT_DATABASES[name]
        for i in range(0, events, batch):
            rows = [row for u, n in users[i:i + batch] for row in build(u, n)]
            with transaction.atomic(using=alias):
                model.objects.using(alias).bulk_create(rows)
    return events / (time.monotonic() - started)


def server_cpu_ms(comm: str = "postgres") -> float:
    """CPU time of every live process named ``comm`` (a database server's backends), in ms.

    Backends that exit inside the window take their CPU with them; the drain's consumers keep
    theirs open, so what it counts is theirs plus the server's own processes (and the bench's
    poller, a few lookups every 20 ms)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    total += cpu_ms(int(entry.name))
            except OSError:
                continue
    return total


POLL_SECONDS = 0.02


def watch_drain(processes: list[subprocess.Popen], durables: list[str],
                users: list[uuid.UUID], batch: int, timeout: float, label: str,
                nats_pid: int | None = None, profiling: bool = False,
                prefilled: int = 0, counters=None, other_events: int = 0,
                not_received: dict[str, int] | None = None, drained=None) -> dict:
    """Release the held durables and watch the backlog drain from outside, as a user sees it:
    the moment each context's rows are all visible (committed), polled every 20 ms.

    ``users`` are the backlog's registrations; a mixed backlog (the mixed drain) has
    ``other_events`` more on the stream (renames, deletions), of which a context's durable
    receives all but ``not_received[context]``, and says with ``drained(context, model,
    last user)`` when a context's rows are as the whole backlog leaves them.

    The clock starts when the durables are resumed, with every consumer process already up and
    waiting on its durable (so process start-up is not counted, and all four start together).
    The probe is cheap, so as not to compete with the consumers for the two cores: an index
    lookup of the backlog's last user (committed last when a consumer commits in order),
    confirmed by a count. The consumers' CPU (``/proc``) is read over the same window, and so
    are ``counters()`` (cumulative numbers, e.g. the database server's), when given.
    """
    from django.db import connection as django_connection

    models = default_models()
    per_user = {"buildings": 2}
    done: dict[str, float] = {}

    def cpu() -> dict[str, float]:
        taken = {"consumers": sum(cpu_ms(p.pid) for p in processes)}
        if nats_pid:
            taken["nats-server"] = cpu_ms(nats_pid)
        if django_connection.vendor == "postgresql":
            taken["postgres"] = server_cpu_ms()
        return taken

    if profiling:
        for process in processes:
            process.send_signal(signal.SIGUSR1)  # bench/profiled.py: start profiling
        time.sleep(0.2)
    counted = counters() if counters else None
    cpu_start = cpu()
    started = time.monotonic()
    resume_durables(durables, users, batch)
    events, last_user = len(users) + other_events, users[-1]
    not_received = not_received or {}
    if drained is None:
        def drained(name, model, last_user):
            return model.objects.filter(user_id=last_user).exists() and (
                model.objects.count() // per_user.get(name, 1) >= len(users) + prefilled)
    progress(label, 0, events, started)
    while len(done) < len(models):
        now = time.monotonic()
        if now - started > timeout:
            raise TimeoutError(f"{label}: not drained after {timeout}s: done {sorted(done)}")
        check_alive(processes, label)
        for name, model in models.items():
            if name not in done and drained(name, model, last_user):
                done[name] = now
                progress(label, len(done) * events // len(models), events, started)
        if len(done) < len(models):
            time.sleep(POLL_SECONDS)
    cpu_end = cpu()
    seconds = max(done.values()) - started
    if counters:
        after = counters()
        counted = {key: after[key] - counted[key] for key in after}
    return {
        **({"counters": counted} if counters else {}),
        "events_drained": events,
        "events_per_s": round(events / max(seconds, 1e-6)),
        "per_consumer_events_per_s": {
            name: round((events - not_received.get(name, 0)) / max(done[name] - started, 1e-6))
            for name in models
        },
        "seconds": round(seconds, 3),
        "cpu_ms_per_event": {
            key: round((cpu_end[key] - cpu_start[key]) / events, 3) for key in cpu_end
        },
    }


def check_drained(events: int, inbox: bool, prefilled: int = 0) -> None:
    """Every default row once per user, nothing more (and one inbox row per event), beside the
    ``prefilled`` users' rows (the grown scenario's)."""
    from django.conf import settings

    from onboarding.eventbus.models import ProcessedEvent

    per_user = {"buildings": 2}
    for name, model in default_models().items():
        rows, users = model.objects.count(), model.objects.values("user_id").distinct().count()
        events_and_prefilled = events + prefilled
        expected = events_and_prefilled * per_user.get(name, 1)
        if rows != expected or users != events_and_prefilled:
            raise AssertionError(f"{name}: {rows} rows for {users} users, expected {expected} "
                                 f"rows for {events_and_prefilled}")
        if inbox:
            handled = ProcessedEvent.objects.using(settings.CONTEXT_DATABASES[name]).filter(
                consumer=name).count()
            if handled != events_and_prefilled:
                raise AssertionError(f"{name}: {handled} inbox rows, "
                                     f"expected {events_and_prefilled}")


def peer_available() -> str | None:
    """FastStream's version, or None when bench/requirements.txt is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faststream")
    except PackageNotFoundError:
        return None


# Where a consumer's time goes, from its cProfile: each part the cumulative time of the functions
# named (module path part, function name), minus that of those marked "-"; an indented part is
# inside the one above it.
PROFILE_ROWS = {
    "fetch (project: nats/pull.py; FastStream: nats-py's, incl. reading and parsing the "
    "messages)": [("onboarding/eventbus/nats/pull.py", "fetch"), ("nats/js/client.py", "fetch")],
    "decode + validate (project: parse_event)": [("onboarding/contracts.py", "parse_event")],
    "decode + validate (FastStream: JSON decoder, pydantic through fast-depends)": [
        ("faststream/nats/parser.py", "decode_batch"), ("fast_depends/core/model.py", "asolve"),
        ("-fast_depends/utils.py", "run_async")],  # asolve calls the handler through run_async
    "inbox statement (project: INSERT ... RETURNING)": [
        ("onboarding/eventbus/consumer/inbox.py", "inbox_claim")],
    "bulk_create (ORM build + INSERT)": [("django/db/models/query.py", "bulk_create")],
    "  of which compiling SQL (as_sql)": [("django/db/models/sql/compiler.py", "as_sql")],
    "insert_ignoring_conflicts (project: default rows and inbox, no ORM build)": [
        ("onboarding/eventbus/rows.py", "insert_ignoring_conflicts")],
    "the per-event log line (project: _log_handled)": [
        ("onboarding/eventbus/consumer/settling.py", "_log_handled")],
    "every SQL statement (Django cursor, driver, round trip)": [
        ("django/db/backends/utils.py", "_execute")],
    "commit": [("django/db/backends/base/base.py", "commit")],
    "acks": [("nats/aio/msg.py", "ack"), ("nats/aio/msg.py", "ack_sync")],
}
# Waiting for work, not doing it: the event loop's poll, an idle worker thread, sleeps.
IDLE = ("<method 'poll' of 'select.epoll' objects>", "<method 'get' of '_queue.SimpleQueue'",
        "<method 'acquire' of '_thread.lock'", "<built-in method time.sleep>")


def profile_summary(prefix: Path, events: int) -> dict[str, float]:
    """Profiled ms per event: the busy total and PROFILE_ROWS' parts (every process of a phase)."""
    import pstats

    files = sorted(str(f) for f in prefix.parent.glob(f"{prefix.name}*.prof"))
    if not files:
        return {}
    stats = pstats.Stats(*files).stats
    summary = {"busy (all but waiting for work; profiled, so inflated)": sum(
        tt for (_, _, name), (_, _, tt, _, _) in stats.items()
        if not any(name.startswith(idle) for idle in IDLE))}
    for label, parts in PROFILE_ROWS.items():
        summary[label] = 0.0
        for path, function in parts:
            sign = -1 if path.startswith("-") else 1
            summary[label] += sign * sum(
                ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                if path.lstrip("-") in file and name == function)
    return {label: round(seconds * 1000 / events, 3) for label, seconds in summary.items()}


def drain_phase(stack: Stack, phase: str, batch: int, users: list[uuid.UUID],
                nats_pid: int | None, profile_dir: Path | None = None,
                prefilled: int = 0, counters=None) -> dict:
    """One drain of the published backlog (``users``' events) by the project's consumers or by
    the peer, on empty default tables (the stream's messages stay: each phase has its own
    durables, and drains every event published so far) — or, with ``prefilled``, on the grown
    scenario's tables as they are."""
    if not prefilled:
        reset_data()
    if phase == "project":
        durables = list(CONTEXTS)  # setup_jetstream made them (reset_jetstream)
        hold_durables(durables)
        processes = [stack.manage("consume", context, "--batch", str(batch),
                                  profile=profile_dir and profile_dir / f"{phase}-{context}")
                     for context in CONTEXTS]
    else:
        durables = [f"peer-{context}" for context in default_models()]
        hold_durables(durables, create_for="user.registered")
        processes = [stack.python(ROOT / "bench" / "peer_faststream.py", context,
                                  "--durable", durable, "--batch", str(batch),
                                  profile=profile_dir and profile_dir / f"{phase}-{context}")
                     for context, durable in zip(default_models(), durables, strict=True)]
    wait_bound(durables, processes, timeout=60)
    result = watch_drain(processes, durables, users, batch, timeout=600, label=phase[:10],
                         nats_pid=nats_pid, profiling=bool(profile_dir), prefilled=prefilled,
                         counters=counters)
    stack.stop()
    check_drained(len(users), inbox=phase == "project", prefilled=prefilled)
    if profile_dir:
        # From the drain's start to the processes' exit, per event, the four processes summed.
        result["profile_ms_per_event"] = profile_summary(profile_dir / f"{phase}-",
                                                         len(users))
    return result


def scenario_drain(stack: Stack, events: int, batch: int, peer: bool, run: int = 0,
                   nats_pid: int | None = None, profile_dir: Path | None = None) -> dict:
    """The backlog, drained by the project's consumers and by the FastStream peer (same events,
    their own durables, emptied tables in between), then the ceiling of the same rows."""
    users = [uuid.uuid4() for _ in range(events)]
    publish_rate = publish_backlog(events, users)
    phases = ["project", "faststream"] if peer else ["project"]
    if run % 2:
        phases.reverse()  # alternate the order across runs, so drift over a run cancels out
    if profile_dir:
        profile_dir = profile_dir / f"{events}-run{run + 1}"
        profile_dir.mkdir(parents=True)
    drained = {phase: drain_phase(stack, phase, batch, users, nats_pid, profile_dir)
               for phase in phases}
    reset_data()
    ceiling = ceiling_rate(events, batch)
    result = {
        "events": events,
        "batch": batch,
        "publish_events_per_s": round(publish_rate),
        "ceiling_events_per_s": round(ceiling),
    }
    for phase in ("project", "faststream"):
        if phase in drained:
            result[phase] = {**drained[phase],
                             "ratio_to_ceiling": round(drained[phase]["events_per_s"] / ceiling, 3)}
    return result

"""Time from a registration's 201 to the last of the four services committing its defaults.

Runs against a stack that is already up (``make run``), with the same environment, so it reads
the same databases. Registrations go over HTTP at a steady rate; afterwards each default row's
``created_at`` (set inside the consumer's transaction, just before its commit) is compared with
the moment the client received the 201. Negative values mean the defaults were committed before
the 201 reached the client.

    DJANGO_PASSWORD_HASHERS=django.contrib.auth.hashers.MD5PasswordHasher \\
        REGISTER_THROTTLE_RATE= make run            # terminal 1 (fast hasher, no throttle)
    .venv/bin/python bench/latency.py -n 200 --rate 20   # terminal 2

Bounded: at most ``-n`` requests (default 100), to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")
# This process only reads the databases; with DEBUG off the settings still want a key.
os.environ.setdefault("DJANGO_SECRET_KEY", secrets.token_urlsafe(50))

import django  # noqa: E402

django.setup()

from django.db.models import Max  # noqa: E402

from buildings.models import Building  # noqa: E402
from characters.models import Character  # noqa: E402
from players.models import Player  # noqa: E402
from progression.models import MetaProgression  # noqa: E402

MODELS = (Player, Character, MetaProgression, Building)


def register(base_url: str, username: str) -> tuple[uuid.UUID, dt.datetime]:
    body = json.dumps(
        {"username": username, "email": f"{username}@example.com", "password": "bench-Pw-1234!"}
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/api/auth/register", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = json.loads(response.read())
        received = dt.datetime.now(dt.UTC)
        if response.status != 201:
            raise RuntimeError(f"{response.status}: {payload}")
    return uuid.UUID(payload["userId"]), received


def committed_at(user_id: uuid.UUID) -> dt.datetime | None:
    times = []
    for model in MODELS:
        latest = model.objects.filter(user_id=user_id).aggregate(t=Max("created_at"))["t"]
        if latest is None:
            return None
        times.append(latest)
    return max(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("-n", type=int, default=100, help="registrations (max 2000)")
    parser.add_argument("--rate", type=float, default=10.0, help="registrations per second")
    args = parser.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost")):
        parser.error("only loopback targets")
    n = min(args.n, 2000)

    prefix = uuid.uuid4().hex[:8]
    sent: list[tuple[uuid.UUID, dt.datetime]] = []
    start = time.monotonic()
    for i in range(n):
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent.append(register(args.url, f"bench_{prefix}_{i}"))

    deadline = time.monotonic() + 60
    latencies: list[float] = []
    pending = list(sent)
    while pending and time.monotonic() < deadline:
        still = []
        for user_id, received in pending:
            done = committed_at(user_id)
            if done is None:
                still.append((user_id, received))
            else:
                latencies.append((done - received).total_seconds() * 1000)
        pending = still
        if pending:
            time.sleep(0.2)
    print(f"registrations: {n} at {args.rate}/s; complete: {len(latencies)}; "
          f"missing after 60 s: {len(pending)}")
    if latencies:
        print("201 → all four defaults committed (ms): "
              f"p50 {statistics.median(latencies):.1f}, p95 {percentile(latencies, .95):.1f}, "
              f"p99 {percentile(latencies, .99):.1f}, max {max(latencies):.1f}")


if __name__ == "__main__":
    main()

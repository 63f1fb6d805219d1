"""What JetStream says of each durable: its counts, and whether anybody pulls from it.

Only reads (``consumer_info``, all the monitoring role may do), on a connection of its own.
"""

from __future__ import annotations

import asyncio

from django.conf import settings

from onboarding.eventbus.nats.connection import session
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.ops.labels import nats_label


def _seq(sequence_info, field: str = "stream_seq") -> int | None:
    return getattr(sequence_info, field, None) if sequence_info is not None else None


def _durable_entry(info) -> dict:
    delivered = info.delivered
    # The durable's last activity: its last delivery or its last ack, whichever is later.
    times = [getattr(x, "last_active", None) for x in (delivered, info.ack_floor)]
    last_active = max((t for t in times if t is not None), default=None)
    return {
        "pending": info.num_pending,
        "ack_pending": info.num_ack_pending,
        "redelivered": info.num_redelivered,
        "waiting": info.num_waiting,
        "delivered_seq": _seq(delivered),
        "ack_floor_seq": _seq(info.ack_floor),
        "last_active": last_active.isoformat() if last_active else None,
    }


def _looks_idle(entry: dict) -> bool:
    """Events wait, yet no pull request is open and nothing is in a client's hands."""
    return entry["pending"] > 0 and entry["waiting"] == 0 and entry["ack_pending"] == 0


async def _read_durables(js, names: list[str]) -> dict[str, dict | None]:
    from nats.js.errors import NotFoundError

    found: dict[str, dict | None] = {}
    for name in names:
        try:
            found[name] = _durable_entry(await js.consumer_info(settings.NATS_STREAM, name))
        except NotFoundError:
            found[name] = None
    return found


async def _durable_stats(names: list[str], *, idle_confirm: float) -> dict[str, dict | None]:
    """Each durable's figures, with ``stalled``: events pending and no client pulling.

    A running consumer always has a pull request open (``num_waiting`` > 0: its fetch waits up
    to a second) or a batch in hand (``num_ack_pending`` > 0), except for the instant between
    acking a batch and fetching the next. So a durable that looks idle is read again after
    ``idle_confirm`` seconds, and called stalled only if it still looks idle and its delivered
    sequence has not moved: a live consumer cannot stay in that instant for a second, while a
    stopped one stays there for ever. Only suspects are read twice, so a healthy check costs
    one read per durable.
    """
    async with session("onboarding-status", timeout=settings.NATS_REQUEST_TIMEOUT * 2) as nc:
        js = nc.jetstream(timeout=settings.NATS_REQUEST_TIMEOUT)
        stats = await _read_durables(js, names)
        suspects = [n for n, entry in stats.items() if entry is not None and _looks_idle(entry)]
        if suspects and idle_confirm > 0:
            await asyncio.sleep(idle_confirm)
            again = await _read_durables(js, suspects)
            for name in suspects:
                before, now = stats[name], again[name]
                if now is None:
                    stats[name] = None  # deleted in between: reported as missing
                    continue
                now["stalled"] = _looks_idle(now) and now["delivered_seq"] == before[
                    "delivered_seq"
                ]
                stats[name] = now
        for entry in stats.values():
            if entry is not None:
                entry.setdefault("stalled", bool(idle_confirm <= 0 and _looks_idle(entry)))
        return stats


def read_durables(names: list[str], *, idle_confirm: float) -> tuple[dict, str | None]:
    """(stats per durable, or all None; the error that kept NATS from answering, or None)."""
    try:
        return asyncio.run(_durable_stats(names, idle_confirm=idle_confirm)), None
    except NatsAccessError as exc:
        return dict.fromkeys(names), str(exc)
    except Exception as exc:
        return dict.fromkeys(names), (
            f"NATS unreachable at {nats_label()}: {type(exc).__name__}: {exc}"
        )

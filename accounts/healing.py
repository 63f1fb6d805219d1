"""Self-healing: the background reconcile the active relay runs every ``RECONCILE_INTERVAL``.

A broker can forget events it acknowledged: a wiped store, an R1 server's lost disk, the fsync
window (docs/deploy.md, "Durability of the broker"). The users whose ``user.registered`` was
lost never get a service's defaults, and nothing else would say so. Each pass finds them and
re-delivers, as ``manage.py reconcile --repair`` does, with no person involved.

What a pass reads is cheap, whatever the number of users:

- only users registered since the service's watermark (``HealingWatermark``) and older than
  ``RECONCILE_MIN_AGE`` (their event may still be on its way), through the index on
  ``date_joined``;
- only accounts' readiness projection (``ServiceReadiness``), never a service's database: a
  user is missing at a service when the service never announced it set them up (nor erased
  them). The relay needs no credentials of the services'.

A user missing at a service is re-delivered their ``user.registered``, to that service alone,
under ``reconcile``'s repair id (``accounts.reconcile.repair_event_id``: JetStream drops a copy
sent twice in its duplicate window). If the service did hold the defaults (its announcement was
lost instead), the repair changes nothing but makes it announce again: the projection heals
too. Then the watermark moves to the pass's ``until``; a user is re-delivered at most once by
the background reconcile.

Two states make a pass leave a service alone, the watermark where it was:

- the service's durable still has events to deliver (``num_pending`` or ``num_ack_pending``):
  it is catching up (down a while, or retrying a failure), and its users are on their way, not
  lost. Without this, every user registered during an outage would be sent twice;
- accounts' own durable has announcements to deliver: the projection is behind, and every
  service would look missing.

What it does not see: defaults lost *after* they were applied (a service's database restored
from a backup): the projection still says ready. That is the full ``manage.py reconcile``'s,
which reads the services' own rows. Nor users registered before the first pass's look-back
(``FIRST_LOOKBACK``; the upgrade runs the full reconcile once).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from accounts.models import HealingWatermark, ServiceReadiness, User
from accounts.reconcile import EVENT_COLUMNS, repair_event_id
from accounts.services import user_registered_event
from onboarding.eventbus.deadletters.redelivery import Redelivery, redeliver, redeliveries_record
from onboarding.eventbus.registry import get_consumers
from onboarding.eventbus.runtime import metrics
from onboarding.readiness import onboarding_services

logger = logging.getLogger(__name__)

# Where a service's first pass starts: users registered earlier are the full reconcile's.
FIRST_LOOKBACK = dt.timedelta(days=1)
CHUNK_SIZE = 500  # users read and re-delivered at a time
# The consumer that keeps the readiness projection (accounts/consumers.py).
PROJECTION_CONSUMER = "accounts"


@dataclass
class ServiceHealing:
    """What one pass did for one service."""

    service: str
    missing: int = 0  # users found never set up, each re-delivered their user.registered
    already_sent: int = 0  # of those, dropped by JetStream: the same repair is in the stream
    skipped: str | None = None  # why the service was left for the next pass
    reached: dt.datetime | None = None  # the watermark after the pass


@dataclass
class HealingPass:
    """What one pass did, per service; the relay logs :meth:`summary` and counts ``missing``."""

    services: list[ServiceHealing]

    @property
    def missing(self) -> int:
        return sum(healing.missing for healing in self.services)

    def summary(self) -> str:
        parts = []
        for healing in self.services:
            if healing.skipped:
                parts.append(f"{healing.service} skipped: {healing.skipped}")
            elif healing.missing:
                parts.append(f"{healing.service}: {healing.missing} user(s) never set up, "
                             "re-delivered" + (f" ({healing.already_sent} already sent)"
                                               if healing.already_sent else ""))
            else:
                parts.append(f"{healing.service}: nothing missing")
        return "; ".join(parts)


def watermark_of(*, service: str, until: dt.datetime) -> dt.datetime:
    row = HealingWatermark.objects.filter(service=service).first()
    return row.reached if row is not None else until - FIRST_LOOKBACK


def watermark_set(*, service: str, reached: dt.datetime) -> None:
    HealingWatermark.objects.update_or_create(service=service, defaults={"reached": reached})


def healing_candidates(
    *, service: str, after: dt.datetime, until: dt.datetime,
    cursor: tuple[dt.datetime, uuid.UUID] | None = None, limit: int = CHUNK_SIZE,
) -> list[User]:
    """Users registered in ``(after, until]`` whom ``service`` never announced it set up (nor
    erased), in (date_joined, id) order from ``cursor`` (keyset: one indexed query a chunk)."""
    settled = ServiceReadiness.objects.filter(user_id=OuterRef("pk"), service=service).filter(
        Q(onboarded_at__isnull=False) | Q(erased_at__isnull=False))
    users = User.objects.filter(date_joined__gt=after, date_joined__lte=until).exclude(
        Exists(settled))
    if cursor is not None:
        joined, pk = cursor
        users = users.filter(Q(date_joined__gt=joined) | Q(date_joined=joined, pk__gt=pk))
    return list(users.only(*EVENT_COLUMNS).order_by("date_joined", "pk")[:limit])


async def _to_deliver(js, durable: str) -> int:
    """Events the durable has yet to deliver or to see acknowledged."""
    info = await js.consumer_info(settings.NATS_STREAM, durable)
    return (info.num_pending or 0) + (info.num_ack_pending or 0)


async def healing_pass(nc, js, call, *, now: dt.datetime | None = None) -> HealingPass:
    """One pass over every service with ``DEFAULTS``; ``call(fn, **kwargs)`` runs ``fn`` where
    the ORM may run. Raises if NATS or the database fails: the watermarks of the services not
    done stay, and the next pass does them (what was sent is deduplicated by JetStream)."""
    now = now or timezone.now()
    until = now - dt.timedelta(seconds=settings.RECONCILE_MIN_AGE)
    consumers = get_consumers()
    services = onboarding_services()
    if PROJECTION_CONSUMER in consumers:
        behind = await _to_deliver(js, consumers[PROJECTION_CONSUMER].durable)
        if behind:
            metrics.reconcile_skipped(PROJECTION_CONSUMER)
            why = f"accounts' projection is behind ({behind} announcement(s) to deliver)"
            return HealingPass([ServiceHealing(service, skipped=why) for service in services])
    results = []
    for service in services:
        healing = ServiceHealing(service)
        results.append(healing)
        behind = await _to_deliver(js, consumers[service].durable)
        if behind:
            metrics.reconcile_skipped(service)
            healing.skipped = f"catching up ({behind} event(s) to deliver)"
            continue
        after = await call(watermark_of, service=service, until=until)
        cursor = None
        while users := await call(healing_candidates, service=service, after=after,
                                  until=until, cursor=cursor):
            repairs = [
                Redelivery(consumer=service, event=user_registered_event(user=user),
                           event_id=repair_event_id(service=service, user_id=user.pk, now=now))
                for user in users
            ]
            acks = await redeliver(nc, js, repairs)
            await call(redeliveries_record, repairs, acks)  # an erasure deletes them too
            healing.missing += len(users)
            healing.already_sent += sum(1 for ack in acks if ack.duplicate)
            metrics.reconcile_missing(service, len(users))
            cursor = (users[-1].date_joined, users[-1].pk)
        await call(watermark_set, service=service, reached=until)
        healing.reached = until
    return HealingPass(results)

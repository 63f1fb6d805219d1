"""Self-healing (issue 19): the active relay's background reconcile re-delivers what a broker
forgot, with no person running a command. Real nats-server, real databases."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from django.core.management import call_command
from django.utils import timezone

from accounts.healing import healing_candidates
from accounts.models import HealingWatermark, ServiceReadiness, User
from accounts.services import user_register
from conftest import run_async, wait_until
from onboarding.readiness import onboarding_services
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def _ready_everywhere() -> int:
    """Users ready at every service in accounts' projection."""
    services = onboarding_services()
    ready = {}
    for row in ServiceReadiness.objects.filter(onboarded_at__isnull=False,
                                               erased_at__isnull=True):
        ready.setdefault(row.user_id, set()).add(row.service)
    return sum(1 for found in ready.values() if found >= set(services))


def _wipe_the_stream() -> None:
    """What a broker that lost its store looks like once re-provisioned: the stream and every
    durable made anew, empty; the events it had acknowledged, gone."""
    from django.conf import settings

    async def delete(js):
        await js.delete_stream(settings.NATS_STREAM)

    run_async(delete)
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))


def test_events_the_broker_forgot_are_healed_with_no_command(start_consumers, settings, caplog):
    settings.RECONCILE_INTERVAL = 1.0
    settings.RECONCILE_MIN_AGE = 1.0
    caplog.set_level(logging.INFO, logger="onboarding.eventbus.outbox.healing")
    # The stack: the relay, accounts' consumer (the projection), every service.
    services = start_consumers(onboarding_services())
    start_consumers(["accounts"])
    relay = start_consumers.started[0].relay
    for i in range(3):
        user_register(username=f"before{i}", email=f"before{i}@example.com", password="x")
    wait_until(lambda: _ready_everywhere() == 3, timeout=30, message="the first users ready")
    wait_until(lambda: relay.healing.passes >= 1 and relay.healing.last.missing == 0,
               timeout=20, message="a pass that found nothing missing")

    # The services go down; five registrations reach the stream and wait there.
    services.stop()
    for i in range(5):
        user_register(username=f"lost{i}", email=f"lost{i}@example.com", password="x")
    wait_until(lambda: _skipped_as_catching_up(relay), timeout=20,
               message="a pass that leaves the services with a backlog alone")
    assert counts() == complete_count(3)

    # The broker forgets them: its store wiped, then provisioned again. The services come back
    # to an empty stream, and nobody runs reconcile.
    _wipe_the_stream()
    start_consumers(onboarding_services())
    wait_until(lambda: counts() == complete_count(8), timeout=60,
               message="the forgotten users' defaults, made by the background reconcile")
    wait_until(lambda: _ready_everywhere() == 8, timeout=30, message="all eight ready")
    healed = [r.getMessage() for r in caplog.records if "never set up" in r.getMessage()]
    assert healed and "re-delivered" in healed[0], healed
    assert sum(HealingWatermark.objects.filter(service=s).count()
               for s in onboarding_services()) == len(onboarding_services())
    # Healed once: a later pass finds nothing missing.
    passes = relay.healing.passes
    wait_until(lambda: relay.healing.passes > passes + 1, timeout=20, message="two more passes")
    assert relay.healing.last.missing == 0
    assert counts() == complete_count(8)


def _skipped_as_catching_up(relay) -> bool:
    last = relay.healing.last
    return last is not None and all(
        healing.skipped and "catching up" in healing.skipped for healing in last.services)


def test_the_candidates_are_the_users_a_service_never_announced(settings):
    """Since the watermark, older than the minimum age, neither ready nor erased there."""
    now = timezone.now()
    users = {name: user_register(username=name, email=f"{name}@example.com", password="x")
             for name in ("ready", "erased", "waiting", "other-service")}
    young = user_register(username="young", email="young@example.com", password="x")
    User.objects.filter(pk__in=[u.pk for u in users.values()]).update(
        date_joined=now - dt.timedelta(minutes=5))
    ServiceReadiness.objects.bulk_create([
        ServiceReadiness(user_id=users["ready"].pk, service="players", onboarded_at=now),
        ServiceReadiness(user_id=users["erased"].pk, service="players", erased_at=now),
        ServiceReadiness(user_id=users["waiting"].pk, service="players"),
        ServiceReadiness(user_id=users["other-service"].pk, service="buildings",
                         onboarded_at=now),
    ])
    until = now - dt.timedelta(seconds=60)
    found = healing_candidates(service="players", after=now - dt.timedelta(hours=1),
                               until=until)
    assert {user.username for user in found} == {"waiting", "other-service"}
    assert young.pk not in {user.pk for user in found}
    # Chunked by keyset: the same users, one at a time.
    cursor, paged = None, []
    while chunk := healing_candidates(service="players", after=now - dt.timedelta(hours=1),
                                      until=until, cursor=cursor, limit=1):
        paged += chunk
        cursor = (chunk[-1].date_joined, chunk[-1].pk)
    assert [u.pk for u in paged] == [u.pk for u in found]
    # Past the watermark: nothing.
    assert healing_candidates(service="players", after=until, until=until) == []

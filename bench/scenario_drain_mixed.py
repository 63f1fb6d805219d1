"""The mixed drain: a backlog of registrations, renames and deletions (``--mix``, by default 70%
/ 15% / 15% of ``--mixed-events``; renames and deletions of the backlog's own users, after their
registration, a deletion after the user's rename: ``backlog.mixed_backlog``) drained by the
project's four consumers, beside a registration-only backlog of the same size drained in the
same run, and against two ceilings.

Timed as the drain scenario times it (``watch_drain``): the four ``consume`` processes started
and bound to their held durables, the clock started when the durables are resumed (with one more
batch of registrations, the kick), stopped when every context's rows are as the backlog leaves
them, polled from outside: the kick's last user there, then the context's rows counted (the
registered users minus the deleted ones) and its tombstones (every deleted user). Afterwards:
every durable settled on the stream (nothing pending, nothing unacknowledged), every row, name,
tombstone and inbox row as expected.

The ceilings, one process, no NATS, no inbox, batches of ``--batch`` of each context's own
events in stream order, one transaction each: the registration-only one of the drain scenario
(``bulk_create`` of the default rows), and a mixed one (in each batch, ``bulk_create`` of the
registrations' rows, one ``UPDATE ... CASE`` for the renames, ``bulk_create`` of the tombstones
and one ``DELETE ... WHERE user_id IN`` per table for the deletions).

The FastStream peer (``bench/peer_faststream.py``) handles ``user.registered`` only: it is not
run here; the drain scenario compares it on the registration-only backlog.
"""

from __future__ import annotations

import time
import uuid

from backlog import (
    MixedBacklog,
    hold_durables,
    mixed_backlog,
    on_jetstream,
    publish_backlog,
    publish_mixed_backlog,
    wait_bound,
)
from harness import CONTEXTS, Stack, default_models, reset_data, reset_jetstream
from scenario_drain import ceiling_rate, drain_phase, watch_drain

PEER_NOTE = ("not run: bench/peer_faststream.py handles user.registered only; the drain "
             "scenario compares it on a registration-only backlog")
PER_USER = {"buildings": 2}


def subjects_of(context: str) -> set[str]:
    from onboarding.eventbus.registry import get_consumers

    return set(get_consumers()[context].subjects)


def tombstone_count(context: str, alias: str) -> int:
    from onboarding.eventbus.models import Tombstone

    return Tombstone.objects.using(alias).filter(context=context).count()


def mixed_phase(stack: Stack, batch: int, backlog: MixedBacklog, nats_pid: int | None) -> dict:
    """The project's consumers drain the published mixed backlog, on emptied tables."""
    from django.conf import settings

    reset_data()
    durables = list(CONTEXTS)
    hold_durables(durables)
    processes = [stack.manage("consume", context, "--batch", str(batch))
                 for context in CONTEXTS]
    wait_bound(durables, processes, timeout=60)
    users = list(backlog.registered)  # resume_durables appends the kick's users
    alive = len(backlog.registered) - len(backlog.deleted)
    others = len(backlog.plan) - len(backlog.registered)
    not_received = {name: sum(subject not in subjects_of(name) for subject, _, _ in backlog.plan)
                    for name in default_models()}

    def drained(name, model, last_user) -> bool:
        kicked = len(users) - len(backlog.registered)
        return (model.objects.filter(user_id=last_user).exists()
                and model.objects.count() == (alive + kicked) * PER_USER.get(name, 1)
                and tombstone_count(name, settings.CONTEXT_DATABASES[name])
                == len(backlog.deleted))

    result = watch_drain(processes, durables, users, batch, timeout=600, label="mixed",
                         nats_pid=nats_pid, other_events=others, not_received=not_received,
                         drained=drained)
    result["durables_settled"] = wait_settled(durables, timeout=30)
    stack.stop()
    check_mixed(backlog, kicked=len(users) - len(backlog.registered))
    return result


def wait_settled(durables: list[str], timeout: float) -> bool:
    """Until every durable has nothing pending and nothing unacknowledged (the acks follow the
    commits the drain's clock stopped on)."""
    from django.conf import settings

    async def unsettled(js):
        infos = [await js.consumer_info(settings.NATS_STREAM, d) for d in durables]
        return [i.name for i in infos if (i.num_pending or 0) or (i.num_ack_pending or 0)]

    deadline = time.monotonic() + timeout
    while left := on_jetstream(unsettled):
        if time.monotonic() > deadline:
            raise TimeoutError(f"mixed: durables not settled after {timeout}s: {left}")
        time.sleep(0.1)
    return True


def check_mixed(backlog: MixedBacklog, kicked: int) -> None:
    """Each context as the backlog leaves it: the registered users' rows (and the kick's) but
    the deleted ones', a tombstone per deleted user, the renamed players' new names, one inbox
    row per event its durable receives."""
    from django.conf import settings

    from onboarding.eventbus.models import ProcessedEvent, Tombstone
    from players.models import Player

    alive = len(backlog.registered) - len(backlog.deleted) + kicked
    deleted = sorted(backlog.deleted)
    for name, model in default_models().items():
        alias = settings.CONTEXT_DATABASES[name]
        rows, users = model.objects.count(), model.objects.values("user_id").distinct().count()
        if rows != alive * PER_USER.get(name, 1) or users != alive:
            raise AssertionError(f"mixed: {name}: {rows} rows for {users} users, expected "
                                 f"{alive * PER_USER.get(name, 1)} for {alive}")
        for start in range(0, len(deleted), 500):
            if model.objects.filter(user_id__in=deleted[start:start + 500]).exists():
                raise AssertionError(f"mixed: {name}: a deleted user's rows are left")
        erased = Tombstone.objects.using(alias).filter(context=name).count()
        if erased != len(deleted):
            raise AssertionError(f"mixed: {name}: {erased} tombstones, expected {len(deleted)}")
        received = len(backlog.of_context(subjects_of(name))) + kicked
        handled = ProcessedEvent.objects.using(alias).filter(consumer=name).count()
        if handled != received:
            raise AssertionError(f"mixed: {name}: {handled} inbox rows, expected {received}")
    renamed = {user: username for user, username in backlog.renamed.items()
               if user not in backlog.deleted}
    found = Player.objects.filter(username__startswith="mixr").count()
    if found != len(renamed):
        raise AssertionError(f"mixed: {found} players renamed, expected {len(renamed)}")


def mixed_ceiling_rate(backlog: MixedBacklog, batch: int) -> float:
    """The mixed backlog's effect on each context with the plainest bulk statements: each
    context's own events in stream order, in batches of ``batch``, one transaction per batch:
    the registrations' rows (``bulk_create``), the renames (one ``UPDATE ... CASE``), the
    deletions (``bulk_create`` of the tombstones, one ``DELETE`` per table). One process, no
    NATS, no inbox; events/s of the whole backlog."""
    from django.conf import settings
    from django.db import transaction
    from django.db.models import Case, Value, When

    from buildings.defaults import STARTER_BUILDINGS
    from characters.defaults import DEFAULT_CHARACTER_NAME
    from onboarding.contracts import UserDeleted, UserRegistered, UserRenamed
    from onboarding.eventbus.models import Tombstone
    from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS

    models = default_models()
    names = {user: f"mix{i}" for i, user in enumerate(backlog.registered)}
    builders = {
        "players": lambda u: [models["players"](user_id=u, username=names[u])],
        "characters": lambda u: [models["characters"](
            user_id=u, name=DEFAULT_CHARACTER_NAME, is_active=True)],
        "progression": lambda u: [models["progression"](
            user_id=u, unlocked_weapons=list(STARTER_WEAPONS),
            unlocked_skills=list(STARTER_SKILLS))],
        "buildings": lambda u: [models["buildings"](user_id=u, kind=k, level=lv)
                                for k, lv in STARTER_BUILDINGS],
    }
    plans = {name: backlog.of_context(subjects_of(name)) for name in builders}
    started = time.monotonic()
    for name, build in builders.items():
        model, alias, plan = models[name], settings.CONTEXT_DATABASES[name], plans[name]
        for i in range(0, len(plan), batch):
            chunk = plan[i:i + batch]
            # Per user the stream's order is registration, rename, deletion: so is this.
            registered = [u for s, u, _ in chunk if s == UserRegistered.subject]
            renamed = {u: n for s, u, n in chunk if s == UserRenamed.subject}
            deleted = [u for s, u, _ in chunk if s == UserDeleted.subject]
            with transaction.atomic(using=alias):
                if registered:
                    model.objects.using(alias).bulk_create(
                        [row for u in registered for row in build(u)])
                if renamed:
                    model.objects.using(alias).filter(user_id__in=list(renamed)).update(
                        username=Case(*[When(user_id=u, then=Value(n))
                                        for u, n in renamed.items()]))
                if deleted:
                    Tombstone.objects.using(alias).bulk_create(
                        [Tombstone(context=name, user_id=u) for u in deleted])
                    model.objects.using(alias).filter(user_id__in=deleted).delete()
    return len(backlog.plan) / (time.monotonic() - started)


def scenario_drain_mixed(stack: Stack, events: int, batch: int, shares: tuple[int, int, int],
                         run: int = 0, nats_pid: int | None = None) -> dict:
    """A registration-only backlog of ``events`` and a mixed one of the same size, each drained
    by the project's consumers on a fresh stream and emptied tables (their order alternates
    from run to run), then the two ceilings."""
    backlog = mixed_backlog(events, shares, seed=17 + run)
    drained = {}
    for phase in (["registrations", "mixed"] if run % 2 == 0 else ["mixed", "registrations"]):
        reset_data()
        reset_jetstream()
        if phase == "registrations":
            users = [uuid.uuid4() for _ in range(events)]
            rate = publish_backlog(events, users)
            drained[phase] = drain_phase(stack, "project", batch, users, nats_pid)
        else:
            rate = publish_mixed_backlog(backlog)
            drained[phase] = mixed_phase(stack, batch, backlog, nats_pid)
        drained[phase]["publish_events_per_s"] = round(rate)
    reset_data()
    ceiling = ceiling_rate(events, batch)
    reset_data()
    mixed_ceiling = mixed_ceiling_rate(backlog, batch)
    reset_data()
    renamed_and_deleted = len(set(backlog.renamed) & backlog.deleted)
    registrations, mixed = drained["registrations"], drained["mixed"]
    return {
        "events": events,
        "batch": batch,
        "mix": {"registrations": len(backlog.registered), "renames": len(backlog.renamed),
                "deletions": len(backlog.deleted), "renamed_and_deleted": renamed_and_deleted},
        "ceiling_events_per_s": round(ceiling),
        "mixed_ceiling_events_per_s": round(mixed_ceiling),
        "registrations": {**registrations,
                          "ratio_to_ceiling": round(registrations["events_per_s"] / ceiling, 3)},
        "mixed": {**mixed,
                  "ratio_to_ceiling": round(mixed["events_per_s"] / ceiling, 3),
                  "ratio_to_mixed_ceiling": round(mixed["events_per_s"] / mixed_ceiling, 3)},
        "mixed_to_registrations": round(
            mixed["events_per_s"] / max(registrations["events_per_s"], 1), 3),
        "peer": PEER_NOTE,
    }

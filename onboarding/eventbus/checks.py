"""System checks for the eventbus settings (``manage.py check``)."""

from django.conf import settings
from django.core.checks import Error, Warning, register


@register()
def check_eventbus_settings(app_configs, **kwargs):
    problems = []
    if settings.NATS_DUPLICATE_WINDOW > settings.NATS_STREAM_MAX_AGE:
        problems.append(
            Error(
                "NATS_DUPLICATE_WINDOW may not exceed NATS_STREAM_MAX_AGE (JetStream refuses it).",
                id="eventbus.E001",
            )
        )
    # The relay republishes a row the fast path published but could not mark after its grace
    # period; JetStream only drops that copy if it arrives within the duplicate window.
    from onboarding.eventbus.outbox.store import MARK_COALESCE_SECONDS

    marking = 4 * MARK_COALESCE_SECONDS
    if settings.OUTBOX_FAST_PATH not in ("auto", "notify", "wake", "publish"):
        problems.append(
            Error("OUTBOX_FAST_PATH must be auto, notify, wake or publish.", id="eventbus.E003")
        )
    # The relay's fast paths each need their database: notify, PostgreSQL's LISTEN/NOTIFY; wake,
    # SQLite's one writer at a time, which commits rows in id order (the relay reads the rows
    # above the last it handed over).
    needs = {
        "notify": ("postgresql", "needs PostgreSQL (LISTEN/NOTIFY) for the outbox database; use "
                   "auto or publish.", "eventbus.E004"),
        "wake": ("sqlite", "needs SQLite for the outbox database; use auto (notify on "
                 "PostgreSQL) or publish.", "eventbus.E014"),
    }
    if settings.OUTBOX_FAST_PATH in needs:
        from django.db import connections

        from onboarding.eventbus.models import OUTBOX_DATABASE

        vendor, why, check_id = needs[settings.OUTBOX_FAST_PATH]
        if connections[OUTBOX_DATABASE].vendor != vendor:
            problems.append(Error(f"OUTBOX_FAST_PATH={settings.OUTBOX_FAST_PATH} {why}",
                                  id=check_id))
    if settings.OUTBOX_PUBLISH_ON_COMMIT and settings.OUTBOX_RELAY_GRACE < marking:
        problems.append(
            Warning(
                "OUTBOX_RELAY_GRACE is shorter than the time the on-commit path takes to mark "
                "rows published: the relay will publish most events a second time.",
                id="eventbus.W003",
            )
        )
    if settings.NATS_DUPLICATE_WINDOW < 10 * settings.OUTBOX_RELAY_GRACE:
        problems.append(
            Warning(
                "NATS_DUPLICATE_WINDOW is short next to OUTBOX_RELAY_GRACE: events republished "
                "by the relay may reach consumers twice (the inbox still skips them).",
                id="eventbus.W001",
            )
        )
    if not settings.ACCOUNTS_PUBLISH_EVENTS:
        problems.append(
            Warning(
                "ACCOUNTS_PUBLISH_EVENTS is off: registrations are not announced and no "
                "service creates the new users' defaults. Only for benchmarks.",
                id="eventbus.W002",
            )
        )
    if settings.NATS_PING_INTERVAL <= 0 or settings.NATS_MAX_OUTSTANDING_PINGS < 1:
        problems.append(Error(
            "NATS_PING_INTERVAL must be above 0 and NATS_MAX_OUTSTANDING_PINGS at least 1: "
            "without pings a connection that died silently is never noticed.",
            id="eventbus.E020"))
    if settings.CONSUMER_MAX_DELIVER < 1:
        problems.append(Error("CONSUMER_MAX_DELIVER must be at least 1.", id="eventbus.E002"))
    return problems


@register()
def check_bounded_contexts(app_configs, **kwargs):
    """Every app that declares SUBSCRIPTIONS is a bounded context with its own database alias,
    and every bounded context the settings derived is such an app.

    The settings derive the contexts from INSTALLED_APPS before the apps load, by looking for a
    ``consumers`` module beside each entry (``onboarding.databases.bounded_contexts``). What
    that cannot see — an ``AppConfig`` path or a custom label, a ``consumers.py`` without
    ``SUBSCRIPTIONS`` — would otherwise send an inbox to the wrong database without a word.
    """
    from django.apps import apps

    from onboarding.eventbus.registry import get_consumers

    problems = []
    consumers = get_consumers()
    contexts = tuple(settings.BOUNDED_CONTEXTS)
    for name in consumers:
        # accounts consumes in default, its own database (onboarding.databases.configure).
        home = settings.CONTEXT_DATABASES.get(name) == "default" and name not in contexts
        if not home and (name not in contexts or name not in settings.CONTEXT_DATABASES):
            entry = apps.get_app_config(name).name
            problems.append(Error(
                f"app {name!r} declares SUBSCRIPTIONS but is not a bounded context: it has no "
                f"database of its own (its inbox would land in another service's database).",
                hint=f"List the app as {entry!r} in INSTALLED_APPS (not an AppConfig path), "
                     f"with its default label, so that settings find {entry}.consumers.",
                id="eventbus.E010",
            ))
    for name in contexts:
        if name in consumers:
            continue
        if name not in {config.label for config in apps.get_app_configs()}:
            problems.append(Error(
                f"bounded context {name!r} (derived from INSTALLED_APPS) is no installed app's "
                f"label.",
                hint="Keep the app's default label (the last part of its name).",
                id="eventbus.E011",
            ))
        else:
            problems.append(Error(
                f"app {name!r} has a consumers module but declares no SUBSCRIPTIONS: it got a "
                f"database, but nothing consumes for it.",
                hint="Declare SUBSCRIPTIONS in its consumers.py, or remove the module.",
                id="eventbus.E012",
            ))
    for name, alias in settings.CONTEXT_DATABASES.items():
        if alias not in settings.DATABASES:
            problems.append(Error(
                f"bounded context {name!r} is routed to database {alias!r}, which is not in "
                f"DATABASES.",
                id="eventbus.E013",
            ))
    return problems

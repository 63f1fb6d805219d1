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
    from onboarding.eventbus.publisher import MARK_COALESCE_SECONDS

    marking = 4 * MARK_COALESCE_SECONDS
    if settings.OUTBOX_FAST_PATH not in ("auto", "notify", "publish"):
        problems.append(
            Error("OUTBOX_FAST_PATH must be auto, notify or publish.", id="eventbus.E003")
        )
    if settings.OUTBOX_FAST_PATH == "notify":
        from django.db import connections

        from onboarding.eventbus.outbox import OUTBOX_DATABASE

        if connections[OUTBOX_DATABASE].vendor != "postgresql":
            problems.append(
                Error(
                    "OUTBOX_FAST_PATH=notify needs PostgreSQL (LISTEN/NOTIFY) for the outbox "
                    "database; use auto or publish.",
                    id="eventbus.E004",
                )
            )
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
    if settings.CONSUMER_MAX_DELIVER < 1:
        problems.append(Error("CONSUMER_MAX_DELIVER must be at least 1.", id="eventbus.E002"))
    return problems

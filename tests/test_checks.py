"""`manage.py check` catches eventbus settings that would fail at run time or waste work."""

from __future__ import annotations

from django.db import connections

from onboarding.eventbus.checks import check_eventbus_settings


def ids() -> set[str]:
    return {problem.id for problem in check_eventbus_settings(None)}


def test_the_default_settings_pass():
    assert not {i for i in ids() if i.startswith("eventbus.E")}


def test_a_duplicate_window_longer_than_the_stream_is_an_error(settings):
    settings.NATS_DUPLICATE_WINDOW = settings.NATS_STREAM_MAX_AGE + 1
    assert "eventbus.E001" in ids()


def test_an_unknown_fast_path_is_an_error(settings):
    settings.OUTBOX_FAST_PATH = "carrier-pigeon"
    assert "eventbus.E003" in ids()


def test_notify_without_postgresql_is_an_error(settings):
    settings.OUTBOX_FAST_PATH = "notify"
    expected = connections["default"].vendor != "postgresql"
    assert ("eventbus.E004" in ids()) is expected


def test_a_grace_shorter_than_marking_is_a_warning(settings):
    settings.OUTBOX_RELAY_GRACE = 0.1
    assert "eventbus.W003" in ids()

"""`manage.py check` catches eventbus settings that would fail at run time or waste work."""

from __future__ import annotations

import environ
import pytest
from django.core.checks import run_checks
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


def test_wake_without_sqlite_is_an_error(settings):
    settings.OUTBOX_FAST_PATH = "wake"
    assert "eventbus.E003" not in ids()
    expected = connections["default"].vendor != "sqlite"
    assert ("eventbus.E014" in ids()) is expected


def test_a_grace_shorter_than_marking_is_a_warning(settings):
    settings.OUTBOX_RELAY_GRACE = 0.1
    assert "eventbus.W003" in ids()


# --- accounts: the throttles' cache (manage.py check --deploy) -------------------------------


def throttle_cache_ids() -> set[str]:
    from accounts.checks import check_throttle_cache_is_shared

    return {problem.id for problem in check_throttle_cache_is_shared(None)}


@pytest.fixture
def production(settings):
    """DEBUG off and the register throttle on (the test settings turn throttles off)."""
    settings.DEBUG = False
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"register": "60/minute", "token": None},
    }
    return settings


@pytest.mark.parametrize(
    ("cache_url", "warned"),
    [("locmemcache://", True), ("dummycache://", True), ("dbcache://onboarding_cache", False)],
)
def test_a_per_process_throttle_cache_is_a_deploy_warning(production, cache_url, warned):
    production.CACHES = {"default": environ.Env.cache_url_config(cache_url)}
    assert ("accounts.W001" in throttle_cache_ids()) is warned


def test_the_throttle_cache_check_runs_with_deploy_only(production):
    production.CACHES = {"default": environ.Env.cache_url_config("locmemcache://")}
    deploy = {problem.id for problem in run_checks(include_deployment_checks=True)}
    assert "accounts.W001" in deploy
    assert "accounts.W001" not in {problem.id for problem in run_checks()}


def test_no_throttle_cache_warning_in_debug_or_without_throttles(production):
    production.CACHES = {"default": environ.Env.cache_url_config("locmemcache://")}
    production.DEBUG = True
    assert "accounts.W001" not in throttle_cache_ids()
    production.DEBUG = False
    production.REST_FRAMEWORK = {
        **production.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"register": None, "token": None}
    }
    assert "accounts.W001" not in throttle_cache_ids()

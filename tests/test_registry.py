"""The registry is the one list of services: checks, the process list and the NATS users
follow it."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command

from onboarding.dev.natsserver import DEPLOY_NATS
from onboarding.eventbus.checks import check_bounded_contexts
from onboarding.eventbus.registry import get_consumers, get_services


def ids() -> set[str]:
    return {problem.id for problem in check_bounded_contexts(None)}


def test_the_default_settings_pass():
    assert ids() == set()


def test_a_consumer_the_settings_did_not_derive_is_an_error(settings):
    """What forgetting it did before: its inbox silently went to the default database."""
    settings.BOUNDED_CONTEXTS = ("players", "characters", "progression")
    settings.CONTEXT_DATABASES = {
        k: v for k, v in settings.CONTEXT_DATABASES.items() if k != "buildings"
    }
    assert ids() == {"eventbus.E010"}
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="consumer buildings has no database"):
        _ = get_consumers()["buildings"].database


def test_a_context_without_subscriptions_or_app_is_an_error(settings):
    settings.BOUNDED_CONTEXTS = (*settings.BOUNDED_CONTEXTS, "dev")  # onboarding.dev's label
    assert ids() == {"eventbus.E012"}
    settings.BOUNDED_CONTEXTS = (*settings.BOUNDED_CONTEXTS[:-1], "nope")
    assert ids() == {"eventbus.E011"}


def test_a_context_routed_to_a_missing_database_is_an_error(settings):
    settings.CONTEXT_DATABASES = {**settings.CONTEXT_DATABASES, "players": "gone"}
    assert ids() == {"eventbus.E013"}


def test_the_procfile_runs_every_registered_consumer():
    out = io.StringIO()
    call_command("procfile", "--web-port", "8123", stdout=out)
    names = [line.split(":", 1)[0] for line in out.getvalue().splitlines()]
    assert names == ["nats", "web", "relay", *get_consumers()]
    assert "runserver 127.0.0.1:8123" in out.getvalue()

    out = io.StringIO()
    call_command("procfile", "--without", "buildings relay", stdout=out)
    names = [line.split(":", 1)[0] for line in out.getvalue().splitlines()]
    assert names == ["nats", "web", *(n for n in get_consumers() if n != "buildings")]


def test_every_registered_consumer_has_its_nats_user():
    """deploy/nats/auth.conf spells each consumer out; a new service adds its user there."""
    auth = (DEPLOY_NATS / "auth.conf").read_text()
    users = set(re.findall(r"\{ user: (\w+),", auth))
    for name in get_consumers():
        assert name in users, f"deploy/nats/auth.conf has no user {name}"
        for subject in (f"$JS.API.CONSUMER.MSG.NEXT.USERS.{name}", f"$JS.ACK.USERS.{name}.>",
                        f"_INBOX_{name}.>"):
            assert f'"{subject}"' in auth, f"user {name} may not use {subject}"
    for name in get_services():  # a service that sets users up announces it, itself
        for subject in (f"user.onboarded.{name}", f"user.erased.{name}"):
            assert f'"{subject}"' in auth, f"user {name} may not publish {subject}"

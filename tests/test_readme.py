"""The README says what a newcomer will see: its commands exist, and its output is real.

The walkthrough once said bob's event is ``seq=2``; after the quick start it is ``seq=3``. An
output that depends on the path taken must not be spelled out, and what is shown must match
what the process really prints.
"""

from __future__ import annotations

import logging
import re

import pytest
from django.conf import settings
from django.core.management import get_commands

from conftest import wait_until
from tests.flow import counts, register

README = (settings.BASE_DIR / "README.md").read_text()


def test_no_number_in_the_readme_depends_on_the_path_taken():
    assert not re.search(r"\bseq=\d", README), "a stream sequence depends on what ran before"


def test_every_command_the_readme_shows_exists():
    commands = set(re.findall(r"manage\.py (\w+)", README))
    assert commands >= {"onboarding_status", "consume", "makemigrations"}
    assert commands <= set(get_commands()), commands - set(get_commands())
    targets = set(re.findall(r"^([\w-]+):", (settings.BASE_DIR / "Makefile").read_text(), re.M))
    shown = set(re.findall(r"\bmake ([a-z][\w-]*)", README))
    assert shown and shown <= targets, shown - targets


def walkthrough_line() -> str:
    """The consumer's log line the walkthrough shows for bob's event."""
    lines = [line for line in README.splitlines() if line.startswith("consumer buildings: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_walkthroughs_log_line_is_what_the_consumer_prints(client, start_consumers, caplog):
    caplog.set_level(logging.INFO, logger="onboarding.eventbus.events")
    start_consumers(["buildings"])
    response = register(client, "bob")
    assert response.status_code == 201, response.content
    user_id = response.json()["userId"]
    wait_until(lambda: counts()["buildings"] >= 2, message="bob's buildings")
    pattern = ".+".join(re.escape(part) for part in
                        walkthrough_line().replace("<bob's userId>", user_id).split("…"))
    printed = [r.getMessage() for r in caplog.records if r.name == "onboarding.eventbus.events"]
    assert any(re.fullmatch(pattern, line) for line in printed), (pattern, printed)

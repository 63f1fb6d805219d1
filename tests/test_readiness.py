"""Each context's DEFAULTS selector, and the readiness read across all of them."""

from __future__ import annotations

import uuid

import pytest

from buildings.models import Building
from onboarding.eventbus.registry import get_services
from onboarding.readiness import onboarding_readiness, user_readiness
from tests.flow import sample_event

pytestmark = pytest.mark.django_db(databases="__all__")


def test_every_consumer_declares_its_defaults_selector():
    assert all(spec.defaults is not None for spec in get_services().values())


def test_a_user_whose_events_were_handled_is_ready_everywhere():
    event = sample_event(username="ready")
    for spec in get_services().values():
        spec.handler_for(event.subject)([event])
    story = user_readiness(user_id=event.user_id)
    assert set(story) == set(get_services())
    assert all(found is not None and found.complete for found in story.values()), story
    assert {b.kind for b in story["buildings"].records} == {"hq", "warehouse"}
    assert story["characters"].records[0].is_active


def test_missing_and_partial_defaults_are_told_apart():
    event = sample_event(username="partial")
    get_services()["players"].handler_for(event.subject)([event])
    Building.objects.create(user_id=event.user_id, kind="hq", level=1)
    story = user_readiness(user_id=event.user_id)
    assert story["players"].complete
    assert story["characters"] is None and story["progression"] is None
    assert story["buildings"] is not None and not story["buildings"].complete
    assert user_readiness(user_id=uuid.uuid4()) == dict.fromkeys(get_services())


def test_readiness_for_many_users_in_one_query_per_service(django_assert_max_num_queries):
    events = [sample_event(username=f"many{i}") for i in range(20)]
    for spec in get_services().values():
        spec.handler_for(events[0].subject)(events)
    with django_assert_max_num_queries(len(get_services())):
        found = onboarding_readiness(user_ids=[e.user_id for e in events])
    assert all(len(per_user) == 20 for per_user in found.values())

"""insert_ignoring_conflicts: the one statement behind the consumers' default rows and inbox.

Runs on whatever engine the suite runs on: SQLite's multi-row VALUES, PostgreSQL's unnest arrays.
"""

import uuid

import pytest
from django.conf import settings
from django.utils import timezone

from buildings.models import Building
from characters.models import Character
from onboarding.eventbus.models import ProcessedEvent
from onboarding.eventbus.rows import CHUNK_ROWS, insert_ignoring_conflicts
from players.models import Player
from progression.models import MetaProgression

pytestmark = pytest.mark.django_db(databases="__all__")


def test_rows_get_the_models_defaults_and_the_shared_values():
    before = timezone.now()
    users = sorted(uuid.uuid4() for _ in range(3))
    insert_ignoring_conflicts(MetaProgression, ("user_id",), [(u,) for u in users],
                              same={"unlocked_weapons": ["pistol"], "unlocked_skills": ["dash"]})
    rows = list(MetaProgression.objects.order_by("user_id"))
    assert [row.user_id for row in rows] == users
    for row in rows:
        assert row.level == 1  # default=1
        assert row.unlocked_weapons == ["pistol"] and row.unlocked_skills == ["dash"]
        assert row.created_at >= before and row.updated_at >= before  # default, auto_now


def test_conflicting_rows_are_skipped_and_left_as_they_were():
    kept, new = uuid.uuid4(), uuid.uuid4()
    Player.objects.create(user_id=kept, username="original")
    insert_ignoring_conflicts(Player, ("user_id", "username"),
                              [(kept, "replayed"), (new, "new"), (new, "twice in one batch")])
    assert dict(Player.objects.values_list("user_id", "username")) == {
        kept: "original", new: "new"}


def test_any_unique_constraint_counts_as_a_conflict():
    user = uuid.uuid4()
    insert_ignoring_conflicts(Building, ("user_id", "kind", "level"),
                              [(user, "hq", 1), (user, "warehouse", 1)])
    Building.objects.filter(user_id=user, kind="hq").update(level=5)
    insert_ignoring_conflicts(Building, ("user_id", "kind", "level"),
                              [(user, "hq", 1), (user, "warehouse", 1)])
    assert dict(Building.objects.values_list("kind", "level")) == {"hq": 5, "warehouse": 1}
    # A partial unique constraint (one active character per user) as well.
    insert_ignoring_conflicts(Character, ("user_id",), [(user,), (user,)],
                              same={"name": "Recruit", "is_active": True})
    assert Character.objects.filter(user_id=user).count() == 1


def test_returning_names_only_the_rows_inserted_across_chunks():
    alias = settings.CONTEXT_DATABASES["players"]  # the inbox lives in each context's database
    inbox = ProcessedEvent.objects.using(alias)
    inbox.create(consumer="c", event_id="e-00001", subject="s", stream_seq=1)
    ids = [f"e-{n:05}" for n in range(CHUNK_ROWS * 2 + 7)]
    inserted = insert_ignoring_conflicts(
        ProcessedEvent, ("event_id", "subject", "stream_seq"),
        [(event_id, "s", n) for n, event_id in enumerate(ids)],
        same={"consumer": "c"}, using=alias, returning="event_id",
    )
    assert sorted(inserted) == [i for i in ids if i != "e-00001"]
    assert inbox.filter(consumer="c").count() == len(ids)
    assert not inbox.filter(processed_at__isnull=True).exists()


def test_returning_converts_to_the_fields_type():
    user = uuid.uuid4()
    assert insert_ignoring_conflicts(Player, ("user_id", "username"), [(user, "u")],
                                     returning="user_id") == [user]
    assert insert_ignoring_conflicts(Player, ("user_id", "username"), [(user, "u")],
                                     returning="user_id") == []


def test_no_rows_no_statement(django_assert_num_queries):
    with django_assert_num_queries(0, connection=None):
        assert insert_ignoring_conflicts(Player, ("user_id", "username"), []) == []


def test_unless_present_skips_rows_whose_value_the_table_holds_in_any_row():
    """Users who have a character keep theirs, an inactive one too (no constraint says so)."""
    inactive, active, new = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    Character.objects.create(user_id=inactive, name="Retired", is_active=False)
    Character.objects.create(user_id=active, name="Hero", is_active=True)
    inserted = insert_ignoring_conflicts(
        Character, ("user_id",), [(inactive,), (active,), (new,), (new,)],
        same={"name": "Recruit", "is_active": True}, unless_present="user_id",
        returning="user_id",
    )
    assert inserted == [new]
    assert sorted(Character.objects.values_list("user_id", "name", "is_active")) == sorted([
        (inactive, "Retired", False), (active, "Hero", True), (new, "Recruit", True)])


def test_unless_present_must_be_one_of_the_fields():
    with pytest.raises(ValueError, match="unless_present"):
        insert_ignoring_conflicts(Character, ("user_id",), [(uuid.uuid4(),)],
                                  same={"name": "Recruit"}, unless_present="name")

import uuid

import pytest
from django.db import IntegrityError

from progression.defaults import STARTER_SKILLS, STARTER_WEAPONS
from progression.models import MetaProgression
from progression.services import progression_create_default

pytestmark = pytest.mark.django_db(databases="__all__")


def test_unlocks_the_pistol_and_starter_skills_once():
    user_id = uuid.uuid4()
    first = progression_create_default(user_id=user_id)
    again = progression_create_default(user_id=user_id)
    assert first.pk == again.pk and MetaProgression.objects.count() == 1
    first.refresh_from_db()
    assert "pistol" in first.unlocked_weapons
    assert first.unlocked_weapons == list(STARTER_WEAPONS)
    assert first.unlocked_skills == list(STARTER_SKILLS)


def test_a_replay_does_not_reset_progress():
    user_id = uuid.uuid4()
    progression = progression_create_default(user_id=user_id)
    progression.unlocked_weapons.append("shotgun")
    progression.save()
    progression_create_default(user_id=user_id)
    progression.refresh_from_db()
    assert "shotgun" in progression.unlocked_weapons


def test_one_progression_per_user():
    user_id = uuid.uuid4()
    MetaProgression.objects.create(user_id=user_id)
    with pytest.raises(IntegrityError):
        MetaProgression.objects.create(user_id=user_id)

import uuid

import pytest
from django.db import IntegrityError

from buildings.models import Building
from buildings.services import buildings_create_default

pytestmark = pytest.mark.django_db(databases="__all__")


def test_creates_hq_and_warehouse_at_level_1_once():
    user_id = uuid.uuid4()
    buildings_create_default(user_id=user_id)
    buildings_create_default(user_id=user_id)
    assert sorted(Building.objects.values_list("kind", "level")) == [("hq", 1), ("warehouse", 1)]


def test_completes_a_partial_set_without_touching_what_exists():
    user_id = uuid.uuid4()
    Building.objects.create(user_id=user_id, kind="hq", level=3)
    buildings_create_default(user_id=user_id)
    assert sorted(Building.objects.values_list("kind", "level")) == [("hq", 3), ("warehouse", 1)]


def test_one_building_of_a_kind_per_user():
    user_id = uuid.uuid4()
    Building.objects.create(user_id=user_id, kind="hq")
    with pytest.raises(IntegrityError):
        Building.objects.create(user_id=user_id, kind="hq")

import uuid

import pytest
from django.db import IntegrityError

from characters.defaults import DEFAULT_CHARACTER_NAME
from characters.models import Character
from characters.services import character_create_default

pytestmark = pytest.mark.django_db(databases="__all__")


def test_creates_the_active_default_character_once():
    user_id = uuid.uuid4()
    first = character_create_default(user_id=user_id)
    again = character_create_default(user_id=user_id)
    assert first.pk == again.pk and Character.objects.count() == 1
    assert (first.name, first.is_active) == (DEFAULT_CHARACTER_NAME, True)


def test_a_user_who_has_characters_gets_no_default():
    user_id = uuid.uuid4()
    mine = Character.objects.create(user_id=user_id, name="Slick Sam", is_active=True)
    assert character_create_default(user_id=user_id).pk == mine.pk
    assert Character.objects.count() == 1


def test_at_most_one_active_character_per_user():
    user_id = uuid.uuid4()
    Character.objects.create(user_id=user_id, name="A", is_active=True)
    Character.objects.create(user_id=user_id, name="B", is_active=False)  # inactive: fine
    with pytest.raises(IntegrityError):
        Character.objects.create(user_id=user_id, name="C", is_active=True)

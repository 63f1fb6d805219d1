import uuid

import pytest
from django.db import IntegrityError

from players.models import Player
from players.services import player_create_default

pytestmark = pytest.mark.django_db(databases="__all__")


def test_creates_one_player_per_user_whatever_the_replays():
    user_id = uuid.uuid4()
    first = player_create_default(user_id=user_id, username="sam")
    again = player_create_default(user_id=user_id, username="sam")
    assert first.pk == again.pk and Player.objects.count() == 1
    assert first.username == "sam"


def test_the_database_allows_one_player_per_user():
    user_id = uuid.uuid4()
    Player.objects.create(user_id=user_id, username="a")
    with pytest.raises(IntegrityError):
        Player.objects.create(user_id=user_id, username="b")

"""Auth Service business logic: registration."""

from __future__ import annotations

import logging

from django.contrib.auth.hashers import make_password
from django.db import IntegrityError, transaction

from accounts.models import User
from onboarding.contracts import UserRegistered
from onboarding.eventbus.outbox import outbox_publish_on_commit

logger = logging.getLogger(__name__)


class RegistrationConflict(Exception):
    """The username or email is taken (compared case-insensitively)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def user_taken_field(*, username: str, email: str) -> str | None:
    """Which of username/email already belongs to someone (case-insensitive), if any."""
    if User.objects.filter(username__iexact=username).exists():
        return "username"
    if User.objects.filter(email__iexact=email).exists():
        return "email"
    return None


def _conflict(field: str) -> RegistrationConflict:
    return RegistrationConflict(field, f"A user with that {field} already exists.")


def user_register(*, username: str, email: str, password: str) -> User:
    """Create a user and announce ``user.registered``, atomically.

    The user row and the event's outbox row commit together: a failed registration publishes
    nothing, and a committed one is published even if NATS is down at the time (by the relay).
    Raises ``RegistrationConflict`` when the username or email is taken.
    """
    # The pre-check gives the common case a precise error; the database constraints decide
    # races. Both, and the slow hashing, stay outside the transaction: on SQLite it holds the
    # write lock from its first statement.
    email = User.objects.normalize_email(email)  # the domain part is case-insensitive
    taken = user_taken_field(username=username, email=email)
    if taken:
        raise _conflict(taken)
    user = User(username=username, email=email, password=make_password(password))
    try:
        with transaction.atomic():
            user.save(force_insert=True)
            outbox_publish_on_commit(
                event=UserRegistered(
                    user_id=user.id,
                    username=user.username,
                    email=user.email,
                    registration_timestamp=user.date_joined,
                )
            )
    except IntegrityError:
        taken = user_taken_field(username=username, email=email)
        if taken is None:
            raise
        raise _conflict(taken) from None
    logger.info("user registered user_id=%s", user.id)
    return user

"""Auth Service business logic: registration and login."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.hashers import make_password
from django.db import IntegrityError, transaction
from django.db.models import Value
from django.db.models.functions import Lower
from rest_framework.authtoken.models import Token

from accounts.models import User
from accounts.selectors import token_is_expired
from onboarding.contracts import UserRegistered
from onboarding.eventbus import outbox_publish_on_commit

logger = logging.getLogger(__name__)


class RegistrationConflict(Exception):
    """The username or email is taken (compared case-insensitively)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def user_taken_field(*, username: str, email: str) -> str | None:
    """Which of username/email already belongs to someone (case-insensitive), if any.

    Compares with the database's own LOWER(), the function the unique constraints use, so
    the check and the constraint agree on every character.
    """
    users = User.objects.annotate(
        username_ci=Lower("username"), email_ci=Lower("email")
    )
    if users.filter(username_ci=Lower(Value(username))).exists():
        return "username"
    if users.filter(email_ci=Lower(Value(email))).exists():
        return "email"
    return None


def _conflicting_field(error: IntegrityError) -> str | None:
    """The field a unique-constraint violation is about, read off the constraint's name."""
    text = str(error)
    for field in ("username", "email"):
        if f"accounts_user_{field}" in text or f"accounts_user.{field}" in text:
            return field
    return None


def _conflict(field: str) -> RegistrationConflict:
    return RegistrationConflict(field, f"A user with that {field} already exists.")


def user_registered_event(*, user: User) -> UserRegistered:
    """The ``user.registered`` event of ``user``: accounts owns this event and builds it here only.

    Registration writes it to the outbox; ``manage.py reconcile --repair`` rebuilds it from the
    same row to re-deliver it to a service that lost the user's defaults. Reads only ``id``,
    ``username``, ``email`` and ``date_joined`` (reconcile loads no other column).
    """
    return UserRegistered(
        user_id=user.id,
        username=user.username,
        email=user.email,
        registration_timestamp=user.date_joined,
    )


def user_register(*, username: str, email: str, password: str) -> User:
    """Create a user and announce ``user.registered``, atomically.

    The user row and the event's outbox row commit together: a failed registration publishes
    nothing, and a committed one is published even if NATS is down at the time (by the relay).
    Raises ``RegistrationConflict`` when the username or email is taken.
    """
    # The pre-check gives the common case a precise error; the database constraints decide
    # races. Both, and the slow hashing, stay outside the transaction: on SQLite it holds the
    # write lock from its first statement.
    # Django's own normalisation: NFKC for usernames (lookalike characters become one), a
    # lower-case domain for emails.
    username = User.normalize_username(username)
    email = User.objects.normalize_email(email)
    taken = user_taken_field(username=username, email=email)
    if taken:
        raise _conflict(taken)
    user = User(username=username, email=email, password=make_password(password))
    try:
        with transaction.atomic():
            user.save(force_insert=True)
            if settings.ACCOUNTS_PUBLISH_EVENTS:
                outbox_publish_on_commit(event=user_registered_event(user=user))
    except IntegrityError as exc:
        # Lost a race to a concurrent registration: the constraint names the field.
        taken = _conflicting_field(exc) or user_taken_field(username=username, email=email)
        if taken is None:
            raise
        raise _conflict(taken) from None
    logger.info("user registered user_id=%s", user.id)
    return user


def user_authenticate(*, username: str, password: str, request=None) -> User | None:
    """The active user with these credentials, or None; usernames match as at registration.

    Registration stores usernames NFKC-normalised and unique case-insensitively, so "SAM" and
    "ｓａｍ" name the user registered as "sam": the lookup finds the stored spelling the same
    way, then Django's ``authenticate`` checks the password (and ``is_active``, and sends
    ``user_login_failed``). An unknown name still goes through ``authenticate``, which hashes
    the password anyway: a failed login takes as long whether or not the user exists.
    """
    username = User.normalize_username(username)
    stored = (
        User.objects.annotate(username_ci=Lower("username"))
        .filter(username_ci=Lower(Value(username)))
        .values_list("username", flat=True)
        .first()
    )
    return authenticate(request, username=stored or username, password=password)


def user_token_get_or_create(*, user: User) -> Token:
    """The user's API token: the current one, or a new one when there is none or it expired.

    One token per user (DRF's ``authtoken``): every client of the user shares it, and
    revoking it (``user_token_revoke``) logs them all out. An expired token is replaced, never
    extended: its key is dead for good.
    """
    token = Token.objects.filter(user=user).first()
    if token is not None and not token_is_expired(token):
        return token  # the common case reads only: no write transaction (SQLite's write lock)
    with transaction.atomic():
        if token is not None:
            # That expired key only: a fresh token a concurrent login just created stays.
            Token.objects.filter(pk=token.pk).delete()
        token, _ = Token.objects.get_or_create(user=user)
    return token


def user_token_revoke(*, token: Token) -> None:
    """Revoke ``token`` at once: every request that carries it gets a 401 from now on."""
    deleted, _ = Token.objects.filter(pk=token.pk).delete()
    logger.info("api token revoked user_id=%s revoked=%s", token.user_id, bool(deleted))

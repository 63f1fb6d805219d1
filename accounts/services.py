"""Auth Service business logic: an account's whole life (registration, renaming, erasure) and
logging in.

Every account is made by :func:`user_register`, however it is made (the API, the admin's Add
user, ``createsuperuser``, ``User.objects.create_user``: the manager calls it), and announced
once; every erasure goes through :func:`user_delete` (the API, the admin's Delete and bulk
delete), every change of username through :func:`user_rename`. Each writes its event in the
transaction that makes the change (the outbox), so the services hear of exactly what committed.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable

from django.apps import apps
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth import authenticate
from django.contrib.auth.hashers import make_password
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, transaction
from django.db.models import Q, Value
from django.db.models.functions import Lower
from django.utils import timezone
from rest_framework.authtoken.models import Token

from accounts.models import ServiceReadiness, User
from accounts.selectors import token_is_expired
from onboarding.contracts import UserDeleted, UserRegistered, UserRenamed
from onboarding.eventbus import outbox_publish_on_commit

logger = logging.getLogger(__name__)


class RegistrationConflict(Exception):
    """The username or email is taken (compared case-insensitively)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def user_taken_field(*, username: str, email: str | None,
                     exclude: User | None = None) -> str | None:
    """Which of username/email already belongs to someone (case-insensitive), if any; email
    None is not checked, ``exclude`` is a user who may keep their own.

    Compares with the database's own LOWER(), the function the unique constraints use, so
    the check and the constraint agree on every character.
    """
    users = User.objects.annotate(
        username_ci=Lower("username"), email_ci=Lower("email")
    )
    if exclude is not None:
        users = users.exclude(pk=exclude.pk)
    if users.filter(username_ci=Lower(Value(username))).exists():
        return "username"
    if email is not None and users.filter(email_ci=Lower(Value(email))).exists():
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


def user_register(*, username: str, email: str, password: str | None = None,
                  password_hash: str | None = None, **extra_fields) -> User:
    """Create a user and announce ``user.registered``, atomically.

    The user row and the event's outbox row commit together: a failed registration publishes
    nothing, and a committed one is published even if NATS is down at the time (by the relay).
    Raises ``RegistrationConflict`` when the username or email is taken. ``password`` is the
    raw password (None: an unusable one), or ``password_hash`` one hashed already (the admin's
    form hashes it); ``extra_fields`` are other fields of the user (``is_staff``,
    ``is_superuser``... from the manager).
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
    user = User(username=username, email=email,
                password=password_hash if password_hash is not None else make_password(password),
                **extra_fields)
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


def user_rename(*, user: User, username: str) -> User:
    """Give ``user`` a new username and announce ``user.renamed``, atomically.

    The same rules as registration: NFKC-normalised, unique case-insensitively (the user may
    change the case of their own name). Raises ``RegistrationConflict`` when another user has
    the name. Renaming to the very same name changes nothing and announces nothing.
    """
    username = User.normalize_username(username)
    if username == user.username:
        return user
    if user_taken_field(username=username, email=None, exclude=user):
        raise _conflict("username")
    try:
        with transaction.atomic():
            User.objects.filter(pk=user.pk).update(username=username)
            if settings.ACCOUNTS_PUBLISH_EVENTS:
                outbox_publish_on_commit(event=UserRenamed(
                    user_id=user.id, username=username, renamed_at=timezone.now()))
    except IntegrityError as exc:
        if _conflicting_field(exc) == "username" or user_taken_field(
                username=username, email=None, exclude=user):
            raise _conflict("username") from None
        raise
    user.username = username
    logger.info("user renamed user_id=%s", user.id)
    return user


def user_delete(*, user: User) -> None:
    """Erase ``user``'s account and announce ``user.deleted``, atomically.

    In one transaction: the ``user.deleted`` event (which also erases the user from the event
    bus: the relay deletes the stream's copies of their earlier events, their outbox rows and
    their dead letters' contents once it is published), the admin's history of the account
    (``LogEntry``: its name, in ``object_repr``), the admin logins attempted under its name or
    e-mail (django-axes), and the row itself, with what depends on it (tokens, the admin's log
    entries the user made, group memberships). Each service then deletes the user's rows on its
    own and keeps a tombstone. A user already gone is not an error: erasing twice is harmless.
    """
    with transaction.atomic():
        if settings.ACCOUNTS_PUBLISH_EVENTS:
            outbox_publish_on_commit(
                event=UserDeleted(user_id=user.id, deleted_at=timezone.now()), erase=True)
        _forget_admin_traces(user)
        User.objects.filter(pk=user.pk).delete()
    logger.info("user deleted user_id=%s", user.id)


ERASED_REPR = "(erased user)"


def _forget_admin_traces(user: User) -> None:
    """The copies of the user's name and e-mail that Django's and django-axes' tables keep."""
    LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(User), object_id=str(user.pk)
    ).update(object_repr=ERASED_REPR, change_message="")
    if apps.is_installed("axes"):
        from axes.models import AccessAttempt, AccessFailureLog, AccessLog

        names = Q(username__iexact=user.username) | Q(username__iexact=user.email)
        for model in (AccessAttempt, AccessFailureLog, AccessLog):
            model.objects.filter(names).delete()


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


# -- the readiness projection (``manage.py consume accounts``) -------------------------------


def readiness_record_onboarded(*, onboarded: Iterable[tuple[uuid.UUID, str, dt.datetime]]) -> None:
    """Record that each (user, service, when) has the user's defaults: the services'
    ``user.onboarded.<service>``. Idempotent: one row per user and service, upserted; a
    service that erased the user stays erased (``ServiceReadiness.ready``)."""
    _readiness_upsert(onboarded, field="onboarded_at")


def readiness_record_erased(*, erased: Iterable[tuple[uuid.UUID, str, dt.datetime]]) -> None:
    """Record that each (user, service, when) erased the user: ``user.erased.<service>``."""
    _readiness_upsert(erased, field="erased_at")


def _readiness_upsert(facts: Iterable[tuple[uuid.UUID, str, dt.datetime]], *, field: str):
    # One row per (user, service) in the statement: PostgreSQL refuses to update a row twice in
    # one INSERT ... ON CONFLICT. Of two, the later fact wins (they come in stream order).
    latest = {(user_id, service): at for user_id, service, at in facts}
    ServiceReadiness.objects.bulk_create(
        [ServiceReadiness(user_id=user_id, service=service, **{field: at})
         for (user_id, service), at in sorted(latest.items())],
        update_conflicts=True, unique_fields=["user_id", "service"], update_fields=[field],
    )

"""Auth Service reads: what the game client polls after registering."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from accounts.models import ServiceReadiness, User
from onboarding.readiness import onboarding_services


@dataclass(frozen=True)
class UserOnboarding:
    """Per service, whether all of the user's defaults exist there."""

    user_id: uuid.UUID
    services: dict[str, bool]

    @property
    def complete(self) -> bool:
        return bool(self.services) and all(self.services.values())


def user_onboarding_get(*, user_id: uuid.UUID) -> UserOnboarding | None:
    """Which services have set the user up, from accounts' own readiness projection
    (``ServiceReadiness``, kept by ``manage.py consume accounts`` from the services'
    announcements); None for a user that does not exist.

    Reads accounts' database only: the web needs no service's credentials, and a slow service
    database does not slow this endpoint. Which services there are comes from the registry (each
    context that declares ``DEFAULTS``), so a service that has announced nothing yet shows as
    not ready rather than missing.
    """
    if not User.objects.filter(pk=user_id).exists():
        return None
    ready = {
        row.service: row.ready
        for row in ServiceReadiness.objects.filter(user_id=user_id)
    }
    return UserOnboarding(
        user_id=user_id,
        services={name: ready.get(name, False) for name in onboarding_services()},
    )


def token_expires_at(token: Token) -> dt.datetime | None:
    """When ``token`` stops working: ``AUTH_TOKEN_TTL`` seconds after its creation (None: 0,
    tokens never expire)."""
    if not settings.AUTH_TOKEN_TTL:
        return None
    return token.created + dt.timedelta(seconds=settings.AUTH_TOKEN_TTL)


def token_is_expired(token: Token) -> bool:
    expires_at = token_expires_at(token)
    return expires_at is not None and expires_at <= timezone.now()

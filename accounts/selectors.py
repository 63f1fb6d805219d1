"""Auth Service reads: what the game client polls after registering."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from accounts.models import User
from onboarding.readiness import user_readiness


@dataclass(frozen=True)
class UserOnboarding:
    """Per service, whether all of the user's defaults exist there."""

    user_id: uuid.UUID
    services: dict[str, bool]

    @property
    def complete(self) -> bool:
        return bool(self.services) and all(self.services.values())


def user_onboarding_get(*, user_id: uuid.UUID) -> UserOnboarding | None:
    """Which services have set the user up, read from each one's own database; None for a
    user that does not exist.

    Goes through onboarding.readiness, which asks each context's own ``DEFAULTS`` selector:
    accounts shares only the event contract with the contexts, never their models, and a new
    service shows up here by declaring its selector.
    """
    if not User.objects.filter(pk=user_id).exists():
        return None
    found = user_readiness(user_id=user_id)
    return UserOnboarding(
        user_id=user_id,
        services={
            name: defaults is not None and defaults.complete for name, defaults in found.items()
        },
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

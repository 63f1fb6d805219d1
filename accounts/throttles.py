"""Throttles of the Auth Service's API beyond DRF's per-address ``ScopedRateThrottle``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from rest_framework.throttling import SimpleRateThrottle

from accounts.models import User


def username_key(username: str) -> str:
    """One key per account, however the name is spelled: the login matches usernames NFKC-
    normalised and case-insensitively ("SAM", " ｓａｍ ", "sam" are one user), so the limits
    count them as one too. ``casefold`` groups at least what the database's ``LOWER()`` does."""
    return User.normalize_username(username.strip()).casefold()


class UsernameRateThrottle(SimpleRateThrottle):
    """Limits login attempts at one username, from every address together.

    The per-address throttle stops one client guessing; an attacker with many addresses (a
    botnet, a cloud's address pool) would get its full rate from each of them at the same
    account. This one counts every attempt at a username, whatever its source, in the default
    cache (shared by every web worker under ``CACHE_URL=dbcache://...``), under scope
    ``token_username`` of ``DEFAULT_THROTTLE_RATES``.

    Every attempt counts, right or wrong: a user who has exhausted it waits like the attacker
    (Retry-After says how long) — the price of not letting a distributed guess run at full
    speed. A body without a string ``username`` is not throttled here (it fails validation).
    A request that checks the password of the signed-in user (``DELETE /api/auth/me``) counts
    against that user's name: a stolen token gives no faster guess at the password.

    A subclass of ``SimpleRateThrottle``, not ``ScopedRateThrottle``: its rate is its own, and
    tests that swap the scoped rates do not touch it.
    """

    scope = "token_username"

    def get_cache_key(self, request, view):
        data = request.data  # parsed here already: a body DRF cannot parse is its 400 / 413
        if request.user.is_authenticated:
            username = request.user.username
        else:
            username = data.get("username") if isinstance(data, Mapping) else None
        if not isinstance(username, str) or not username.strip():
            return None
        # Hashed: a key of bounded length and plain characters whatever the client sent.
        ident = hashlib.sha256(username_key(username).encode()).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}

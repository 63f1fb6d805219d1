"""API authentication: DRF's ``Authorization: Token <key>``, with tokens that expire."""

from __future__ import annotations

from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from accounts.selectors import token_is_expired


class ExpiringTokenAuthentication(TokenAuthentication):
    """``TokenAuthentication`` that refuses a token older than ``AUTH_TOKEN_TTL`` seconds.

    The age counts from the token's creation (an absolute lifetime, not a sliding one): a
    stolen token stops working at a known time however much it is used. The client logs in
    again (``POST /api/auth/token``), which replaces the expired token with a new one.
    """

    def authenticate_credentials(self, key):
        user, token = super().authenticate_credentials(key)
        if token_is_expired(token):
            raise AuthenticationFailed("Token has expired; log in again.")
        return user, token

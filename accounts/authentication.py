"""API authentication: DRF's ``Authorization: Token <key>``, with tokens that expire."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
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


class ExpiringTokenScheme(OpenApiAuthenticationExtension):
    """The ``tokenAuth`` security scheme of the OpenAPI schema, saying what to type.

    Swagger UI's "Authorize" box sends what is typed as the whole ``Authorization`` header, so
    the ``Token `` prefix must be typed too; drf-spectacular's own description ("required prefix
    Token") leaves a newcomer to guess the space and where the token comes from.
    """

    target_class = ExpiringTokenAuthentication
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": (
                "Type exactly: `Token <the token from POST /api/auth/token>` (the word Token, "
                "a space, then the `token` field of that response). A token expires; log in "
                "again for a new one."
            ),
        }

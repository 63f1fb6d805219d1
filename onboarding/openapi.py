"""How the API's error responses are described in the OpenAPI schema.

Every error is ``{"<field>": ["<problem>", ...]}`` (onboarding.exceptions). A serializer cannot
say "an object of lists of strings, with these keys only", so :class:`ErrorSerializer` is a
marker and :class:`ErrorSerializerExtension` writes its schema: each documented key a non-empty
list of strings, no other key, at least one key. ``error_serializer("RegisterError", "username",
...)`` documents an endpoint's 400 with its fields; ``Error`` is the ``{"detail": [...]}`` of
every other error.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.plumbing import alpha_operation_sorter
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from onboarding.exceptions import DETAIL

PROBLEMS = {"type": "array", "items": {"type": "string"}, "minItems": 1}


class ErrorSerializer(serializers.Serializer):
    """Documentation only; ``keys`` are the fields an error may name."""

    keys: tuple[str, ...] = (DETAIL,)
    description = (
        'Every error has this shape: {"<field>": ["<problem>", ...]}. Problems that are not '
        f'about one field are listed under "{DETAIL}".'
    )


class ErrorSerializerExtension(OpenApiSerializerExtension):
    target_class = ErrorSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema, direction):
        keys = self.target.keys
        return {
            "type": "object",
            "description": self.target.description,
            "properties": {key: PROBLEMS for key in keys},
            "additionalProperties": False,
            "minProperties": 1,
        }


def error_serializer(
    name: str, *fields: str, detail: bool = True, description: str | None = None
) -> type[ErrorSerializer]:
    """A named error component whose keys are ``fields`` (and ``detail`` unless told not)."""
    keys = tuple(dict.fromkeys((*fields, DETAIL) if detail else fields))
    attrs = {"keys": keys, "__module__": __name__}
    if description:
        attrs["description"] = description
    return type(f"{name}Serializer", (ErrorSerializer,), attrs)


def error_response(description: str, serializer=None) -> OpenApiResponse:
    """An error response of ``serializer`` (default: ``Error``) with what it means."""
    return OpenApiResponse(response=serializer or Error, description=description)


class Error(ErrorSerializer):
    """``{"detail": ["<problem>", ...]}``: the component named ``Error`` in the schema."""

# Documented on the endpoints that throttle: when the client may try again.
# Required: every 429 carries it (a client must never be left to guess, or retry at once).
RETRY_AFTER = OpenApiParameter(
    "Retry-After", type={"type": "integer", "minimum": 1}, location=OpenApiParameter.HEADER,
    response=[429], required=True,
    description="Seconds to wait before the next request (at least 1).",
)


# The order a client uses the API in: register, log in, read yourself (rename, erase) and your
# onboarding, log out; then the staff endpoints. Swagger UI lists operations in the schema's
# order (within each tag), and drf-spectacular's default sorts them alphabetically (logout, me,
# register, token).
CLIENT_ORDER = (
    "/api/auth/register",
    "/api/auth/token",
    "/api/auth/me",
    "/api/auth/me/onboarding",
    "/api/auth/logout",
    "/api/users/{userId}/onboarding",
    "/api/users/{userId}",
)
# Within one path: read it, change it, delete it last.
METHOD_ORDER = ("GET", "POST", "PUT", "PATCH", "DELETE")


def operation_order(endpoint) -> tuple:
    """``SPECTACULAR_SETTINGS["SORT_OPERATIONS"]``: the sort key of an endpoint
    ``(path, path_regex, method, callback)``. The paths of :data:`CLIENT_ORDER` first, in that
    order; every other one after them, alphabetically (drf-spectacular's own order)."""
    path, method = endpoint[0], endpoint[2]
    if path not in CLIENT_ORDER:
        return len(CLIENT_ORDER), 0, alpha_operation_sorter(endpoint)
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return CLIENT_ORDER.index(path), rank, alpha_operation_sorter(endpoint)

"""One error shape for every error response: ``{"<field>": ["<problem>", ...]}``.

A problem about one input field is listed under that field's name; anything else (a 404, a
missing token, a throttle, a body that is not a JSON object, a login that failed) under
``"detail"``. Always lists of strings, so a client needs one way to read every error. DRF's
own default mixes shapes (``{"detail": "..."}``, ``{"non_field_errors": [...]}``, a bare list);
:func:`api_exception_handler` folds them into this one, and the ``handler*`` views give the
errors Django answers outside DRF (an unknown URL, a server error) the same shape.
"""

from __future__ import annotations

import logging
import math

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import JsonResponse
from rest_framework import status
from rest_framework.exceptions import APIException, Throttled
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)

DETAIL = "detail"


class RequestBodyTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self) -> None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class BadRequest(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "Bad request."
    default_code = "bad_request"


def api_exception_handler(exc, context):
    """DRF's exception handler, with every error body in the documented shape.

    Also answers what DRF leaves to Django: a body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (Django
    raises ``RequestDataTooBig`` when the JSON parser reads it) is a JSON 413 instead of
    Django's HTML 400, or its debug page with ``DEBUG`` on; and every 429 tells the client when
    to retry.
    """
    if isinstance(exc, RequestDataTooBig):
        exc = RequestBodyTooLarge()
    elif isinstance(exc, SuspiciousOperation):
        logger.warning("suspicious request refused: %s", exc)
        exc = BadRequest()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # not an API error: a 500, left to Django (and handler500)
    response.data = error_body(response.data)
    if isinstance(exc, Throttled):
        # DRF writes int(wait), "0" for a wait under a second, and nothing when the throttle
        # could not say: a client must always be told, and never to retry at once.
        wait = exc.wait if exc.wait is not None else 1
        response["Retry-After"] = str(max(1, math.ceil(wait)))
    return response


def error_body(data) -> dict[str, list[str]]:
    """``data`` (what DRF would send) in the documented shape."""
    if isinstance(data, dict):
        body: dict[str, list[str]] = {}
        for field, problems in data.items():
            key = DETAIL if field == api_settings.NON_FIELD_ERRORS_KEY else str(field)
            body.setdefault(key, []).extend(_problems(problems))
        return body or {DETAIL: ["Invalid request."]}
    return {DETAIL: _problems(data)}


def _problems(value) -> list[str]:
    """A field's problems as a flat list of strings (nested serializer errors flattened)."""
    if isinstance(value, dict):
        return [
            f"{key}: {problem}" for key, inner in value.items() for problem in _problems(inner)
        ]
    if isinstance(value, list | tuple):
        return [problem for item in value for problem in _problems(item)]
    return [str(value)]


# -- Django's own error views (urls.py handler404/handler500/handler400) -----------------------
# An unknown URL, a crash, or a suspicious request that never reached a DRF view: the same shape.


def not_found(request, exception=None):
    return JsonResponse({DETAIL: ["Not found."]}, status=404)


def server_error(request):
    return JsonResponse({DETAIL: ["Server error."]}, status=500)


def bad_request(request, exception=None):
    if isinstance(exception, RequestDataTooBig):
        return JsonResponse({DETAIL: [str(RequestBodyTooLarge().detail)]}, status=413)
    return JsonResponse({DETAIL: ["Bad request."]}, status=400)

"""One error shape for every error response: ``{"<field>": ["<problem>", ...]}``.

A problem about one input field is listed under that field's name; anything else (a 404, a
missing token, a throttle, a body that is not a JSON object, a login that failed) under
``"detail"``. Always lists of strings, so a client needs one way to read every error. DRF's
own default mixes shapes (``{"detail": "..."}``, ``{"non_field_errors": [...]}``, a bare list);
:func:`api_exception_handler` folds them into this one, and the ``handler*`` views give the
errors Django answers outside DRF (an unknown URL, a server error) the same shape. Under
``/api/``, :class:`ApiErrorMiddleware` makes sure of it with ``DEBUG`` on too, where Django
answers with its technical pages instead of the handlers.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import JsonResponse
from rest_framework import status
from rest_framework.exceptions import APIException, Throttled
from rest_framework.renderers import TemplateHTMLRenderer
from rest_framework.response import Response
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


# -- under /api/, with DEBUG on as with it off ---------------------------------------------------

API_PREFIX = "/api/"
# Headers of the page being replaced that still hold for its JSON (the methods a 405 allows, an
# authentication challenge, when to retry, caching).
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After", "Cache-Control", "Vary")


class ApiErrorMiddleware:
    """Every error answered under ``/api/`` is JSON in the one shape, ``DEBUG`` on or off.

    With ``DEBUG`` off the ``handler*`` views above answer what DRF does not. With ``DEBUG`` on
    (``make run``) Django bypasses them: an unknown URL (a trailing slash, a malformed id) gets
    its technical 404 page, an unhandled exception its technical 500 page (HTML, or plain text
    for a client that does not accept HTML), a suspicious request a technical 400. And a DRF
    view whose renderer is HTML (Swagger UI's page, the browsable API) renders even its errors
    as HTML. A client of the API reads JSON: this middleware, first in ``MIDDLEWARE`` so that it
    sees every other's answer too, replaces any error response under ``/api/`` that is not JSON
    with the shape — DRF's own error data where there is some (already in the shape), else the
    handler's answer for the status.

    Only the page is replaced: Django still logs an unhandled exception with its traceback
    (``django.request``) and sends ``got_request_exception``, as it does with ``DEBUG`` off.
    With ``DEBUG`` on, the 500 names the exception too (a developer's first question); with it
    off, nothing of it (its message may carry anything).
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (
            response.status_code >= 400
            and request.path_info.startswith(API_PREFIX)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            return self.json_error(request, response)
        return response

    def process_exception(self, request, exception):
        # Kept for the DEBUG 500's detail; None: Django handles it as always (logs, signals).
        request.api_exception = exception
        return None

    def json_error(self, request, page) -> JsonResponse:
        status_code = page.status_code
        exception = getattr(request, "api_exception", None)
        if isinstance(page, Response) and page.data:
            data = dict(page.data) if isinstance(page.data, dict) else page.data
            if isinstance(page.accepted_renderer, TemplateHTMLRenderer):
                data.pop("status_code", None)  # it writes the status into an error's data
            response = JsonResponse(error_body(data), status=status_code)
        elif status_code == 404:
            response = not_found(request)
        elif status_code == 400:
            response = bad_request(request, exception)
        elif status_code >= 500:
            response = server_error(request)
            if settings.DEBUG and exception is not None:
                response = JsonResponse({DETAIL: [
                    "Server error.",
                    f"{type(exception).__name__}: {exception} (DEBUG is on; the traceback is "
                    "in the server's log)",
                ]}, status=status_code)
        elif status_code == 405:
            response = JsonResponse(
                {DETAIL: [f'Method "{request.method}" not allowed.']}, status=405
            )
        else:
            phrase = HTTPStatus(status_code).phrase if status_code in HTTPStatus else "Error"
            response = JsonResponse({DETAIL: [f"{phrase}."]}, status=status_code)
        response.status_code = status_code  # bad_request may say 413 where the page said 400
        for header in KEPT_HEADERS:
            if header in page:
                response[header] = page[header]
        response.cookies = page.cookies
        # Django logged the page ("Not Found: ...", the 500's traceback): not this one again.
        response._has_been_logged = getattr(page, "_has_been_logged", False)
        return response

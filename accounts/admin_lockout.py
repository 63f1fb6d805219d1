"""The admin login's lockout: django-axes, limited to the admin site.

django-axes counts failed logins in the default database (its models are neither a bounded
context's nor per-context, so the router keeps them in ``default`` and ``migrate_all`` creates
them there) and refuses every further login — the right password included — for
``AXES_COOLOFF_TIME`` once ``AXES_FAILURE_LIMIT`` failures match the client (its address, or the
username from any address: ``AXES_LOCKOUT_PARAMETERS``). A successful login resets the count.

Only the admin: the API's login (``POST /api/auth/token``) has its own limits, DRF throttles
per address and per username in the shared cache. Here axes neither checks nor records a login
that did not come through ``/admin/``, nor one without a request (``Client.login`` in tests,
``authenticate()`` in a shell), which no browser can reach.
"""

from __future__ import annotations

import math

from axes.backends import AxesStandaloneBackend
from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_cool_off
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from rest_framework.throttling import BaseThrottle

from accounts.throttles import username_key


def is_admin_request(request) -> bool:
    try:
        admin_url = reverse("admin:index")
    except NoReverseMatch:
        return False
    return request is not None and getattr(request, "path", "").startswith(admin_url)


class AdminLoginLockoutBackend(AxesStandaloneBackend):
    """First of ``AUTHENTICATION_BACKENDS``: refuses an admin login while its client is locked
    out (raising ``PermissionDenied``, which stops ``authenticate()`` before the password is
    checked). Authenticates nobody itself; ``ModelBackend`` after it does."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if not is_admin_request(request):
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


class AdminOnlyAxesHandler(AxesDatabaseHandler):
    """axes' database handler, recording only the admin's logins (``AXES_HANDLER``)."""

    def user_login_failed(self, sender, credentials, request=None, **kwargs):
        if is_admin_request(request):
            return super().user_login_failed(sender, credentials, request, **kwargs)
        return None

    def user_logged_in(self, sender, request, user, **kwargs):
        if is_admin_request(request):
            return super().user_logged_in(sender, request, user, **kwargs)
        return None

    def user_logged_out(self, sender, request, user, **kwargs):
        if is_admin_request(request):
            return super().user_logged_out(sender, request, user, **kwargs)
        return None


def client_ip(request) -> str:
    """The client's address as the API throttles see it (``AXES_CLIENT_IP_CALLABLE``):
    ``REMOTE_ADDR``, or the address ``DJANGO_NUM_PROXIES`` trusted proxies report — one setting
    for both, never a client-supplied header unless configured."""
    return BaseThrottle().get_ident(request)


def lockout_username(request, credentials) -> str | None:
    """The username the attempts count under (``AXES_USERNAME_CALLABLE``): one per account
    however it is spelled, as for the API's per-username throttle."""
    username = (credentials or {}).get("username")
    if username is None:
        username = request.POST.get("username")
    return username_key(username) if isinstance(username, str) else None


def lockout_response(request, original_response=None, credentials=None):
    """A page that says what happened and when to try again (``AXES_LOCKOUT_CALLABLE``):
    429 with ``Retry-After``, like every other limit of the project.

    Each attempt during a lockout starts the cool-off again (axes'
    ``AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT``), so the wait is the whole cool-off.
    """
    cool_off = get_cool_off(request)
    seconds = max(1, math.ceil(cool_off.total_seconds())) if cool_off else None
    minutes = math.ceil(seconds / 60) if seconds else None
    response = render(
        request, "accounts/admin_lockout.html",
        {"title": "Too many failed logins", "minutes": minutes}, status=429,
    )
    if seconds:
        response["Retry-After"] = str(seconds)
    return response

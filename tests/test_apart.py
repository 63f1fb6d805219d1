"""The accounts side lives apart from the services' databases.

Accounts' processes — the web, the relay and ``consume accounts`` — run as real processes with
every context's database URL pointing at a port where nothing listens; each context's consumer
runs with its own database. Registration, the client's readiness poll (complete within
seconds, from accounts' projection of the services' announcements) and the staff endpoint all
work. What needs a service's own records (the admin's user page, its Event flow page, a
service's rows in the admin) says "unreachable" for each service, one line, never a 500.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import urllib.parse
import urllib.request

import pytest
from django.conf import settings

from conftest import wait_until
from onboarding.dev.natsserver import free_port
from tests.flow import STRONG_PASSWORD

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def nowhere() -> dict[str, str]:
    """Each context's database URL at a port where nothing listens."""
    port = free_port()
    return {f"{context.upper()}_DATABASE_URL": f"postgres://nobody@127.0.0.1:{port}/{context}"
            for context in settings.BOUNDED_CONTEXTS}


class Client:
    """Plain HTTP to a real server, JSON in and out, with a cookie jar for the admin."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def call(self, method: str, path: str, body=None, token=None, form=None):
        headers = {"Authorization": f"Token {token}"} if token else {}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Referer"] = self.base + path
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=headers)
        try:
            with self.opener.open(request, timeout=15) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def up(self) -> bool:
        try:
            return self.call("GET", "/admin/login/")[0] == 200
        except OSError:
            return False


def test_the_accounts_side_works_with_every_service_database_unreachable(manage, jetstream):
    from accounts.services import user_register

    apart = nowhere()
    manage("outbox_relay", **apart)
    manage("consume", "accounts", **apart)
    for context in settings.BOUNDED_CONTEXTS:  # each with its own database, as deployed
        manage("consume", context)
    port = free_port()
    # Plain HTTP here: cookies a client sends back over it (the admin's session and CSRF).
    web = manage("runserver", "--noreload", f"127.0.0.1:{port}", **apart,
                 DJANGO_SESSION_COOKIE_SECURE="false", DJANGO_CSRF_COOKIE_SECURE="false")
    client = Client(port)
    wait_until(lambda: client.up() or web.poll() is not None, timeout=30,
               message="the web process answers")
    assert web.poll() is None, web.output()
    user_register(username="boss", email="boss@example.com", password=STRONG_PASSWORD,
                  is_staff=True, is_superuser=True)

    status, body = client.call("POST", "/api/auth/register", {
        "username": "apart", "email": "apart@example.com", "password": STRONG_PASSWORD})
    assert status == 201, body
    user_id = json.loads(body)["userId"]
    status, body = client.call("POST", "/api/auth/token",
                               {"username": "apart", "password": STRONG_PASSWORD})
    assert status == 200, body
    token = json.loads(body)["token"]

    def onboarding():
        status, body = client.call("GET", "/api/auth/me/onboarding", token=token)
        assert status == 200, body
        return json.loads(body)

    wait_until(lambda: onboarding()["complete"], timeout=20,
               message="complete: true, from the services' announcements")
    assert set(onboarding()["services"]) == set(settings.BOUNDED_CONTEXTS)

    staff = json.loads(client.call("POST", "/api/auth/token",
                                   {"username": "boss", "password": STRONG_PASSWORD})[1])["token"]
    status, body = client.call("GET", f"/api/users/{user_id}/onboarding", token=staff)
    assert status == 200 and json.loads(body)["complete"] is True, body

    # The admin's user page: its story needs each service's records, with the operator's
    # credentials; here none can be reached, and it says so per service, one line each.
    page = client.call("GET", "/admin/login/")[1]
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    status, _ = client.call("POST", "/admin/login/?next=/admin/", form={
        "csrfmiddlewaretoken": csrf, "username": "boss", "password": STRONG_PASSWORD,
        "next": "/admin/"})
    assert status == 200, _[:3000]
    status, page = client.call("GET", f"/admin/accounts/user/{user_id}/change/")
    assert status == 200, page[:2000]
    for context in settings.BOUNDED_CONTEXTS:
        assert re.search(rf"database {context} \([^)]*\) unreachable", page), context
        # Its readiness, from accounts' own projection, is there all the same.
        assert re.search(rf'data-service="{context}" [^>]*data-ready="true"', page), context
    # The Event flow page counts each inbox and each context's waiting announcements there:
    # "unreachable" for each, not a 500.
    status, page = client.call("GET", "/admin/eventbus/flow/")
    assert status == 200, page[:2000]
    for context in settings.BOUNDED_CONTEXTS:
        assert re.search(rf"consumer {context}: inbox not read: database {context} \([^)]*\) "
                         "unreachable", page), context
        assert f"consumer {context}: announcements not read: database {context}" in page
    # A service's own rows in the admin, and its inbox: one line naming the database, a 503.
    for path in ("/admin/players/player/", "/admin/buildings/building/",
                 "/admin/eventbus/processedevent/?consumer=characters"):
        status, page = client.call("GET", path)
        context = re.search(r"players|buildings|characters", path).group()
        assert status == 503, (path, page[:2000])
        assert re.search(rf'id="unreachable">database {context} \(postgres://nobody@[^)]*\) '
                         "unreachable: OperationalError", page), page[:3000]
    assert web.poll() is None


def test_reconcile_names_the_service_database_it_cannot_reach_in_one_line(manage, jetstream):
    """reconcile reads every service's database (the operator's credentials): one it cannot
    reach ends the run with one line naming it, not a traceback."""
    from accounts.services import user_register

    user_register(username="someone", email="someone@example.com", password=STRONG_PASSWORD)
    process = manage("reconcile", "--min-age", "0", **nowhere())
    assert process.wait(60) == 1
    output = process.output()
    assert "Traceback" not in output, output
    assert re.search(r"service \w+: database \w+ \(postgres://nobody@127\.0\.0\.1:\d+/\w+\) "
                     r"unreachable: OperationalError", output), output

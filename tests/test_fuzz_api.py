"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis 4).

schemathesis reads /api/schema/ from the real WSGI application (every middleware, the exception
handler, the test databases) and sends each operation inputs it derives from the schema, valid
and invalid, to the same application; each response must be no 5xx and match what the schema
documents for it: the status code, the content type, the headers (Retry-After on a 429) and the
body. The throttles stay on, at small rates, so that the fuzzer also meets 429s: they are part
of what the schema documents, not something to hide from it.

Bounded: at most ``MAX_EXAMPLES`` generated cases per operation, no deadline per case (the
first request of a test pays for URL resolving and the schema); the fast test hasher. The
cases run, per status, are printed at the end of the module (``-s`` to see them).
"""

from __future__ import annotations

import collections
import os

import pytest
import schemathesis
from django.core.cache import cache
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token
from rest_framework.throttling import ScopedRateThrottle
from schemathesis.specs.openapi.checks import positive_data_acceptance

from accounts.apis import EXAMPLE_PASSWORD
from accounts.models import User
from accounts.throttles import UsernameRateThrottle

# A longer run by hand: FUZZ_MAX_EXAMPLES=2000 pytest tests/test_fuzz_api.py -s
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "100"))
# The production defaults (onboarding/settings.py): each operation's test starts with an empty
# cache, so its first requests get past the throttles to the validation they probe, and its
# last ones meet the 429.
RATES = {"register": "60/minute", "token": "60/minute", "token_username": "20/hour"}

SEEN: collections.Counter = collections.Counter()


class WsgiApp:
    """Django's WSGI application, less what Django's own test client leaves out too: closing
    the database connections as each request starts and ends, which would end the test's
    transaction (and with it the test database's isolation) at the first request."""

    def __init__(self) -> None:
        self.handler = get_wsgi_application()

    def __call__(self, environ, start_response):
        for signal in (request_started, request_finished):
            signal.disconnect(close_old_connections)
        try:
            response = self.handler(environ, start_response)
            body = b"".join(response)  # the API streams nothing
            response.close()
            return [body]
        finally:
            for signal in (request_started, request_finished):
                signal.connect(close_old_connections)


# Loaded at import, as the test is generated per operation at collection. The schema endpoint
# touches no database.
schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", WsgiApp())
schema.config.generation.update(max_examples=MAX_EXAMPLES)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nschemathesis: {sum(SEEN.values())} cases;",
          ", ".join(f"{key}: {count}" for key, count in sorted(SEEN.items())))


@pytest.fixture
def throttled(monkeypatch):
    cache.clear()
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", dict(RATES))
    monkeypatch.setattr(UsernameRateThrottle, "THROTTLE_RATES", dict(RATES))
    yield
    cache.clear()


# The staff user's token: fixed, since schemathesis asks for it at collection too, where there
# is no database; each case (re)creates its row (a case may have revoked it with a logout, and
# each test's transaction is rolled back after it).
STAFF_TOKEN = "fuzz0staff0token0" + "0" * 23


def staff_token_exists() -> None:
    # Found by e-mail: an earlier case may have renamed the user (PATCH /api/auth/me).
    user, _ = User.objects.get_or_create(
        email="fuzz-staff@example.com", defaults={"username": "fuzz-staff", "is_staff": True}
    )
    Token.objects.get_or_create(user=user, defaults={"key": STAFF_TOKEN})


def example_user_exists() -> None:
    """The user of the login's documented example (which the fuzzer sends too): its 200. Not
    for the register operation's test, whose example registers that user: its 201."""
    if not User.objects.filter(username="sam").exists():
        User.objects.create_user("sam", "sam@example.com", EXAMPLE_PASSWORD)


@schema.auth(refresh_interval=None)
class StaffToken:
    """The authenticated operations are fuzzed as staff, beyond their 401; schemathesis also
    sends each of them without the token and with a made-up one, and expects the 401."""

    def get(self, case, context) -> str:
        return STAFF_TOKEN

    def set(self, case, data, context) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Token {data}"}


@pytest.mark.django_db(databases="__all__")
@schema.parametrize()
# derandomize: the same cases on every run (CI does not flake, a failure reproduces; schemathesis
# also prints a curl command for it); no example database written into the checkout.
@settings(deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_api_answers_as_its_schema_says(case, throttled):
    staff_token_exists()
    if case.path == "/api/auth/token":
        example_user_exists()
    response = case.call()
    SEEN[f"{case.method} {case.path} {response.status_code}"] += 1
    case.validate_response(
        response,
        # Input that fits the schema may still be refused with a documented 400: a username
        # already taken, a password too common or too like the username, wrong credentials.
        # Rules the schema cannot express; the 400's body is still checked against it.
        excluded_checks=[positive_data_acceptance],
    )

"""The OpenAPI schema (/api/schema/) and docs (/api/docs/) say what the API really answers.

Every response the schema documents — each (method, path, status) — is produced here with the
test client and its body validated with jsonschema against the schema's own description of it
(its documented headers too); and every documented response must have a case here, so a
status added to the schema without a test, or a case whose status the schema lacks, fails.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import jsonschema
import pytest
from django.core.cache import cache
from drf_spectacular.validation import validate_schema
from rest_framework.authtoken.models import Token
from rest_framework.throttling import ScopedRateThrottle

from accounts.models import User
from onboarding.dev.natsserver import free_port
from onboarding.eventbus.registry import get_services
from tests.flow import (
    STRONG_PASSWORD,
    deliver_announcements,
    handle_as_consumer,
    register,
    sample_event,
)

pytestmark = pytest.mark.django_db(databases="__all__")

ME = "/api/auth/me"
LOGOUT = "/api/auth/logout"
ME_ONBOARDING = "/api/auth/me/onboarding"
USER_ONBOARDING = "/api/users/{userId}/onboarding"
USER = "/api/users/{userId}"


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    from django.test import Client

    with django_db_blocker.unblock():
        response = Client().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return json.loads(response.content)


class World:
    """What the cases need: a registered user with a token, staff with a token."""

    def __init__(self, client, settings, monkeypatch):
        self.client, self.settings, self.monkeypatch = client, settings, monkeypatch
        response = register(client, "sam")
        assert response.status_code == 201
        self.user = User.objects.get(pk=response.json()["userId"])
        self.token = Token.objects.create(user=self.user).key
        self.staff = User.objects.create(username="staff", email="s@example.com", is_staff=True)
        self.staff_token = Token.objects.create(user=self.staff).key

    def get(self, path, token=None):
        headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if token else {}
        return self.client.get(path, **headers)

    def logout(self, token=None):
        headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if token else {}
        return self.client.post(LOGOUT, **headers)

    def post(self, path, data, content_type="application/json"):
        body = json.dumps(data) if content_type == "application/json" else data
        return self.client.post(path, data=body, content_type=content_type)

    def send(self, method, path, data=None, token=None, content_type="application/json"):
        """PATCH or DELETE ``path`` with a body, as the token's user."""
        headers = {"HTTP_AUTHORIZATION": f"Token {token}"} if token else {}
        body = json.dumps(data) if content_type == "application/json" else data
        return getattr(self.client, method)(path, data=body, content_type=content_type,
                                            **headers)

    def throttle_after_one(self, scope, path, data, method="post", token=None):
        cache.clear()
        self.monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {scope: "1/minute"})
        if method == "post":
            self.post(path, data)
            return self.post(path, data)
        self.send(method, path, data, token)
        return self.send(method, path, data, token)

    def too_large(self, path, method="post", token=None):
        self.settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64
        data = {"username": "x" * 100, "password": "y"}
        return self.post(path, data) if method == "post" else self.send(method, path, data, token)

    def onboarded_get(self, path):
        """GET ``path`` once every service has set the user up (as its consumer does)."""
        event = sample_event(user_id=self.user.id, username=self.user.username)
        for spec in get_services().values():
            handle_as_consumer(spec, [event])
        deliver_announcements()  # what consume accounts does with what they announced
        return self.get(path, self.token)


def new_user(n=1):
    return {"username": f"new{n}", "email": f"new{n}@example.com", "password": STRONG_PASSWORD}


def user_onboarding(user_id) -> str:
    return USER_ONBOARDING.replace("{userId}", str(user_id))


def user_path(user_id) -> str:
    return USER.replace("{userId}", str(user_id))


def readyz_without_nats(w: World):
    w.settings.OUTBOX_FAST_PATH = "publish"
    w.settings.NATS_URL = f"nats://127.0.0.1:{free_port()}"
    return w.get("/readyz")


# (method, documented path, status) → how to get that response.
CASES: dict[tuple[str, str, str], Callable[[World], object]] = {
    ("get", "/", "200"): lambda w: w.get("/"),
    ("get", "/healthz", "200"): lambda w: w.get("/healthz"),
    ("get", "/readyz", "200"): lambda w: w.get("/readyz"),
    ("get", "/readyz", "503"): readyz_without_nats,
    ("post", "/api/auth/register", "201"): lambda w: w.post("/api/auth/register", new_user()),
    ("post", "/api/auth/register", "400"): lambda w: w.post(
        "/api/auth/register", {"username": "bad name!", "email": "x", "password": "1"}
    ),
    ("post", "/api/auth/register", "413"): lambda w: w.too_large("/api/auth/register"),
    ("post", "/api/auth/register", "415"): lambda w: w.post(
        "/api/auth/register", "username=sam", content_type="application/x-www-form-urlencoded"
    ),
    ("post", "/api/auth/register", "429"): lambda w: w.throttle_after_one(
        "register", "/api/auth/register", new_user(2)
    ),
    ("post", "/api/auth/token", "200"): lambda w: w.post(
        "/api/auth/token", {"username": "SAM", "password": STRONG_PASSWORD}
    ),
    ("post", "/api/auth/token", "400"): lambda w: w.post(
        "/api/auth/token", {"username": "sam", "password": "wrong"}
    ),
    ("post", "/api/auth/token", "413"): lambda w: w.too_large("/api/auth/token"),
    ("post", "/api/auth/token", "415"): lambda w: w.post(
        "/api/auth/token", "username=sam", content_type="application/x-www-form-urlencoded"
    ),
    ("post", "/api/auth/token", "429"): lambda w: w.throttle_after_one(
        "token", "/api/auth/token", {"username": "sam", "password": "wrong"}
    ),
    ("post", LOGOUT, "204"): lambda w: w.logout(w.token),
    ("post", LOGOUT, "401"): lambda w: w.logout(),
    ("get", ME, "200"): lambda w: w.get(ME, w.token),
    ("get", ME, "401"): lambda w: w.get(ME),
    ("patch", ME, "200"): lambda w: w.send("patch", ME, {"username": "sammy"}, w.token),
    ("patch", ME, "400"): lambda w: w.send("patch", ME, {"username": "STAFF"}, w.token),
    ("patch", ME, "401"): lambda w: w.send("patch", ME, {"username": "sammy"}),
    ("patch", ME, "413"): lambda w: w.too_large(ME, "patch", w.token),
    ("patch", ME, "415"): lambda w: w.send(
        "patch", ME, "username=sammy", w.token, content_type="application/x-www-form-urlencoded"
    ),
    ("delete", ME, "204"): lambda w: w.send("delete", ME, {"password": STRONG_PASSWORD}, w.token),
    ("delete", ME, "400"): lambda w: w.send("delete", ME, {"password": "wrong"}, w.token),
    ("delete", ME, "401"): lambda w: w.send("delete", ME, {"password": STRONG_PASSWORD}),
    ("delete", ME, "413"): lambda w: w.too_large(ME, "delete", w.token),
    ("delete", ME, "415"): lambda w: w.send(
        "delete", ME, "password=x", w.token, content_type="application/x-www-form-urlencoded"
    ),
    ("delete", ME, "429"): lambda w: w.throttle_after_one(
        "token", ME, {"password": "wrong"}, method="delete", token=w.token
    ),
    ("get", ME_ONBOARDING, "200"): lambda w: w.onboarded_get(ME_ONBOARDING),
    ("get", ME_ONBOARDING, "401"): lambda w: w.get(ME_ONBOARDING, "not-a-token"),
    ("get", USER_ONBOARDING, "200"): lambda w: w.get(user_onboarding(w.user.id), w.staff_token),
    ("get", USER_ONBOARDING, "401"): lambda w: w.get(user_onboarding(w.user.id)),
    ("get", USER_ONBOARDING, "403"): lambda w: w.get(user_onboarding(w.staff.id), w.token),
    ("get", USER_ONBOARDING, "404"): lambda w: w.get(
        user_onboarding(uuid.uuid4()), w.staff_token
    ),
    ("delete", USER, "204"): lambda w: w.send("delete", user_path(w.user.id), token=w.staff_token),
    ("delete", USER, "401"): lambda w: w.send("delete", user_path(w.user.id)),
    ("delete", USER, "403"): lambda w: w.send("delete", user_path(w.staff.id), token=w.token),
    ("delete", USER, "404"): lambda w: w.send("delete", user_path(uuid.uuid4()),
                                              token=w.staff_token),
}


def documented(schema) -> set[tuple[str, str, str]]:
    return {
        (method, path, status)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        for status in operation["responses"]
    }


def test_the_schema_is_valid_openapi(schema):
    validate_schema(schema)
    assert schema["openapi"].startswith("3.")


def test_every_documented_response_has_a_case_and_every_case_is_documented(schema):
    assert documented(schema) == set(CASES)


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda key: " ".join(key))
def test_the_response_matches_the_schema(schema, key, client, settings, monkeypatch):
    method, path, status = key
    response = CASES[key](World(client, settings, monkeypatch))
    cache.clear()
    assert str(response.status_code) == status, response.content[:300]

    documented_response = schema["paths"][path][method]["responses"][status]
    if status == "204":
        assert "content" not in documented_response and response.content == b""
        return
    content = documented_response["content"]
    assert response["Content-Type"].split(";")[0] in content
    body_schema = content["application/json"]["schema"]
    # Local $refs (#/components/...) resolve against this document.
    validator = jsonschema.Draft202012Validator(
        {**body_schema, "components": schema["components"]}
    )
    validator.validate(response.json())
    for header, spec in documented_response.get("headers", {}).items():
        assert header in response, f"{header} documented but not sent"
        jsonschema.validate(int(response[header]), spec["schema"])


def test_error_components_refuse_other_shapes(schema):
    """The error schemas are strict: a string detail or an undocumented key does not pass."""
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/Error", "components": schema["components"]}
    )
    assert validator.is_valid({"detail": ["Not found."]})
    assert not validator.is_valid({"detail": "Not found."})
    assert not validator.is_valid({"non_field_errors": ["x"]})
    assert not validator.is_valid({})


def test_the_docs_page_serves_swagger_ui_from_this_server(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower() and "https://" not in page
    assert "/api/schema/" in page


def test_the_swagger_ui_files_exist_locally():
    from django.contrib.staticfiles import finders

    for name in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        assert finders.find(f"drf_spectacular_sidecar/swagger-ui-dist/{name}"), name


def test_the_index_links_to_the_docs_schema_admin_and_probes(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.json() == {
        "docs": "/api/docs/", "schema": "/api/schema/", "admin": "/admin/",
        "healthz": "/healthz", "readyz": "/readyz",
    }
    for path in response.json().values():
        assert client.get(path).status_code in (200, 302), path


# -- the docs read in the order a client uses the API ---------------------------------------


def test_operations_are_listed_in_the_order_a_client_uses_them(schema):
    """Swagger UI lists operations in the schema's order (no ``operationsSorter``): register,
    log in, read yourself (rename, erase), your onboarding, log out; then the staff endpoints;
    then the rest."""
    operations = [(path, method) for path, methods in schema["paths"].items()
                  for method in methods]
    assert operations[:9] == [
        ("/api/auth/register", "post"),
        ("/api/auth/token", "post"),
        (ME, "get"),
        (ME, "patch"),
        (ME, "delete"),
        (ME_ONBOARDING, "get"),
        (LOGOUT, "post"),
        (USER_ONBOARDING, "get"),
        (USER, "delete"),
    ]
    rest = operations[9:]
    assert rest == sorted(rest) and {path for path, _ in rest} == {"/", "/healthz", "/readyz"}


def test_the_docs_page_keeps_the_schema_order(client):
    page = client.get("/api/docs/").content.decode()
    assert "operationsSorter" not in page


def test_the_token_scheme_says_exactly_what_to_type(schema):
    """Swagger UI's "Authorize" box sends what is typed as the whole Authorization header."""
    scheme = schema["components"]["securitySchemes"]["tokenAuth"]
    assert scheme["type"] == "apiKey" and scheme["in"] == "header"
    assert scheme["name"] == "Authorization"
    assert scheme["description"].startswith(
        "Type exactly: `Token <the token from POST /api/auth/token>`"
    ), scheme["description"]

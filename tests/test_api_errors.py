"""One error shape everywhere: {"<field>": ["<problem>", ...]}, "detail" for the rest; a JSON
413 for a body over the limit; Retry-After on every 429; one message per problem; and login
that finds a user as registration compares them (NFKC, case-insensitive)."""

from __future__ import annotations

import json

import pytest
from django.core.cache import cache
from rest_framework.throttling import ScopedRateThrottle

from accounts.models import User
from tests.flow import STRONG_PASSWORD, register

pytestmark = pytest.mark.django_db


def post_json(client, path, body, **extra):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **extra)


def login(client, username, password=STRONG_PASSWORD):
    return post_json(client, "/api/auth/token", {"username": username, "password": password})


def assert_error_shape(response):
    """Every key a list of one or more strings, and the body JSON."""
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    body = response.json()
    assert isinstance(body, dict) and body, body
    for key, problems in body.items():
        assert isinstance(key, str)
        assert isinstance(problems, list) and problems, body
        assert all(isinstance(problem, str) and problem for problem in problems), body
    return body


@pytest.fixture
def throttle(monkeypatch):
    """Set throttle rates for the test (DRF reads them once, at import)."""
    cache.clear()

    def set_rates(**rates):
        monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", rates)

    yield set_rates
    cache.clear()


# -- bodies that are not what the API takes -----------------------------------------------


@pytest.mark.parametrize(
    "body, problem",
    [
        ("not json", "JSON parse error"),
        ("[1, 2]", "Expected a dictionary, but got list"),
        ('"a string"', "Expected a dictionary, but got str"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_detail_list(client, body, problem):
    response = post_json(client, "/api/auth/register", body)
    assert response.status_code == 400
    body = assert_error_shape(response)
    assert list(body) == ["detail"] and problem in body["detail"][0], body


def test_form_data_is_a_415_in_the_shape(client):
    response = client.post("/api/auth/register", data={"username": "sam"})
    assert response.status_code == 415
    assert list(assert_error_shape(response)) == ["detail"]


@pytest.mark.parametrize("debug", [False, True])
def test_a_body_over_the_upload_limit_is_a_json_413(client, settings, debug):
    settings.DEBUG = debug
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    big = json.dumps({"username": "x" * (limit + 1), "email": "a@example.com", "password": "p"})
    response = post_json(client, "/api/auth/register", big)
    assert response.status_code == 413, response.content[:300]
    assert assert_error_shape(response) == {
        "detail": [f"The request body is larger than the limit of {limit} bytes."]
    }
    assert not User.objects.exists()


def test_the_token_endpoint_answers_413_too(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 100
    response = post_json(client, "/api/auth/token", {"username": "s" * 200, "password": "p"})
    assert response.status_code == 413
    assert list(assert_error_shape(response)) == ["detail"]


# -- one message per problem --------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("username", "x" * 1_000_000, "Ensure this field has no more than 150 characters."),
        ("username", "bad name!" * 20, "Ensure this field has no more than 150 characters."),
        ("email", "a" * 1_000_000 + "@example.com",
         "Ensure this field has no more than 254 characters."),
    ],
)
def test_a_value_too_long_gets_one_message(client, field, value, message):
    data = {"username": "sam", "email": "sam@example.com", "password": STRONG_PASSWORD}
    data[field] = value
    response = post_json(client, "/api/auth/register", data)
    assert response.status_code == 400
    assert assert_error_shape(response) == {field: [message]}


def test_a_username_of_the_maximum_length_is_accepted(client):
    assert register(client, "x" * 150).status_code == 201


def test_field_problems_stay_under_their_field(client):
    response = post_json(client, "/api/auth/register", {"username": "bad name!"})
    assert response.status_code == 400
    body = assert_error_shape(response)
    assert set(body) == {"username", "email", "password"}
    assert body["email"] == ["This field is required."]


def test_a_taken_username_is_a_field_error(client):
    assert register(client, "sam").status_code == 201
    response = register(client, "SAM", email="other@example.com")
    assert response.status_code == 400
    assert assert_error_shape(response) == {
        "username": ["A user with that username already exists."]
    }


# -- authentication, permissions, unknown URLs, throttles ----------------------------------


def test_no_token_is_a_401_with_a_detail_list(client):
    response = client.get("/api/auth/me")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert assert_error_shape(response) == {
        "detail": ["Authentication credentials were not provided."]
    }


def test_a_bad_token_is_a_401_with_a_detail_list(client):
    response = client.get("/api/auth/me", HTTP_AUTHORIZATION="Token nope")
    assert response.status_code == 401
    assert assert_error_shape(response) == {"detail": ["Invalid token."]}


def test_an_unknown_url_is_a_json_404(client):
    response = client.get("/api/no-such-endpoint")
    assert response.status_code == 404
    assert assert_error_shape(response) == {"detail": ["Not found."]}


def test_a_wrong_method_is_a_405_in_the_shape(client):
    response = client.get("/api/auth/register")
    assert response.status_code == 405
    assert assert_error_shape(response) == {"detail": ['Method "GET" not allowed.']}


# -- with DEBUG on (make run) as with it off: never one of Django's HTML pages under /api/ -----


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
@pytest.mark.parametrize("path", [
    "/api/auth/register/",  # a trailing slash: the API's paths have none
    "/api/users/not-a-uuid/onboarding",  # the URL's converter refuses it
    "/api/nope",
    "/api/",
])
def test_an_unknown_api_url_is_a_json_404_with_debug_on_too(client, settings, caplog, debug,
                                                            path):
    settings.DEBUG = debug
    for method in (client.get, client.post):
        caplog.clear()
        response = method(path)
        assert response.status_code == 404, (method, response.content[:200])
        assert assert_error_shape(response) == {"detail": ["Not found."]}
        assert [r.getMessage() for r in caplog.records if r.name == "django.request"] == [
            f"Not Found: {path}"
        ]


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
@pytest.mark.parametrize("method, path", [
    ("get", "/api/auth/register"), ("delete", "/api/auth/token"), ("post", "/api/docs/"),
])
def test_a_wrong_method_is_a_json_405_with_debug_on_too(client, settings, debug, method, path):
    settings.DEBUG = debug
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert assert_error_shape(response) == {
        "detail": [f'Method "{method.upper()}" not allowed.']
    }
    assert response["Allow"]


def crash(self, request):
    raise ZeroDivisionError("a bug in a view")


def test_an_unhandled_exception_is_a_json_500(settings, monkeypatch, caplog):
    """With DEBUG off: the shape, and nothing of the exception (it may carry anything)."""
    from django.test import Client

    from accounts.apis import UserRegisterApi

    settings.DEBUG = False
    monkeypatch.setattr(UserRegisterApi, "post", crash)
    response = Client(raise_request_exception=False).post("/api/auth/register")
    assert response.status_code == 500
    assert assert_error_shape(response) == {"detail": ["Server error."]}
    assert "Internal Server Error: /api/auth/register" in caplog.text


def test_with_debug_on_an_unhandled_exception_is_a_json_500_that_names_it(
    settings, monkeypatch, caplog
):
    """With DEBUG on (make run): the shape too, not Django's technical page (HTML to a
    browser, plain text to curl). What a developer needs from it, in the shape: the exception,
    and where its traceback is (the server's log, which still gets it, as with DEBUG off)."""
    from django.test import Client

    from accounts.apis import UserRegisterApi

    settings.DEBUG = True
    monkeypatch.setattr(UserRegisterApi, "post", crash)
    for accept in ("text/html", "*/*", "application/json"):
        response = Client(raise_request_exception=False).post(
            "/api/auth/register", HTTP_ACCEPT=accept
        )
        assert response.status_code == 500
        assert assert_error_shape(response) == {"detail": [
            "Server error.",
            "ZeroDivisionError: a bug in a view (DEBUG is on; the traceback is in the "
            "server's log)",
        ]}
    records = [r for r in caplog.records if r.name == "django.request"]
    assert len(records) == 3, [r.getMessage() for r in records]  # once per request
    assert all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in records)


def test_pages_outside_the_api_keep_django_s_debug_pages(client, settings):
    """The admin and the rest are HTML pages for people: Django's debug 404 stays theirs."""
    settings.DEBUG = True
    response = client.get("/nope")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("path", ["/api/auth/register", "/api/auth/token"])
def test_a_429_carries_retry_after(client, throttle, path):
    throttle(register="1/minute", token="1/minute")
    body = {"username": "sam", "email": "sam@example.com", "password": STRONG_PASSWORD}
    post_json(client, path, body)
    response = post_json(client, path, body)
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    body = assert_error_shape(response)
    assert list(body) == ["detail"] and "throttled" in body["detail"][0]


def test_retry_after_is_never_zero(client, throttle, monkeypatch):
    """DRF writes int(wait): a wait under a second would tell the client to retry at once."""
    throttle(token="1/minute")
    monkeypatch.setattr(ScopedRateThrottle, "wait", lambda self: 0.2)
    login(client, "sam")
    response = login(client, "sam")
    assert response.status_code == 429
    assert response["Retry-After"] == "1"


# -- login ----------------------------------------------------------------------------------


def test_a_failed_login_is_a_detail_list(client):
    register(client, "sam")
    response = login(client, "sam", password="wrong")
    assert response.status_code == 400
    assert assert_error_shape(response) == {
        "detail": ["Unable to log in with provided credentials."]
    }
    assert login(client, "nobody").json() == response.json()  # unknown user: same answer


def test_login_requires_both_fields_by_name(client):
    response = post_json(client, "/api/auth/token", {})
    assert response.status_code == 400
    assert set(assert_error_shape(response)) == {"username", "password"}


@pytest.mark.parametrize("spelling", ["SAM", "Sam", "ｓａｍ", "  sam  "])
def test_login_finds_the_user_as_registration_does(client, spelling):
    user_id = register(client, "sam").json()["userId"]
    response = login(client, spelling)
    assert response.status_code == 200, response.content
    me = client.get("/api/auth/me", HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert me.json()["userId"] == user_id


def test_login_by_another_case_of_a_mixed_case_username(client):
    register(client, "MixedCase")
    assert login(client, "mixedcase").status_code == 200
    assert login(client, "MIXEDCASE", password="wrong").status_code == 400


def test_an_inactive_user_cannot_log_in(client):
    register(client, "sam")
    User.objects.filter(username="sam").update(is_active=False)
    response = login(client, "SAM")
    assert response.status_code == 400
    assert response.json() == {"detail": ["Unable to log in with provided credentials."]}

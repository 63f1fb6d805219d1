"""Abuse limits on the web side: the token endpoint per username, the admin login's lockout,
API tokens that expire and can be revoked — and a 429 with Retry-After wherever a limit fires.

The per-address throttles (register, token) and their Retry-After are covered in
tests/test_api_errors.py; across gunicorn workers in tests/test_gunicorn.py.
"""

from __future__ import annotations

import datetime as dt

import pytest
from axes.models import AccessAttempt
from django.core.cache import cache
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.throttling import ScopedRateThrottle

from accounts.models import User
from accounts.throttles import UsernameRateThrottle
from tests.flow import STRONG_PASSWORD, register
from tests.test_api_errors import assert_error_shape, login, post_json

pytestmark = pytest.mark.django_db

ADMIN_LOGIN = "/admin/login/"


@pytest.fixture
def rates(monkeypatch):
    """Throttle rates for the test (DRF reads them once, at import); a clean cache around it."""
    cache.clear()

    def set_rates(*, token_username=None, **scoped):
        monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES",
                            {"register": None, "token": None, **scoped})
        monkeypatch.setattr(UsernameRateThrottle, "THROTTLE_RATES",
                            {"token_username": token_username})

    yield set_rates
    cache.clear()


def login_from(client, address, username, password="wrong-password"):
    return post_json(client, "/api/auth/token", {"username": username, "password": password},
                     REMOTE_ADDR=address)


def assert_throttled(response, most: int):
    assert response.status_code == 429, response.content
    assert 1 <= int(response["Retry-After"]) <= most
    body = assert_error_shape(response)
    assert list(body) == ["detail"] and "throttled" in body["detail"][0]


# --- 1. the token endpoint, per username ------------------------------------------------------


def test_a_distributed_guess_at_one_username_is_throttled(client, rates):
    """Each guess from another address: the per-address throttle never fires, this one does."""
    rates(token="2/minute", token_username="3/minute")
    register(client, "sam")
    # One account however it is spelled: the login finds "sam" by every one of these.
    spellings = ["sam", "SAM", " Sam ", "ｓａｍ", "sAm"]
    statuses = [login_from(client, f"127.0.1.{i}", name).status_code
                for i, name in enumerate(spellings)]
    assert statuses == [400, 400, 400, 429, 429]
    assert_throttled(login_from(client, "127.0.1.99", "sam", STRONG_PASSWORD), most=60)
    # Another account is not held up by the guessing at this one.
    register(client, "kim")
    assert login_from(client, "127.0.1.100", "kim", STRONG_PASSWORD).status_code == 200


def test_the_per_username_throttle_counts_in_the_configured_cache(client, rates, settings):
    """Not per-process memory: the counts are where CACHES["default"] says (shared by every
    web worker with CACHE_URL=dbcache://...; across real workers in tests/test_gunicorn.py)."""
    rates(token_username="1/minute")
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
    # A cache that keeps nothing forgets every attempt: never throttled.
    assert [login_from(client, "127.0.2.1", "sam").status_code for _ in range(3)] == [400] * 3


def test_a_body_without_a_username_is_not_counted_against_anyone(client, rates):
    rates(token_username="1/minute")
    for body in ({}, {"username": 5, "password": "x"}, {"username": "  ", "password": "x"}):
        assert post_json(client, "/api/auth/token", body).status_code == 400
    assert login(client, "sam", "wrong").status_code == 400  # its first attempt
    assert_throttled(login(client, "sam", "wrong"), most=60)


def test_with_the_throttle_on_bad_bodies_keep_their_own_answers(client, rates, settings):
    """The throttle reads the body before the view does: what the body's parsing answers
    (400, 413, 415) must come out as the view's would, in the error shape."""
    rates(token_username="5/minute")
    response = post_json(client, "/api/auth/token", "not json")
    assert response.status_code == 400
    assert "JSON parse error" in assert_error_shape(response)["detail"][0]
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64
    response = post_json(client, "/api/auth/token", {"username": "x" * 100, "password": "y"})
    assert response.status_code == 413
    assert_error_shape(response)
    response = client.post("/api/auth/token", {"username": "sam", "password": "x"})  # a form
    assert response.status_code == 415
    assert_error_shape(response)


# --- 2. the admin login's lockout (django-axes) -----------------------------------------------


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("admin", "admin@example.com", "pw-right")


@pytest.fixture
def lockout(settings):
    settings.AXES_FAILURE_LIMIT = 3
    settings.AXES_COOLOFF_TIME = dt.timedelta(minutes=15)
    return settings


def admin_login(client, password, username="admin", address="127.0.0.1"):
    return client.post(ADMIN_LOGIN, {"username": username, "password": password,
                                     "next": "/admin/"}, REMOTE_ADDR=address)


def assert_locked_out(response, cool_off_seconds=15 * 60):
    assert response.status_code == 429, response.status_code
    assert response["Retry-After"] == str(cool_off_seconds)
    page = response.content.decode()
    assert "Too many failed logins" in page and "Try again in 15 minutes" in page


def test_wrong_admin_logins_lock_out_the_right_password_too(client, admin_user, lockout):
    assert [admin_login(client, "wrong").status_code for _ in range(2)] == [200, 200]
    assert_locked_out(admin_login(client, "wrong"))  # the third: the limit
    assert_locked_out(admin_login(client, "pw-right"))
    assert "_auth_user_id" not in client.session


def test_the_lockout_ends_after_the_cool_off(client, admin_user, lockout):
    for _ in range(3):
        admin_login(client, "wrong")
    assert_locked_out(admin_login(client, "pw-right"))
    # 15 minutes pass (every attempt, the refused one too, moved the wait).
    AccessAttempt.objects.update(attempt_time=timezone.now() - dt.timedelta(minutes=15, seconds=1))
    response = admin_login(client, "pw-right")
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert not AccessAttempt.objects.exists()  # and the success cleared the count


def test_a_successful_admin_login_resets_the_count(client, admin_user, lockout):
    for _ in range(2):
        admin_login(client, "wrong")
    assert admin_login(client, "pw-right").status_code == 302
    client.logout()
    # Two more failures: four in all, but only two since the success.
    assert [admin_login(client, "wrong").status_code for _ in range(2)] == [200, 200]
    assert admin_login(client, "pw-right").status_code == 302


def test_a_distributed_guess_at_one_admin_is_locked_out(client, admin_user, lockout):
    """One address each, any spelling of the name: the username alone locks."""
    for i, name in enumerate(["admin", "ADMIN", "Admin"]):
        admin_login(client, "wrong", username=name, address=f"127.0.3.{i}")
    assert_locked_out(admin_login(client, "pw-right", address="127.0.3.200"))


def test_one_address_guessing_at_many_accounts_is_locked_out(client, admin_user, lockout):
    for name in ("root", "ops", "staff"):
        admin_login(client, "wrong", username=name, address="127.0.4.1")
    assert_locked_out(admin_login(client, "pw-right", address="127.0.4.1"))
    # Another address may still log in as admin (no failures at that name).
    assert admin_login(client, "pw-right", address="127.0.4.2").status_code == 302


def test_api_logins_are_left_to_the_api_throttles(client, admin_user, lockout):
    """axes records and checks the admin's logins only: failed API logins neither count
    towards the admin's lockout nor are refused by it."""
    for _ in range(5):
        assert login(client, "admin", "wrong").status_code == 400
    assert not AccessAttempt.objects.exists()
    assert admin_login(client, "pw-right").status_code == 302


def test_the_lockout_can_be_switched_off(client, admin_user, lockout):
    lockout.AXES_ENABLED = False
    for _ in range(4):
        assert admin_login(client, "wrong").status_code == 200
    assert admin_login(client, "pw-right").status_code == 302


# --- 3. API tokens that expire and can be revoked ---------------------------------------------


def me(client, token):
    return client.get("/api/auth/me", HTTP_AUTHORIZATION=f"Token {token}")


@pytest.fixture
def token_of_sam(client):
    register(client, "sam")
    response = login(client, "sam")
    assert response.status_code == 200
    return response.json()


def age_token(key, seconds):
    Token.objects.filter(key=key).update(created=timezone.now() - dt.timedelta(seconds=seconds))


def test_the_login_says_when_the_token_expires(client, settings, token_of_sam):
    settings.AUTH_TOKEN_TTL = 3600
    body = login(client, "sam").json()
    token = Token.objects.get(key=body["token"])
    expected = token.created + dt.timedelta(seconds=3600)
    assert dt.datetime.fromisoformat(body["expiresAt"]) == expected
    assert body["expiresAt"].endswith("Z")


def test_an_expired_token_is_a_401_in_the_error_shape(client, settings, token_of_sam):
    settings.AUTH_TOKEN_TTL = 3600
    key = token_of_sam["token"]
    age_token(key, 3599)
    assert me(client, key).status_code == 200
    age_token(key, 3600)
    response = me(client, key)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert assert_error_shape(response) == {"detail": ["Token has expired; log in again."]}


def test_logging_in_again_replaces_an_expired_token(client, settings, token_of_sam):
    settings.AUTH_TOKEN_TTL = 3600
    old = token_of_sam["token"]
    assert login(client, "sam").json()["token"] == old  # still valid: the same token
    age_token(old, 3601)
    new = login(client, "sam").json()["token"]
    assert new != old
    assert me(client, new).status_code == 200
    assert me(client, old).status_code == 401  # dead for good, not extended


def test_with_a_ttl_of_zero_tokens_never_expire(client, settings, token_of_sam):
    settings.AUTH_TOKEN_TTL = 0
    age_token(token_of_sam["token"], 10 * 365 * 24 * 3600)
    assert me(client, token_of_sam["token"]).status_code == 200
    assert login(client, "sam").json()["expiresAt"] is None


def test_logout_revokes_the_token(client, token_of_sam):
    key = token_of_sam["token"]
    response = client.post("/api/auth/logout", HTTP_AUTHORIZATION=f"Token {key}")
    assert response.status_code == 204 and response.content == b""
    response = me(client, key)
    assert response.status_code == 401
    assert assert_error_shape(response) == {"detail": ["Invalid token."]}
    # Again with the revoked token: nothing left to revoke.
    assert client.post("/api/auth/logout", HTTP_AUTHORIZATION=f"Token {key}").status_code == 401
    new = login(client, "sam").json()["token"]
    assert new != key and me(client, new).status_code == 200


@pytest.mark.parametrize("authorization", [None, "Token nope"])
def test_logout_without_a_valid_token_is_a_401(client, authorization):
    extra = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = client.post("/api/auth/logout", **extra)
    assert response.status_code == 401
    assert list(assert_error_shape(response)) == ["detail"]


def test_logout_by_session_alone_revokes_nothing(client, token_of_sam):
    """It revokes the token the request carries; a browser session carries none."""
    client.force_login(User.objects.get(username="sam"))
    assert client.post("/api/auth/logout").status_code == 401
    assert Token.objects.filter(key=token_of_sam["token"]).exists()


def test_an_expired_token_cannot_log_out(client, settings, token_of_sam):
    settings.AUTH_TOKEN_TTL = 60
    age_token(token_of_sam["token"], 61)
    response = client.post("/api/auth/logout", HTTP_AUTHORIZATION=f"Token {token_of_sam['token']}")
    assert response.status_code == 401

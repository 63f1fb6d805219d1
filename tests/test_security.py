"""Production settings: the secret key, HTTPS, the password hasher, and a password that shows
up nowhere but in its hash.

The settings are read by real processes (``manage.py check``, a child importing the settings),
because they are decided at import from the environment.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys

import pytest
from django.conf import settings
from django.urls import reverse

from accounts.checks import check_password_hasher_is_slow
from accounts.models import User
from conftest import relay_flush, run_async, wait_until
from onboarding.eventbus.models import OutboxEvent
from tests.flow import register

MD5 = "django.contrib.auth.hashers.MD5PasswordHasher"
ARGON2 = "django.contrib.auth.hashers.Argon2PasswordHasher"


def production_env(**overrides) -> dict[str, str]:
    """This process's environment without any DJANGO_* of its own, plus a production-like one:
    DEBUG off, a real key, a host, a shared cache (or ``overrides``; None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env.update({
        "DJANGO_SETTINGS_MODULE": "onboarding.settings",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "example.com",
        "CACHE_URL": "dbcache://onboarding_cache",
    })
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def manage_py(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(settings.BASE_DIR / "manage.py"), *args],
        env=production_env(**env), capture_output=True, text=True, timeout=120,
    )


def settings_of(*names, **env) -> dict:
    """``names`` of onboarding.settings, imported in a child process with ``env``."""
    code = (
        "import json, sys; import onboarding.settings as s; "
        "print(json.dumps({n: getattr(s, n) for n in sys.argv[1:]}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *names], env=production_env(**env), capture_output=True,
        text=True, timeout=60, cwd=settings.BASE_DIR, check=True,
    )
    return json.loads(result.stdout)


# --- The secret key -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "onboarding_status", "consume"])
def test_debug_off_without_a_secret_key_refuses_to_start_in_one_line(command):
    """A command run beside `make run` without its DJANGO_DEBUG=true: one line that says what
    to export, never a traceback (Django's own began with KeyError: 'onboarding_status')."""
    result = manage_py(command, DJANGO_SECRET_KEY=None)
    assert result.returncode == 1
    assert result.stderr.startswith("manage.py: DJANGO_SECRET_KEY is not set, and with "
                                    "DJANGO_DEBUG off (production) it is required."), result.stderr
    assert "export DJANGO_DEBUG=true" in result.stderr
    assert "Traceback" not in result.stderr and "KeyError" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_empty_secret_key_is_no_key():
    result = manage_py("check", DJANGO_SECRET_KEY="")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr


def test_debug_on_runs_on_the_development_key():
    values = settings_of("SECRET_KEY", "DEVELOPMENT_SECRET_KEY", DJANGO_DEBUG="true",
                         DJANGO_SECRET_KEY=None)
    assert values["SECRET_KEY"] == values["DEVELOPMENT_SECRET_KEY"]


# --- check --deploy -------------------------------------------------------------------------------


def test_check_deploy_passes_with_a_production_like_environment():
    """What .ci/run runs: DEBUG off, a generated key, a host and a shared cache; Argon2 first."""
    result = manage_py("check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_fails_on_md5_first_with_debug_off():
    result = manage_py("check", "--deploy", DJANGO_PASSWORD_HASHERS=MD5)
    assert result.returncode != 0
    assert "accounts.E001" in result.stderr


def test_check_without_deploy_lets_a_benchmark_run_md5():
    assert manage_py("check", DJANGO_PASSWORD_HASHERS=MD5).returncode == 0


@pytest.mark.parametrize(
    ("hashers", "debug", "refused"),
    [
        ([MD5, ARGON2], False, True),
        (["django.contrib.auth.hashers.UnsaltedMD5PasswordHasher"], False, True),
        (["django.contrib.auth.hashers.UnsaltedSHA1PasswordHasher"], False, True),  # gone in 5.x
        (["django.contrib.auth.hashers.SHA1PasswordHasher"], False, True),
        (["django.contrib.auth.hashers.CryptPasswordHasher"], False, True),
        ([ARGON2, MD5], False, False),  # MD5 only verifies old hashes
        (["django.contrib.auth.hashers.PBKDF2PasswordHasher"], False, False),
        ([MD5], True, False),  # DEBUG: development
    ],
)
def test_a_fast_first_hasher_is_a_deploy_error(settings, hashers, debug, refused):
    settings.PASSWORD_HASHERS, settings.DEBUG = hashers, debug
    assert bool(check_password_hasher_is_slow(None)) is refused


def test_argon2_is_the_default_and_pbkdf2_still_verifies():
    hashers = settings_of("PASSWORD_HASHERS")["PASSWORD_HASHERS"]
    assert hashers[0] == ARGON2
    assert "django.contrib.auth.hashers.PBKDF2PasswordHasher" in hashers


def test_a_pbkdf2_hash_still_verifies_and_is_upgraded_to_argon2(settings, db):
    from django.contrib.auth.hashers import make_password

    settings.PASSWORD_HASHERS = [ARGON2, "django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    user = User.objects.create(username="old", email="old@example.com",
                               password=make_password("old-pass-1", hasher="pbkdf2_sha256"))
    assert user.check_password("old-pass-1")
    user.refresh_from_db()
    assert user.password.startswith("argon2$")


# --- HTTPS ----------------------------------------------------------------------------------------

HTTPS = ["SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
         "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_PROXY_SSL_HEADER"]


def test_https_defaults_are_secure_with_debug_off():
    assert settings_of(*HTTPS) == {
        "SECURE_SSL_REDIRECT": True, "SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31536000, "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_PROXY_SSL_HEADER": None,
    }


def test_https_defaults_are_off_with_debug_on():
    assert settings_of(*HTTPS, DJANGO_DEBUG="true") == {
        "SECURE_SSL_REDIRECT": False, "SESSION_COOKIE_SECURE": False, "CSRF_COOKIE_SECURE": False,
        "SECURE_HSTS_SECONDS": 0, "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_PROXY_SSL_HEADER": None,
    }


def test_each_https_setting_comes_from_the_environment():
    assert settings_of(
        *HTTPS,
        DJANGO_SECURE_SSL_REDIRECT="false", DJANGO_SESSION_COOKIE_SECURE="false",
        DJANGO_CSRF_COOKIE_SECURE="false", DJANGO_SECURE_HSTS_SECONDS="3600",
        DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS="false",
        DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO,https",
    ) == {
        "SECURE_SSL_REDIRECT": False, "SESSION_COOKIE_SECURE": False, "CSRF_COOKIE_SECURE": False,
        "SECURE_HSTS_SECONDS": 3600, "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],  # a tuple, in JSON
    }


def test_a_malformed_proxy_header_is_refused():
    result = manage_py("check", DJANGO_SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO")
    assert result.returncode != 0
    assert "DJANGO_SECURE_PROXY_SSL_HEADER must be <header>,<value>" in result.stderr


@pytest.fixture
def redirecting(settings):
    settings.SECURE_SSL_REDIRECT = True
    return settings


@pytest.mark.django_db(databases="__all__")
def test_plain_http_is_redirected_to_https_but_not_the_probes(client, redirecting):
    response = client.get("/api/auth/me")
    assert response.status_code == 301
    assert response["Location"] == "https://testserver/api/auth/me"
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)  # answered, whatever the verdict


def test_behind_a_tls_proxy_its_header_marks_the_request_secure(client, redirecting):
    redirecting.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert client.get("/api/auth/me").status_code == 301
    response = client.get("/api/auth/me", HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 401  # served: the API's own answer, no redirect
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


# --- The password appears nowhere -------------------------------------------------------------

PASSWORD = "Pw-nowhere-7Kq2vX9mZrTb"


async def stream_message_data(js) -> list[str]:
    info = await js.stream_info(settings.NATS_STREAM)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(settings.NATS_STREAM, seq)
        found.append(message.data.decode() + json.dumps(message.headers or {}))
    return found


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_password_appears_in_no_event_log_error_or_admin_page(client, jetstream, caplog):
    for name in ("", "accounts", "onboarding", "django"):
        caplog.set_level(logging.DEBUG, logger=name)

    response = register(client, "secretive", password=PASSWORD)
    assert response.status_code == 201, response.content
    user_id = response.json()["userId"]
    bodies = [response.content.decode()]
    # Failed registrations and logins answer 400/401: nothing of the password in their bodies.
    for failed in (
        register(client, "secretive", password=PASSWORD),  # username taken
        register(client, "other", email="not-an-email", password=PASSWORD),
        register(client, "numeric", password="73918264501738"),  # entirely numeric
        client.post("/api/auth/token", {"username": "secretive", "password": PASSWORD + "x"},
                    content_type="application/json"),
        client.post("/api/auth/token", {"username": "nobody", "password": PASSWORD},
                    content_type="application/json"),
    ):
        assert 400 <= failed.status_code < 500, failed.content
        bodies.append(failed.content.decode())
    login = client.post("/api/auth/token", {"username": "secretive", "password": PASSWORD},
                        content_type="application/json")
    assert login.status_code == 200
    bodies.append(login.content.decode())

    relay_flush()
    wait_until(lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists(),
               message="the event published")
    outbox = [row.payload + json.dumps(row.headers) for row in OutboxEvent.objects.all()]
    published = run_async(stream_message_data)
    assert len(outbox) == len(published) == 1

    stored_hash = User.objects.get(pk=user_id).password
    User.objects.create_superuser("admin", "admin@example.com", "admin-pw")
    client.logout()
    client.force_login(User.objects.get(username="admin"))
    page = client.get(reverse("admin:accounts_user_change", args=[user_id]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "secretive" in html  # the right page
    assert stored_hash not in html  # a summary of the hash, not the hash

    logs = caplog.text
    assert "user registered" in logs  # the capture saw the registration
    for where, text in [("response bodies", bodies), ("outbox", outbox),
                        ("stream", published), ("admin page", [html]), ("logs", [logs])]:
        assert not any(PASSWORD in t or "73918264501738" in t for t in text), where

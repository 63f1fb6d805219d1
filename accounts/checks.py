"""Deployment checks for the Auth Service (``manage.py check --deploy``)."""

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.checks import Error, Tags, Warning, register
from django.utils.module_loading import import_string
from rest_framework.settings import api_settings

# Caches whose contents no other process sees. DRF's throttles count requests in the default
# cache: with one of these, each of gunicorn's N workers keeps its own count and lets N times
# the rate through (DummyCache stores nothing, so it never throttles at all).
PER_PROCESS_CACHES = (LocMemCache, DummyCache)


@register(Tags.caches, deploy=True)
def check_throttle_cache_is_shared(app_configs, **kwargs):
    if settings.DEBUG or not any(api_settings.DEFAULT_THROTTLE_RATES.values()):
        return []
    cache = caches["default"]
    if not isinstance(cache, PER_PROCESS_CACHES):
        return []
    return [
        Warning(
            f"The default cache is {type(cache).__name__}, private to each process: behind "
            "several web workers every worker enforces the register and token throttles on "
            "its own, so the limits multiply by the number of workers.",
            hint="Set CACHE_URL=dbcache://onboarding_cache (manage.py migrate_all creates the "
            "table) or a redis:// URL shared by every web process.",
            id="accounts.W001",
        )
    ]


# Hashers that cost an attacker with a stolen table next to nothing per guess. Some of them are
# gone from Django 5.x (importing them fails): recognised by name too.
FAST_HASHER_NAMES = frozenset({
    "MD5PasswordHasher",
    "UnsaltedMD5PasswordHasher",
    "SHA1PasswordHasher",
    "UnsaltedSHA1PasswordHasher",
    "CryptPasswordHasher",
})


def is_fast_hasher(path: str) -> bool:
    if path.rsplit(".", 1)[-1] in FAST_HASHER_NAMES:
        return True
    from django.contrib.auth.hashers import MD5PasswordHasher

    try:
        hasher = import_string(path)
    except ImportError:
        return False
    return isinstance(hasher, type) and issubclass(hasher, MD5PasswordHasher)


@register(Tags.security, deploy=True)
def check_password_hasher_is_slow(app_configs, **kwargs):
    """The first of PASSWORD_HASHERS hashes every new password: never a fast one in production.

    A deploy check only: the test settings and the benchmarks pick MD5 on purpose (with DEBUG
    off) and never run ``check --deploy``.
    """
    first = settings.PASSWORD_HASHERS[0] if settings.PASSWORD_HASHERS else ""
    if settings.DEBUG or not is_fast_hasher(first):
        return []
    return [
        Error(
            f"The first password hasher is {first}, a fast hash: a leaked user table gives up "
            "its passwords to brute force.",
            hint="Unset DJANGO_PASSWORD_HASHERS (Argon2 first), or put "
            "django.contrib.auth.hashers.Argon2PasswordHasher first in it.",
            id="accounts.E001",
        )
    ]

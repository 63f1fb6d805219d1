"""Deployment checks for the Auth Service (``manage.py check --deploy``)."""

from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.dummy import DummyCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.checks import Tags, Warning, register
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

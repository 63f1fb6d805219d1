"""WSGI entry point (gunicorn onboarding.wsgi)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")

application = get_wsgi_application()

from onboarding.databases import name_connections  # noqa: E402 - needs the settings

# The sessions of every request (runserver's threads, gunicorn's workers) in pg_stat_activity.
name_connections("web")

from onboarding.eventbus.runtime.warmup import web_warm_up  # noqa: E402 - needs Django set up

# Before the first request rather than during it (what and why: eventbus/runtime/warmup.py).
web_warm_up()

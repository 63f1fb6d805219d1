"""WSGI entry point (gunicorn onboarding.wsgi)."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")

application = get_wsgi_application()

from onboarding.databases import name_connections, web_connections  # noqa: E402

# The sessions of every request (runserver's threads, gunicorn's workers) in pg_stat_activity;
# the pool (DATABASE_POOL_MAX_SIZE) and WEB_STATEMENT_TIMEOUT.
name_connections("web")
web_connections()

from onboarding.eventbus.runtime.warmup import web_warm_up  # noqa: E402 - needs Django set up

# Before the first request rather than during it (what and why: eventbus/runtime/warmup.py).
web_warm_up()

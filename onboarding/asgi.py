"""ASGI entry point."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")

application = get_asgi_application()

from onboarding.databases import name_connections  # noqa: E402 - needs the settings

# The sessions of every request (runserver's threads, gunicorn's workers) in pg_stat_activity.
name_connections("web")

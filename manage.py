#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "onboarding.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        # Load the settings first: a configuration error (a variable missing or malformed) is
        # the user's to fix, and says so in one line, not in a traceback that starts with
        # Django failing to find the command.
        settings.INSTALLED_APPS  # noqa: B018
    except ImproperlyConfigured as exc:
        sys.exit(f"manage.py: {exc}")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()

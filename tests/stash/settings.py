"""The test settings with a fifth bounded context installed: the one line a new service adds."""

from onboarding import databases as db_layout
from onboarding.settings_test import *  # noqa: F403
from onboarding.settings_test import INSTALLED_APPS, SQLITE_DIR, SQLITE_TEST_DIR, env

INSTALLED_APPS = [*INSTALLED_APPS, "tests.stash"]
# What onboarding/settings.py derives, derived again from the longer list.
BOUNDED_CONTEXTS, DATABASES, CONTEXT_DATABASES = db_layout.configure(
    env, installed_apps=INSTALLED_APPS, sqlite_dir=SQLITE_DIR, test_dir=SQLITE_TEST_DIR
)

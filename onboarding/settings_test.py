"""Settings for the test suite: the real settings, with speed-ups that change no behaviour."""

import atexit
import os
import shutil
import tempfile

# Each test run gets a folder of its own for its SQLite files (unless TEST_SQLITE_DIR says
# where): two runs on one checkout at once — a second terminal, a parallel worker — would
# otherwise share one file per database and corrupt each other's tests ("disk I/O error").
# The processes a test starts inherit the variable, so they find the same files.
if not os.environ.get("TEST_SQLITE_DIR"):
    os.environ["TEST_SQLITE_DIR"] = tempfile.mkdtemp(prefix="onboarding-test-db-")
    atexit.register(shutil.rmtree, os.environ["TEST_SQLITE_DIR"], ignore_errors=True)

# The real settings refuse DEBUG off without DJANGO_SECRET_KEY, and the suite runs with DEBUG
# off: it brings a key of its own, for the import only. Nothing is left in the environment, so
# a process a test starts with onboarding.settings brings its own key, as a deployment must.
TEST_SECRET_KEY = "test-only-secret-key-never-used-outside-the-test-suite-3f9c1a7e"
_key_unset = "DJANGO_SECRET_KEY" not in os.environ
if _key_unset:
    os.environ["DJANGO_SECRET_KEY"] = TEST_SECRET_KEY
try:
    from onboarding.settings import *  # noqa: E402, F403
    from onboarding.settings import REST_FRAMEWORK, env  # noqa: E402
finally:
    if _key_unset:
        del os.environ["DJANGO_SECRET_KEY"]
SECRET_KEY = TEST_SECRET_KEY

# The suite talks plain HTTP to its servers (the test client, live_server, runserver and
# gunicorn on 127.0.0.1): no redirect to HTTPS. The other HTTPS settings keep their defaults.
SECURE_SSL_REDIRECT = False

# Hashing is not what the suite tests; Django's default costs ~0.9 s per password here.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {"register": None, "token": None, "token_username": None},
}
# Retries in tests wait fractions of a second, not minutes.
CONSUMER_RETRY_BASE_DELAY = env.float("CONSUMER_RETRY_BASE_DELAY", default=0.2)
CONSUMER_RETRY_MAX_DELAY = env.float("CONSUMER_RETRY_MAX_DELAY", default=1.0)
CONSUMER_MAX_DELIVER = 4
# No background reconcile unless a test asks for it (tests/test_healing.py): its repairs would
# be events the other tests do not expect.
RECONCILE_INTERVAL = env.float("RECONCILE_INTERVAL", default=0.0)
CONSUMER_ACK_WAIT = env.float("CONSUMER_ACK_WAIT", default=10.0)
OUTBOX_RELAY_POLL_INTERVAL = 0.2
# NATS_URL is set by the suite to the nats-server it starts (see conftest.py).

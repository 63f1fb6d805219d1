"""Settings for the test suite: the real settings, with speed-ups that change no behaviour."""

from onboarding.settings import *  # noqa: F403
from onboarding.settings import REST_FRAMEWORK, env

# Hashing is not what the suite tests; Django's default costs ~0.9 s per password here.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
REST_FRAMEWORK = {
    **REST_FRAMEWORK,
    "DEFAULT_THROTTLE_RATES": {"register": None, "token": None},
}
# Retries in tests wait fractions of a second, not minutes.
CONSUMER_RETRY_BASE_DELAY = env.float("CONSUMER_RETRY_BASE_DELAY", default=0.2)
CONSUMER_RETRY_MAX_DELAY = env.float("CONSUMER_RETRY_MAX_DELAY", default=1.0)
CONSUMER_MAX_DELIVER = 4
CONSUMER_ACK_WAIT = env.float("CONSUMER_ACK_WAIT", default=10.0)
OUTBOX_RELAY_POLL_INTERVAL = 0.2
# NATS_URL is set by the suite to the nats-server it starts (see conftest.py).

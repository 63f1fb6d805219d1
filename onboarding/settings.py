"""Settings for the onboarding project.

Everything that differs between machines comes from the environment (or a ``.env`` file next to
``manage.py``) through one ``environ.Env``; see ``.env.example`` for every variable. With nothing
set, the project runs on embedded defaults: one SQLite file per bounded context under ``var/db``
and this checkout's own embedded NATS server (``make run`` starts it; see NATS_DEV_URL).
"""

import datetime as dt
import zlib
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured
from pythonjsonlogger.core import RESERVED_ATTRS as JSON_RESERVED_ATTRS

from onboarding import databases as db_layout

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; real environment variables win

# --- Core ----------------------------------------------------------------------------------

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# A development key only with DEBUG on (make run): with DEBUG off, a key everyone can read in
# this file would let anyone forge sessions, password reset links and signed values.
DEVELOPMENT_SECRET_KEY = "django-insecure-development-only-key-set-DJANGO_SECRET_KEY-in-production"
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or (DEVELOPMENT_SECRET_KEY if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is not set, and with DJANGO_DEBUG off (production) it is required. "
        "In a checkout, use the development settings as make run does: export DJANGO_DEBUG=true. "
        "In production, set DJANGO_SECRET_KEY (generate one: "
        "python -c 'import secrets; print(secrets.token_urlsafe(50))')."
    )
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

# --- HTTPS ---------------------------------------------------------------------------------
# With DEBUG off every default is the secure one (`manage.py check --deploy --fail-level
# WARNING` passes); with DEBUG on (make run) all are off. Each can be set apart.
# Behind a proxy that terminates TLS and talks plain HTTP to gunicorn, keep the redirect and set
# DJANGO_SECURE_PROXY_SSL_HEADER=HTTP_X_FORWARDED_PROTO,https so that Django knows which
# requests came in over HTTPS (only if the proxy sets that header itself on every request, or
# a client could claim HTTPS). DJANGO_SECURE_SSL_REDIRECT=false is for processes nothing
# reaches but plain HTTP on a private address: the test and rehearsal harnesses.
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG)
# The orchestrator's probes come over plain HTTP, straight to the container: no redirect.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
_proxy_ssl_header = env.list("DJANGO_SECURE_PROXY_SSL_HEADER", default=[])
if _proxy_ssl_header and len(_proxy_ssl_header) != 2:
    raise ImproperlyConfigured(
        "DJANGO_SECURE_PROXY_SSL_HEADER must be <header>,<value>, e.g. HTTP_X_FORWARDED_PROTO,https"
    )
SECURE_PROXY_SSL_HEADER = tuple(_proxy_ssl_header) or None
SESSION_COOKIE_SECURE = env.bool("DJANGO_SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_CSRF_COOKIE_SECURE", default=not DEBUG)
# HSTS: browsers that saw the header use HTTPS only, for this long (one year), on this host and
# its subdomains. Start lower (e.g. 3600) on a host that has never served HTTPS only.
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG
)
# Preloading is the domain owner's decision (browsers then ship the domain as HTTPS-only, hard
# to undo; only registrable domains qualify): off unless asked for, and its deploy warning
# (security.W021) is silenced only while it is off by this choice.
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",  # the OpenAPI schema (/api/schema/)
    "drf_spectacular_sidecar",  # Swagger UI's files, served from here: no CDN (/api/docs/)
    "axes",  # the admin login's lockout (accounts/admin_lockout.py)
    "onboarding.eventbus",
    "onboarding.dev",  # development tools: dev_nats, procfile (make run); production imports none
    # Bounded contexts. They share nothing but the event contract (onboarding.contracts).
    "accounts",
    "players",
    "characters",
    "progression",
    "buildings",
]

MIDDLEWARE = [
    # First, so that it sees every other's answer: errors under /api/ are JSON in the API's
    # shape with DEBUG on too (Django's technical 404/500 pages otherwise).
    "onboarding.exceptions.ApiErrorMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as axes requires: turns a refused admin login into the lockout page (429).
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "onboarding.urls"
WSGI_APPLICATION = "onboarding.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Databases -----------------------------------------------------------------------------
# accounts (and Django's own apps, and the outbox) live in DATABASE_URL. The bounded contexts
# are the installed apps with a consumers.py (adding a service is adding its app above); each
# has its own <LABEL>_DATABASE_URL; unset, it follows DATABASE_URL when that is set, else gets
# its own SQLite file. `manage.py check` fails on a context this cannot derive (eventbus.E010).

SQLITE_DIR = VAR_DIR / "db"
# SQLite test databases are files (consumer processes must see them); a second test run on the
# same checkout at the same time needs its own folder.
SQLITE_TEST_DIR = Path(env.str("TEST_SQLITE_DIR", default=str(VAR_DIR / "test-db")))
BOUNDED_CONTEXTS, DATABASES, CONTEXT_DATABASES = db_layout.configure(
    env, installed_apps=INSTALLED_APPS, sqlite_dir=SQLITE_DIR, test_dir=SQLITE_TEST_DIR
)
DATABASE_ROUTERS = ["onboarding.routers.BoundedContextRouter"]
# The web process's PostgreSQL connections (onboarding.databases.web_connections, from
# onboarding/wsgi.py). A pool per worker process and database (psycopg_pool, Django's own
# support): with gunicorn's gthread workers, threads share at most DATABASE_POOL_MAX_SIZE
# connections instead of one each; a request waits up to DATABASE_POOL_TIMEOUT seconds for
# one. 0: no pool (sync workers hold one connection each anyway). The relay and the consumers
# run one database thread each, so they keep plain persistent connections.
DATABASE_POOL_MAX_SIZE = env.int("DATABASE_POOL_MAX_SIZE", default=0)
DATABASE_POOL_MIN_SIZE = env.int("DATABASE_POOL_MIN_SIZE", default=1)
DATABASE_POOL_TIMEOUT = env.float("DATABASE_POOL_TIMEOUT", default=10.0)  # seconds
# Any statement of a web request that runs longer is cancelled (a 500, never a worker hung
# until gunicorn's timeout); 0: the server's default. PostgreSQL only.
WEB_STATEMENT_TIMEOUT = env.float("WEB_STATEMENT_TIMEOUT", default=10.0)  # seconds
# The relay's LISTEN and its advisory lock need a session of their own on the server: behind
# PgBouncer in transaction mode, give them a direct URL to the outbox database (default: the
# outbox database's own settings).
RELAY_DIRECT_DATABASE_URL = env.str("RELAY_DIRECT_DATABASE_URL", default="")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth ----------------------------------------------------------------------------------

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Argon2 first (Django's recommendation: memory-hard); the PBKDF2 hashers stay to verify the
# hashes stored before it (Django rehashes each with Argon2 at its next login). Tests and
# benchmarks swap in a fast hasher; `manage.py check --deploy` refuses one with DEBUG off
# (accounts.E001).
PASSWORD_HASHERS = env.list(
    "DJANGO_PASSWORD_HASHERS",
    default=[
        "django.contrib.auth.hashers.Argon2PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
        "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
        "django.contrib.auth.hashers.ScryptPasswordHasher",
    ],
)

# The admin login's lockout (django-axes) checks first; ModelBackend then checks the password.
AUTHENTICATION_BACKENDS = [
    "accounts.admin_lockout.AdminLoginLockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# API tokens (Authorization: Token <key>) stop working this many seconds after they were issued
# (the next login issues a new one); 0: they never expire. POST /api/auth/logout revokes one.
AUTH_TOKEN_TTL = env.int("AUTH_TOKEN_TTL", default=30 * 24 * 3600)

# --- Admin login lockout (django-axes) ------------------------------------------------------
# After AXES_FAILURE_LIMIT failed admin logins from one address, or at one username from any
# address, every admin login for them is refused (429, the right password too) for
# AXES_COOLOFF_SECONDS; each attempt meanwhile starts the wait again, a successful login resets
# the count. Attempts live in the default database (`manage.py axes_reset` unlocks everyone).
# Only the admin: the API's login has its own throttles (TOKEN_*_THROTTLE_RATE).
AXES_ENABLED = env.bool("AXES_ENABLED", default=True)
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = dt.timedelta(seconds=env.int("AXES_COOLOFF_SECONDS", default=15 * 60))
# "ip_address,username": either one locks (an address guessing at many accounts, many
# addresses guessing at one); "ip_address+username" locks only that pair.
AXES_LOCKOUT_PARAMETERS = [
    item.split("+") if "+" in item else item
    for item in env.list("AXES_LOCKOUT_PARAMETERS", default=["ip_address", "username"])
]
AXES_RESET_ON_SUCCESS = True
AXES_HANDLER = "accounts.admin_lockout.AdminOnlyAxesHandler"
AXES_CLIENT_IP_CALLABLE = "accounts.admin_lockout.client_ip"
AXES_USERNAME_CALLABLE = "accounts.admin_lockout.lockout_username"
AXES_LOCKOUT_CALLABLE = "accounts.admin_lockout.lockout_response"
AXES_ONLY_ADMIN_SITE = True
AXES_VERBOSE = False  # its own startup banner; lockouts are logged either way
# Admin logins' records (axes' access logs, failure logs and attempts: a username, an address,
# a browser) are kept this long, then pruned with the event bus's rows (EVENTBUS_PRUNE_INTERVAL,
# `manage.py eventbus_prune`). Never shorter than the cool-off: a lockout must outlive it.
ADMIN_ACCESS_LOG_KEEP = max(
    env.int("ADMIN_ACCESS_LOG_KEEP", default=30 * 24 * 3600), int(AXES_COOLOFF_TIME.total_seconds())
)  # seconds

# --- Admin ---------------------------------------------------------------------------------
# The contexts' rows (players, characters, progression, buildings) come from events: the admin
# shows them read-only. True lets superusers edit them by hand (repairs; the events don't know).
ADMIN_CONTEXTS_EDITABLE = env.bool("ADMIN_CONTEXTS_EDITABLE", default=False)

# --- Cache ---------------------------------------------------------------------------------
# The API's throttle counters live here. The default (locmem) is private to each process: right
# for runserver, wrong under gunicorn's several workers, where each would enforce its own limit.
# Deployments share one: CACHE_URL=dbcache://onboarding_cache (a table in the default database,
# created by `manage.py migrate_all`) or redis://... (needs the redis package). `manage.py check
# --deploy` warns about a per-process cache (accounts.W001).
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}

# --- API -----------------------------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_PARSER_CLASSES": ["onboarding.parsers.SafeJSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ExpiringTokenAuthentication",  # AUTH_TOKEN_TTL
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Every error is {"<field>": ["<problem>", ...]}; problems that are not about one field
    # (404, 401, 429, a body that is not a JSON object, ...) go under "detail", as a list too.
    "EXCEPTION_HANDLER": "onboarding.exceptions.api_exception_handler",
    "NON_FIELD_ERRORS_KEY": "detail",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Throttles key on the client address. 0: REMOTE_ADDR, never a client-supplied
    # X-Forwarded-For; behind N trusted proxies set it to N.
    "NUM_PROXIES": env.int("DJANGO_NUM_PROXIES", default=0),
    "DEFAULT_THROTTLE_RATES": {
        # Per client IP. Deployments and load tests change them here, not in code.
        "register": env.str("REGISTER_THROTTLE_RATE", default="60/minute") or None,
        "token": env.str("TOKEN_THROTTLE_RATE", default="60/minute") or None,
        # POST /api/auth/token per username (case-insensitive), from all addresses together:
        # a distributed guess at one account gets this rate in all.
        "token_username": env.str("TOKEN_USERNAME_THROTTLE_RATE", default="20/hour") or None,
    },
}

# --- API schema (drf-spectacular) -----------------------------------------------------------
# /api/schema/ (OpenAPI 3) and /api/docs/ (Swagger UI from drf-spectacular-sidecar's files, so
# the docs work on machines without internet access).

SPECTACULAR_SETTINGS = {
    "TITLE": "Onboarding API",
    "DESCRIPTION": (
        "Registration, login and onboarding readiness for the game client, and the health "
        "probes. Every error response has one shape: "
        '`{"<field>": ["<problem>", ...]}`; problems that are not about one input field are '
        'listed under `"detail"`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Request and response components apart: a write-only password never shows in a response.
    "COMPONENT_SPLIT_REQUEST": True,
    # Operations in the order a client uses them (register, token, me, ...), not alphabetically.
    "SORT_OPERATIONS": "onboarding.openapi.operation_order",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- NATS JetStream --------------------------------------------------------------------------

# One server or several (comma-separated, a cluster). Credentials may be in the URL
# (nats://user:password@host:4222, or a token: nats://token@host:4222); each process reads its
# own environment, so each role of a deployment can be its own NATS user (docs/deploy.md).
# Unset (development): this checkout's own embedded server, which `make run` starts (data in
# var/nats), on a port derived from the checkout's path — never the machine's shared 4222, and
# never another checkout's server (two checkouts would otherwise share durables and split events).
NATS_DEV_URL = f"nats://127.0.0.1:{20000 + zlib.crc32(str(BASE_DIR).encode()) % 10000}"
NATS_URL = env.str("NATS_URL", default="") or NATS_DEV_URL
NATS_CREDS = env.str("NATS_CREDS", default="")  # a credentials file (JWT + nkey seed)
NATS_NKEY_SEED = env.str("NATS_NKEY_SEED", default="")  # an nkey seed, or a file holding one
# TLS: the CA of the servers' certificates; this client's certificate and key where the servers
# verify clients. TLS is on when any is set, a URL is tls://, or the server requires it.
NATS_TLS_CA = env.str("NATS_TLS_CA", default="")
NATS_TLS_CERT = env.str("NATS_TLS_CERT", default="")
NATS_TLS_KEY = env.str("NATS_TLS_KEY", default="")
# Replies (PubAcks, pulled messages) come back under this prefix; on a secured server each role
# gets its own, which only that role may subscribe to (deploy/nats/auth.conf).
NATS_INBOX_PREFIX = env.str("NATS_INBOX_PREFIX", default="_INBOX")
# Error reports (DEBUG pages, mails) hide NATS_URL too: it may carry a password.
DEFAULT_EXCEPTION_REPORTER_FILTER = "onboarding.reporting.ReporterFilter"
# The stream that carries user.* events. Limits retention keeps history for max_age, so a
# consumer that was down catches up and a new consumer can replay from the start.
NATS_STREAM = env.str("NATS_STREAM", default="USERS")
# user.* events, and replay.<consumer>.* for dead letters sent back to one consumer.
NATS_STREAM_SUBJECTS = ["user.>", "replay.>"]
NATS_STREAM_MAX_AGE = env.int("NATS_STREAM_MAX_AGE", default=7 * 24 * 3600)  # seconds
NATS_STREAM_REPLICAS = env.int("NATS_STREAM_REPLICAS", default=1)  # 3 on a NATS cluster
# JetStream drops a publish whose Nats-Msg-Id it saw within this window. It must outlast the
# time in which the relay may republish an event (see OUTBOX_* below); checked at startup.
NATS_DUPLICATE_WINDOW = env.int("NATS_DUPLICATE_WINDOW", default=2 * 3600)  # seconds
# Timeout of one JetStream API request or publish acknowledgement. Small, because a request in
# flight when the connection drops waits this long.
NATS_REQUEST_TIMEOUT = env.float("NATS_REQUEST_TIMEOUT", default=2.0)
# How a connection that died silently (no FIN, no RST: a NAT or firewall that forgot it) is
# noticed: a PING every NATS_PING_INTERVAL seconds, and the connection declared stale (then
# re-made) when more than NATS_MAX_OUTSTANDING_PINGS go unanswered: within
# (NATS_MAX_OUTSTANDING_PINGS + 1) * NATS_PING_INTERVAL, 24 s by default. nats-py's own
# defaults (120 s, 2) took 4-6 minutes, while consumers' fetches timed out quietly.
NATS_PING_INTERVAL = env.float("NATS_PING_INTERVAL", default=8.0)
NATS_MAX_OUTSTANDING_PINGS = env.int("NATS_MAX_OUTSTANDING_PINGS", default=2)

# Durable pull consumers (one per context app, named after it).
CONSUMER_ACK_WAIT = env.float("CONSUMER_ACK_WAIT", default=30.0)  # seconds
CONSUMER_MAX_DELIVER = env.int("CONSUMER_MAX_DELIVER", default=10)
CONSUMER_MAX_ACK_PENDING = env.int("CONSUMER_MAX_ACK_PENDING", default=1000)
CONSUMER_FETCH_BATCH = env.int("CONSUMER_FETCH_BATCH", default=100)
# A fetched batch commits in one transaction with bulk writes (10-40x one transaction per
# message); false: one transaction per message.
CONSUMER_BATCH_TRANSACTIONS = env.bool("CONSUMER_BATCH_TRANSACTIONS", default=True)
# nak(delay) for a failed delivery n is min(base * 2**(n-1), max): never a hot loop.
CONSUMER_RETRY_BASE_DELAY = env.float("CONSUMER_RETRY_BASE_DELAY", default=1.0)
CONSUMER_RETRY_MAX_DELAY = env.float("CONSUMER_RETRY_MAX_DELAY", default=60.0)
# A hung handler must be noticed. A batch's transaction (inbox, handlers, commit) that takes
# longer than CONSUMER_BATCH_TIMEOUT seconds is abandoned: it rolls back instead of committing,
# and its messages are handed back (nak with the retry delay), unless a probe finds the
# database down (an outage: they stay in hand). 0: no cap. On PostgreSQL the consumers'
# connections (only theirs) also get these session timeouts, which make a blocked call return;
# 0 turns one off. See docs/architecture.md, "Consumers".
CONSUMER_BATCH_TIMEOUT = env.float("CONSUMER_BATCH_TIMEOUT", default=30.0)
CONSUMER_STATEMENT_TIMEOUT = env.float("CONSUMER_STATEMENT_TIMEOUT", default=20.0)
CONSUMER_LOCK_TIMEOUT = env.float("CONSUMER_LOCK_TIMEOUT", default=10.0)

# Benchmarks only: false registers users without announcing them, so no other service ever
# creates their defaults (a system check warns). Measures what the event costs the endpoint.
ACCOUNTS_PUBLISH_EVENTS = env.bool("ACCOUNTS_PUBLISH_EVENTS", default=True)

# --- Outbox --------------------------------------------------------------------------------

# Publish right after commit from a background thread (the fast path). The relay publishes
# whatever that path did not get out; with this off, the relay alone publishes.
OUTBOX_PUBLISH_ON_COMMIT = env.bool("OUTBOX_PUBLISH_ON_COMMIT", default=True)
# How the on-commit hook gets the event out at once:
#   notify  — PostgreSQL: NOTIFY the relay, which LISTENs and publishes at once. The web
#             process does no NATS work at all (the cheapest for the request).
#   wake    — SQLite: a datagram on a local socket wakes the relay, which publishes at once.
#             The web process does no NATS work either.
#   publish — a publisher thread in the web process publishes it (any database; no relay
#             needed for speed).
#   auto    — notify on PostgreSQL, wake on SQLite, else publish.
OUTBOX_FAST_PATH = env.str("OUTBOX_FAST_PATH", default="auto")
# wake: the relay's Unix datagram socket. Empty: <outbox database file>.relay.sock (a path too
# long for a socket: one in the temporary folder, named after the database's path).
OUTBOX_WAKE_SOCKET = env.str("OUTBOX_WAKE_SOCKET", default="")
# The relay leaves rows younger than this to the on-commit path, or every event would go out
# twice (JetStream would drop the copy, but the work doubles).
OUTBOX_RELAY_GRACE = env.float("OUTBOX_RELAY_GRACE", default=5.0)  # seconds
OUTBOX_RELAY_BATCH = env.int("OUTBOX_RELAY_BATCH", default=500)
OUTBOX_RELAY_POLL_INTERVAL = env.float("OUTBOX_RELAY_POLL_INTERVAL", default=1.0)  # seconds
# One relay per outbox database is active (it holds the database's relay lock); any other waits
# as a standby and retries the lock this often, so it takes over this soon after the active
# relay dies.
OUTBOX_RELAY_STANDBY_POLL = env.float("OUTBOX_RELAY_STANDBY_POLL", default=1.0)  # seconds
# An active relay that has published nothing for this long while rows wait (every batch failed:
# its NATS connection dead or refused, PubAcks lost) gives up the lock for a moment, so that a
# standby whose connection works takes over; with no standby it takes the lock back and tries
# again. 0 = never.
RELAY_STALL_SECONDS = env.float("RELAY_STALL_SECONDS", default=30.0)
# A row JetStream refuses this many times (a subject the stream does not take, a message over
# the server's max payload) is set aside, so that it cannot hold back the rows behind it, until
# an operator requeues it (admin). An outage counts no attempt.
OUTBOX_MAX_ATTEMPTS = env.int("OUTBOX_MAX_ATTEMPTS", default=5)

# --- Self-healing: the background reconcile (accounts/healing.py) ---------------------------

# Every RECONCILE_INTERVAL seconds the active relay looks for users registered since its last
# pass (a watermark) who are older than RECONCILE_MIN_AGE and whom a service never set up, in
# accounts' readiness projection, and re-delivers their user.registered to that service alone,
# as `reconcile --repair` does: events a broker forgot (a wiped store, an fsync window lost)
# heal without a person. 0 = off. Defaults lost after they were applied (a restored database)
# still need the full `manage.py reconcile`.
RECONCILE_INTERVAL = env.float("RECONCILE_INTERVAL", default=60.0)  # seconds
RECONCILE_MIN_AGE = env.float("RECONCILE_MIN_AGE", default=60.0)  # seconds
# What a pass runs: accounts owns the users and the projection; the relay only schedules it.
RECONCILE_PASS = "accounts.healing.healing_pass"

# --- Pruning (onboarding/eventbus/runtime/pruning.py) --------------------------------------

# Published outbox rows go after NATS_DUPLICATE_WINDOW, inbox rows after NATS_STREAM_MAX_AGE;
# resolved and discarded dead letters are kept this long after they were closed (open ones
# for ever).
EVENTBUS_DEAD_LETTER_KEEP = env.int("EVENTBUS_DEAD_LETTER_KEEP", default=30 * 24 * 3600)  # s
# The active relay prunes the outbox (and the admin's access logs, ADMIN_ACCESS_LOG_KEEP), each
# consumer its own inbox rows and dead letters, at start and this often; 0: never (then run
# `manage.py eventbus_prune` from cron).
EVENTBUS_PRUNE_INTERVAL = env.float("EVENTBUS_PRUNE_INTERVAL", default=3600.0)  # seconds

# --- I18N, static --------------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# --- Monitoring ----------------------------------------------------------------------------
# The relay and the consumers serve Prometheus metrics on http://METRICS_ADDR:METRICS_PORT/metrics
# when METRICS_PORT is set (unset: no metrics server). Processes on one host need a port each:
# two replicas of a consumer, or the relay and a consumer, cannot share one.
_metrics_port = env.str("METRICS_PORT", default="").strip()
METRICS_PORT = int(_metrics_port) if _metrics_port else None
METRICS_ADDR = env.str("METRICS_ADDR", default="0.0.0.0")  # 127.0.0.1: this host only
# How often the figures that cost a request are read: each durable's pending count
# (consumer_info) and the outbox backlog (on the relay's scans).
METRICS_REFRESH_INTERVAL = env.float("METRICS_REFRESH_INTERVAL", default=5.0)  # seconds
# Liveness for an orchestrator: the relay and the consumers keep this file's mtime at the last
# moment each of their loops made progress (or was waiting on purpose, e.g. on a database or
# NATS outage). Older than 60 s: stuck (onboarding/eventbus/runtime/liveness.py). Unset: no file.
HEARTBEAT_FILE = env.str("HEARTBEAT_FILE", default="")

# --- Logging -------------------------------------------------------------------------------

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
# Consumers log one line per handled event (onboarding.eventbus.events): consumer, user_id,
# event_id, stream_seq, outcome, duration_ms. At thousands of events per second, WARNING here
# keeps the other lines and drops those (the metrics count the events either way).
EVENT_LOG_LEVEL = env.str("EVENT_LOG_LEVEL", default=LOG_LEVEL)
# plain: one human-readable line per record; json: one JSON object per line (log shippers), with
# the records' structured fields (the per-event lines' consumer, user_id, ...) as keys.
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}")
# Every record goes through the root's one handler, once. Django's default configuration gives
# the "django" logger a console handler of its own (under DEBUG) and "django.server" another
# one; records then printed twice (django.request's "Bad Request: ..." under `make run`: once
# by Django's handler, once propagated to ours) or in another format. Configuring "django" here
# drops those handlers (and resets its children, django.server included, to propagate).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",
            # runserver's records carry the request's socket: not a log field.
            "reserved_attrs": [*JSON_RESERVED_ATTRS, "request", "server_time"],
        },
    },
    "filters": {
        # asyncio warns on every close of a TLS connection to NATS (a nats-py quirk); noise.
        "tls_eof_noise": {
            "()": "django.utils.log.CallbackFilter",
            "callback": lambda record: "eof_received()" not in record.getMessage(),
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler", "formatter": LOG_FORMAT,
            "filters": ["tls_eof_noise"],
        },
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        **{name: {"level": LOG_LEVEL} for name in ("onboarding", "accounts", *BOUNDED_CONTEXTS)},
        "onboarding.eventbus.events": {"level": EVENT_LOG_LEVEL},
        "django": {"handlers": [], "level": "INFO", "propagate": True},
    },
}

"""Production gunicorn settings for the web app (the register/token API and the admin).

    gunicorn -c deploy/gunicorn.conf.py onboarding.wsgi

This is gunicorn's configuration, read by the master before Django exists, so it reads its few
variables (GUNICORN_BIND, WEB_CONCURRENCY, GUNICORN_LOG_LEVEL) itself, from the environment or
the same optional ``.env`` as Django's settings; onboarding/settings.py stays the one place the
application reads its own. Any setting can still be overridden for one run on the command line
or in GUNICORN_CMD_ARGS.

Several workers need a cache they share for the API's throttles: set
``CACHE_URL=dbcache://onboarding_cache`` (``manage.py migrate_all`` creates the table) or a
redis:// URL; ``manage.py check --deploy`` warns about a per-process cache.
"""

import os
from pathlib import Path

import environ

# Importable from any working directory: gunicorn changes to this folder and puts it on sys.path.
chdir = str(Path(__file__).resolve().parent.parent)

env = environ.Env()
environ.Env.read_env(Path(chdir) / ".env")  # optional; real environment variables win
wsgi_app = "onboarding.wsgi:application"
proc_name = "onboarding-web"

# Behind a reverse proxy, bind to loopback or a private address; 0.0.0.0:8000 in a container.
bind = env.str("GUNICORN_BIND", default="127.0.0.1:8000")


def _cpus() -> int:
    # The CPUs this process may run on (a container's cpuset), not every core of the host.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Sync workers: one request at a time per process, which is what Django's sync ORM code and a
# CPU-bound password hash want; concurrency comes from the number of processes. A registration
# spends most of its time hashing (PBKDF2), so more than ~2 per core buys nothing but memory
# and database connections. They need a buffering reverse proxy in front (nginx), so that slow
# clients cannot tie up the few workers.
# GUNICORN_THREADS above 1 runs gthread workers instead: a thread per request, many requests
# per process (clients that wait on I/O, no buffering proxy). Each thread would hold a database
# connection of its own: set DATABASE_POOL_MAX_SIZE too, so a worker's threads share a few
# (docs/deploy.md, "Connections").
threads = env.int("GUNICORN_THREADS", default=1)
worker_class = "gthread" if threads > 1 else "sync"
workers = env.int("WEB_CONCURRENCY", default=2 * _cpus())

# Load the app once in the master, then fork: a broken import or setting stops the server at
# start instead of crash-looping every worker, workers (and their replacements after
# max_requests) boot in milliseconds, and they share the loaded code's memory. Safe here because
# loading the app opens nothing that a fork would share: Django connects to databases lazily,
# per process and thread, and the SQLite-mode on-commit publisher starts its thread and NATS
# connection on first use in each process (it restarts itself in a process whose pid is not
# the one it started in). tests/test_gunicorn.py proves both with real forked workers. The
# price: `kill -HUP` restarts workers from the code already loaded; deploy new code with a
# full restart (or USR2 to re-exec the master).
preload_app = True
# So no post_fork hook: there is nothing a worker must reset after the fork.

# A worker silent for this long (a request stuck on an unreachable database, say) is killed
# and replaced. Far above a registration's cost (~1 s of hashing at most), below a proxy's
# typical 60 s upstream timeout so the client gets gunicorn's answer, not the proxy's.
timeout = 30
# On SIGTERM (or a max_requests restart) a worker finishes its request, then its exit hook
# flushes the publisher: PubAcks in flight are awaited (up to NATS_REQUEST_TIMEOUT) and their
# rows marked, so the relay need not republish them. Anything still unpublished after this is
# the relay's (the outbox row is committed), never lost.
graceful_timeout = 30

# Restart each worker after about this many requests, so that a slow leak (in our code or a
# library's) cannot grow for ever; the jitter keeps the workers from restarting all at once.
max_requests = 1000
max_requests_jitter = 100

# Logs to stdout/stderr for the process manager (systemd, a container runtime) to collect.
# The access log adds the worker pid (<pid>) and the time taken in milliseconds.
accesslog = "-"
access_log_format = '%(h)s %(t)s "%(r)s" %(s)s %(b)s %(M)sms %(p)s "%(a)s"'
errorlog = "-"
loglevel = env.str("GUNICORN_LOG_LEVEL", default="info")

# gunicorn >= 25 opens a control socket at a per-user path ($XDG_RUNTIME_DIR or ~/.gunicorn),
# on which two instances on one host would collide; signals (HUP, TTIN/TTOU, TERM) do its job.
control_socket_disable = True

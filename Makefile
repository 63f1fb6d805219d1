# Two commands matter: `make run` (the whole stack, foreground) and `make test` (the suite).
# Both create the virtualenv in .venv and install the pinned requirements first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv migrate run test test-slow test-all test-postgres test-nats-newest bench rehearsal superuser lint clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

## Apply migrations to every database (accounts' and each context's).
# The development targets run with DEBUG on unless the environment says otherwise: with DEBUG
# off the settings refuse to start without DJANGO_SECRET_KEY (a production environment sets
# DJANGO_DEBUG=false and the key).
DEV := DJANGO_DEBUG=$${DJANGO_DEBUG:-true}

migrate: venv
	$(DEV) $(BIN)/python manage.py migrate_all

## Run everything: nats (this checkout's embedded nats-server unless NATS_URL is set), web on
## :$(WEB_PORT), relay, one consumer per context app. Ctrl-C stops it all (exit status 0). The
## process list comes from the registry (manage.py procfile > var/Procfile); leave some out with
## WITHOUT="a b".
# honcho runs as the terminal's foreground job (onboarding/dev/foreground.py): a Ctrl-C reaches
# it and not make, which would otherwise die of the signal and print "*** [run] Interrupt".
WEB_PORT ?= 8000
WITHOUT ?=
run: migrate
	@$(DEV) $(BIN)/python manage.py procfile --web-port $(WEB_PORT) --without $(WITHOUT) > var/Procfile
	$(DEV) $(BIN)/python -m onboarding.dev.foreground $(BIN)/honcho -f var/Procfile start

## The test suite without the slow fault-injection tests (SQLite by default; PostgreSQL when
## DATABASE_URL points at one). Under two minutes on 2 cores: TEST_WORKERS pytest-xdist
## workers, each with its own nats-server and test databases (most tests wait on processes and
## brokers, not on a CPU, so twice the cores pays). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 4
test: venv
	$(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal

## Only the slow fault-injection tests (kill -9, NATS restart, a minute-long database outage...).
test-slow: venv
	$(BIN)/pytest -m slow -rA

## Everything.
test-all: venv
	$(BIN)/pytest -rA

## The fetch and publisher tests on the newest nats-py release, not the pinned one, in a
## virtualenv of their own: the private internals nats/compat.py reads are nats-py's to rename,
## and an upgrade's breakage shows here (CI runs it) before anyone pins it. Prints the version.
NEWEST_VENV := .venv-nats-newest
NATS_NEWEST_TESTS := tests/test_fetching.py tests/test_relay_failures.py tests/test_end_to_end.py
test-nats-newest:
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(NEWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade nats-py
	@$(NEWEST_VENV)/bin/python -c 'import importlib.metadata as m; print("nats-py", m.version("nats-py"), "(pinned in requirements.txt:", [l for l in open("requirements.txt") if l.startswith("nats-py")][0].strip() + ")")'
	$(NEWEST_VENV)/bin/pytest -m "not slow" -n 2 -p no:cacheprovider $(NATS_NEWEST_TESTS)

## The suite on the local PostgreSQL server, all contexts in one database.
test-postgres: venv
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/onboarding} $(BIN)/pytest

## Benchmarks (docs/benchmarks.md): SQLite, then PostgreSQL too when DATABASE_URL is set (five
## databases: accounts + one per context; BENCH_ARGS=--shared-database for one). Starts its own
## nats-server and uses separate bench databases. Installs bench/requirements.txt (the
## FastStream peer) into .venv first. Extra flags: BENCH_ARGS=...
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --engine sqlite $(BENCH_ARGS)
	if [ -n "$$DATABASE_URL" ]; then $(BIN)/python bench/run.py --engine postgres $(BENCH_ARGS); fi

## Create an admin account for http://127.0.0.1:8000/admin/.
superuser: migrate
	$(DEV) $(BIN)/python manage.py createsuperuser

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf var/

## The production shape under fire (docs/deploy.md): a secured 3-node NATS cluster, gunicorn,
## a relay and its standby, two replicas of each consumer, five databases (PostgreSQL when
## DATABASE_URL is set); kills the stream leader, a replica of each consumer and the active
## relay mid-burst; exits 1 if anything is lost or duplicated. Flags: REHEARSAL_ARGS=...
rehearsal: venv
	$(BIN)/python deploy/rehearsal.py $(REHEARSAL_ARGS)

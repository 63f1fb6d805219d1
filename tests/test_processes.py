"""The management commands as real processes: what `make run` and a deployment start."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command

from accounts.services import user_register
from conftest import wait_until
from onboarding.eventbus.models import OutboxEvent
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def has_durable(url: str, name: str) -> bool:
    import asyncio

    import nats

    async def check():
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
        try:
            await nc.jetstream(timeout=1).consumer_info(settings.NATS_STREAM, name)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    return asyncio.run(check())


def test_relay_and_consumer_processes_deliver_and_stop_cleanly(manage, settings):
    settings.OUTBOX_PUBLISH_ON_COMMIT = False  # only the relay process publishes
    consumers = manage("consume", "--all")
    relay = manage("outbox_relay", OUTBOX_RELAY_GRACE="0")
    for i in range(10):
        user_register(username=f"proc{i}", email=f"proc{i}@example.com", password="x")

    wait_until(lambda: counts() == complete_count(10), timeout=30, message="defaults")
    wait_until(lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists())

    code, output = consumers.stop()
    assert code == 0, output
    assert "consumers stopped" in output
    code, output = relay.stop()
    assert code == 0, output
    assert "relay published" in output


@pytest.mark.parametrize("command", [("consume", "players"), ("outbox_relay",)])
def test_repeated_sigterms_do_not_cut_a_clean_exit_short(command, manage):
    """A supervisor may signal twice (honcho: the terminal's SIGINT, then SIGTERM)."""
    import signal
    import time

    process = manage(*command)
    started = "consumers started" if command[0] == "consume" else "relay: active"
    process.wait_for_output(started)
    deadline = time.monotonic() + 15
    while process.poll() is None and time.monotonic() < deadline:
        process.popen.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    assert process.wait(5) == 0, process.output()


def test_consume_one_app_only_processes_that_app(manage):
    players = manage("consume", "players")
    manage("outbox_relay")  # the publisher of the notify fast path (PostgreSQL)
    user_register(username="solo", email="solo@example.com", password="x")
    wait_until(lambda: counts()["players"] == 1, timeout=30)
    code, output = players.stop()
    assert code == 0, output
    assert counts() == {"players": 1, "characters": 0, "progression": 0, "buildings": 0}


def test_relay_once_flushes_the_backlog_and_exits(manage, settings):
    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    for i in range(3):
        user_register(username=f"once{i}", email=f"once{i}@example.com", password="x")
    relay = manage("outbox_relay", "--once", "--grace", "0")
    assert relay.wait(30) == 0, relay.output()
    output = relay.output()
    assert "published 3 event(s)" in output
    assert not OutboxEvent.objects.filter(published_at__isnull=True).exists()


def test_consume_exits_cleanly_on_sigterm_while_nats_is_unreachable(manage):
    from onboarding.dev.natsserver import free_port

    process = manage("consume", "--all", NATS_URL=f"nats://127.0.0.1:{free_port()}")
    # It is up, retrying the connection: said once at the first refusal (the refusals' own
    # warning waits for the server to be missing for 10 s, connection.py).
    process.wait_for_output("waiting for a server at")
    code, output = process.stop()
    assert code == 0, output


def test_dev_nats_starts_an_embedded_server_provisions_and_stops(manage, tmp_path):
    from onboarding.dev.natsserver import answers, free_port

    url = f"nats://127.0.0.1:{free_port()}"
    process = manage("dev_nats", "--store-dir", str(tmp_path / "nats"), NATS_URL=url)
    wait_until(lambda: answers(url), timeout=15, message="embedded nats-server")
    wait_until(lambda: has_durable(url, "buildings"), timeout=15, message="provisioned")
    code, output = process.stop()
    assert code == 0, output
    assert f"nats: started an embedded nats-server at {url}" in output
    assert "consumer buildings: created" in output
    assert not answers(url)


def test_dev_nats_uses_a_server_that_already_answers(manage):
    process = manage("dev_nats")  # NATS_URL is the suite's running server
    process.wait_for_output("consumer buildings: unchanged")
    code, output = process.stop()
    assert code == 0, output
    assert "nats: using NATS_URL's server, already running at" in output
    assert "consumer players: unchanged" in output


def test_a_consumer_started_before_provisioning_waits_quietly(manage):
    """First boot (make run starts everything at once): one INFO line while the durable does
    not exist yet, no warnings; it binds as soon as setup_jetstream has run."""
    import time

    from conftest import run_async

    run_async(lambda js: js.delete_stream(settings.NATS_STREAM))  # nothing provisioned yet
    consumer = manage("consume", "players")
    consumer.wait_for_output("waiting for its durable")
    time.sleep(1.5)  # several polls
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))

    async def waiting(js):
        return (await js.consumer_info(settings.NATS_STREAM, "players")).num_waiting

    wait_until(lambda: run_async(waiting) > 0, timeout=10, message="a pull request")
    code, output = consumer.stop()
    assert code == 0, output
    assert output.count("waiting for its durable") == 1, output
    assert "WARNING" not in output, output


def test_migrate_all_migrates_every_database():
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("migrate_all", stdout=out)
    for alias in settings.DATABASES:
        assert f"Database {alias!r}" in out.getvalue()


def test_migrate_all_creates_the_database_cache_table(settings):
    """With CACHE_URL=dbcache://..., a deployment's migrate_all is all the cache needs; again
    is harmless."""
    import io

    from django.core.management import call_command
    from django.db import connection

    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "test_migrate_all_cache",
        }
    }
    try:
        for _ in range(2):
            call_command("migrate_all", stdout=io.StringIO())
            assert "test_migrate_all_cache" in connection.introspection.table_names()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS test_migrate_all_cache")

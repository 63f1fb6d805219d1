"""A secured bus: every role on its own NATS user, least privilege enforced by the server, TLS.

Each test starts a nats-server from ``deploy/nats/single.conf`` as it is (the authorization of
``auth.conf`` and the TLS of ``tls.conf``), with passwords and a CA made for the test
(``SecuredNats``). Real processes run with one role's environment each, as a deployment runs
them; refusals must end a command at once with one line that names the server and what was
refused, never a hang, an endless retry or a traceback.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request

import pytest
from django.core.management import call_command
from django.test import override_settings

from accounts.services import user_register
from conftest import wait_until
from onboarding.dev.natsserver import NatsServer, SecuredNats, free_port, make_certificates
from onboarding.eventbus.models import DeadLetter, OutboxEvent
from onboarding.eventbus.nats.connection import connect, session
from onboarding.eventbus.nats.refusals import NatsAccessError
from onboarding.eventbus.registry import get_consumers, get_services
from tests.flow import complete_count, counts

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

STREAM = "USERS"


@pytest.fixture
def secured(tmp_path):
    nats = SecuredNats(tmp_path / "secured").start()
    yield nats
    nats.stop()


@pytest.fixture
def as_role(secured, settings):
    """Give this (test) process the NATS settings of ``role``."""

    def apply(role: str | None, **overrides):
        env = secured.env_for(role, **overrides) if role else {
            "NATS_URL": secured.url(), "NATS_TLS_CA": str(secured.certs["ca"]), **overrides
        }
        for name, value in env.items():
            setattr(settings, name, value)

    return apply


@pytest.fixture
def provisioned(secured, as_role):
    as_role("provision")
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))


def refusal(coro_fn) -> str:
    """Run ``coro_fn(js)`` on a short session; return the refusal it must end with."""

    async def main():
        async with session("test", timeout=5) as nc:
            await coro_fn(nc.jetstream(timeout=2))

    with pytest.raises(NatsAccessError) as refused:
        asyncio.run(main())
    return str(refused.value)


def allowed(coro_fn):
    async def main():
        async with session("test", timeout=5) as nc:
            return await coro_fn(nc.jetstream(timeout=2))

    return asyncio.run(main())


async def fetch_from(durable: str, js):
    psub = await js.pull_subscribe_bind(durable, stream=STREAM)
    try:
        await psub.fetch(1, timeout=1)
    except TimeoutError:
        pass


def assert_one_clear_line(output: str, secured: SecuredNats, role: str, what: str) -> None:
    """The command said what was refused, where (the URL without the password), in one line."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "refused" in line]
    assert len(lines) == 1, output
    assert what in lines[0], output
    assert f"nats://{role}@127.0.0.1:{secured.servers[0].port}" in lines[0], output
    assert secured.passwords[role] not in output


# -- the whole flow, each process its own role -----------------------------------------------


def test_full_flow_with_every_role_on_its_own_user(secured, manage):
    provision = manage("setup_jetstream", "--wait", "5", **secured.env_for("provision"))
    assert provision.wait(20) == 0, provision.output()
    manage("outbox_relay", **secured.env_for("relay"), OUTBOX_RELAY_GRACE="0.5")
    for name in get_consumers():
        manage("consume", name, **secured.env_for(name))
    port = free_port()
    web = manage("runserver", "--noreload", f"127.0.0.1:{port}", **secured.env_for("web"))

    def register(i: int):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/auth/register",
            data=json.dumps({"username": f"secure{i}", "email": f"secure{i}@example.com",
                             "password": "correct-horse-battery-staple"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def web_up():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=1):
                return True
        except OSError:
            return web.poll() is not None

    wait_until(web_up, timeout=20, message="the web process answers")
    assert [register(i) for i in range(3)] == [201] * 3
    wait_until(lambda: counts() == complete_count(3), timeout=20, message="all defaults")
    wait_until(lambda: not OutboxEvent.objects.filter(published_at__isnull=True).exists(),
               timeout=10, message="every outbox row published")
    # Each service announced it (its own user), and accounts' consumer (its own) kept it.
    from accounts.models import ServiceReadiness

    wait_until(lambda: ServiceReadiness.objects.filter(onboarded_at__isnull=False).count()
               == 3 * len(get_services()), timeout=20, message="the readiness projection")

    status = manage("onboarding_status", "--json", **secured.env_for("monitor"))
    assert status.wait(20) == 0, status.output()
    assert json.loads(status.output()[status.output().index("{"):])["healthy"] is True

    # The replay role sends a dead letter back to one consumer, which resolves it.
    row = OutboxEvent.objects.order_by("id").first()
    letter = DeadLetter.objects.create(
        consumer="players", subject=row.subject, stream=STREAM, stream_seq=1,
        event_id=str(row.event_id),
        payload=row.payload.encode(), headers=row.headers, deliveries=1,
        error_type="Test", error_message="set aside by the test",
    )
    replay = manage("deadletters", "replay", "--consumer", "players", "--all",
                    **secured.env_for("replay"))
    assert replay.wait(20) == 0, replay.output()
    wait_until(lambda: DeadLetter.objects.get(id=letter.id).resolved_at is not None,
               timeout=20, message="the replayed dead letter resolved")
    assert counts() == complete_count(3)

    # An erasure, each role doing its part: the relay (its own user) publishes user.deleted and
    # deletes the user's earlier messages from the stream; each consumer erases its rows.
    from accounts.models import User
    from accounts.services import user_delete
    from onboarding.eventbus.models import Erasure

    with override_settings(OUTBOX_PUBLISH_ON_COMMIT=False):  # the relay's work, not this one's
        user_delete(user=User.objects.get(username="secure0"))
    wait_until(lambda: counts() == complete_count(2), timeout=20, message="erased everywhere")
    wait_until(lambda: Erasure.objects.filter(stream_erased_at__isnull=False).exists(),
               timeout=20, message="the relay erased the user's messages from the stream")


# -- least privilege, enforced by the server -------------------------------------------------


@pytest.mark.parametrize("consumer", ["players", "buildings"])
def test_a_consumer_may_only_read_pull_and_settle_its_own_durable(consumer, provisioned, as_role):
    as_role(consumer)
    info = allowed(lambda js: js.consumer_info(STREAM, consumer))
    assert info.name == consumer
    allowed(lambda js: fetch_from(consumer, js))
    # It speaks for itself: its own announcements, never another service's.
    for verb in ("onboarded", "erased"):
        assert allowed(lambda js, v=verb: js.publish(f"user.{v}.{consumer}", b"{}")).stream \
            == STREAM
    other = "characters"
    for attempt, subject in [
        (lambda js: js.publish("user.registered", b"{}"), "user.registered"),
        (lambda js: js.publish(f"user.onboarded.{other}", b"{}"), f"user.onboarded.{other}"),
        (lambda js: js.publish(f"user.erased.{other}", b"{}"), f"user.erased.{other}"),
        (lambda js: js.publish(f"replay.{consumer}.user.registered", b"{}"), "replay."),
        (lambda js: fetch_from(other, js), f"msg.next.users.{other}"),
        (lambda js: js.consumer_info(STREAM, other), f"consumer.info.users.{other}"),
        (lambda js: js.delete_stream(STREAM), "stream.delete"),
    ]:
        message = refusal(attempt)
        assert "permissions violation" in message and subject in message.lower(), message


@pytest.mark.parametrize("role", ["web", "relay"])
def test_publishers_may_publish_user_events_and_nothing_else(role, provisioned, as_role):
    as_role(role)
    ack = allowed(lambda js: js.publish("user.registered", b"{}"))
    assert ack.stream == STREAM
    # The relay erases a deleted user's messages one by one; the web never deletes anything.
    def delete(js):
        return js.delete_msg(STREAM, ack.seq)

    if role == "relay":
        assert allowed(delete) is True
        # Its background reconcile: a durable's backlog, and a repair to one service.
        assert allowed(lambda js: js.consumer_info(STREAM, "players")).name == "players"
        replay = allowed(lambda js: js.publish("replay.players.user.registered", b"{}"))
        assert replay.stream == STREAM
    else:
        assert "stream.msg.delete" in refusal(delete).lower()
    refused = [
        (lambda js: fetch_from("players", js), "msg.next.users.players"),
        (lambda js: js.publish("replay.players.user.deleted", b"{}"), "replay.players"),
        # Accounts' processes never speak for a service (its readiness comes from these).
        (lambda js: js.publish("user.onboarded.players", b"{}"), "user.onboarded.players"),
        (lambda js: js.publish("user.erased.players", b"{}"), "user.erased.players"),
        (lambda js: js.delete_stream(STREAM), "stream.delete"),
    ]
    if role == "web":
        refused += [
            (lambda js: js.consumer_info(STREAM, "players"), "consumer.info"),
            (lambda js: js.publish("replay.players.user.registered", b"{}"), "replay.players"),
        ]
    for attempt, subject in refused:
        message = refusal(attempt)
        assert "permissions violation" in message and subject in message.lower(), message


def test_replay_and_monitor_roles(provisioned, as_role):
    as_role("replay")
    assert allowed(lambda js: js.publish("replay.players.user.registered", b"{}")).stream == STREAM
    assert "user.registered" in refusal(lambda js: js.publish("user.registered", b"{}"))
    assert "msg.next" in refusal(lambda js: fetch_from("players", js)).lower()

    as_role("monitor")
    assert allowed(lambda js: js.consumer_info(STREAM, "players")).name == "players"
    assert allowed(lambda js: js.stream_info(STREAM)).config.name == STREAM
    assert "user.registered" in refusal(lambda js: js.publish("user.registered", b"{}"))
    assert "consumer.delete" in refusal(lambda js: js.delete_consumer(STREAM, "players")).lower()
    assert "msg.next" in refusal(lambda js: fetch_from("players", js)).lower()


def test_provisioning_may_create_and_update_but_not_destroy_or_read(provisioned, as_role):
    as_role("provision")
    call_command("setup_jetstream", stdout=open("/dev/null", "w"))  # again: updates, idempotent
    assert allowed(lambda js: js.stream_info(STREAM)).config.name == STREAM
    for attempt, subject in [
        (lambda js: js.delete_stream(STREAM), "stream.delete"),
        (lambda js: js.purge_stream(STREAM), "stream.purge"),
        (lambda js: js.get_msg(STREAM, 1), "stream.msg.get"),
        (lambda js: js.delete_consumer(STREAM, "players"), "consumer.delete"),
        (lambda js: fetch_from("players", js), "msg.next"),
        (lambda js: js.publish("user.registered", b"{}"), "user.registered"),
    ]:
        message = refusal(attempt)
        assert "permissions violation" in message and subject in message.lower(), message


def test_replies_of_one_role_are_closed_to_another(provisioned, as_role):
    """With the shared _INBOX prefix, a user could read another's replies (pulled events)."""
    as_role("relay", NATS_INBOX_PREFIX="_INBOX_players")
    message = refusal(lambda js: js.publish("user.registered", b"{}"))
    assert "subscription" in message and "NATS_INBOX_PREFIX" in message


def test_an_anonymous_client_is_refused(secured, as_role):
    as_role(None)
    with pytest.raises(NatsAccessError, match="authorization violation"):
        # Refused, not retried: retrying would end in the bound's TimeoutError instead.
        asyncio.run(asyncio.wait_for(connect("anonymous"), 10))


@pytest.mark.parametrize(("error", "refused"), [
    (Exception("nats: 'Authorization Violation'"), True),
    (Exception("nats: permissions violation for publish to \"user.registered\""), True),
    (Exception("nats: 'User Authentication Expired'"), True),
    (Exception("nats: 'User Authentication Revoked'"), True),
    (Exception("nats: 'Account Authentication Expired'"), True),
    (Exception("nats: 'Authentication Timeout'"), False),  # a slow handshake on a busy host
    (Exception("nats: 'maximum account active connections exceeded'"), False),
    (ConnectionRefusedError(111, "Connect call failed"), False),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), False),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), True),
    (None, False),
])
def test_only_refusals_end_a_process_transient_errors_are_retried(error, refused):
    from onboarding.eventbus.nats.refusals import refusal_reason

    assert (refusal_reason(error) is not None) == refused


# -- failures a person understands, from real commands ---------------------------------------


@pytest.mark.parametrize("command", [
    ("consume", "players"), ("outbox_relay",), ("setup_jetstream",),
    ("deadletters", "replay", "--consumer", "players", "--all"),
])
def test_a_wrong_password_ends_the_command_at_once_with_one_clear_line(
    command, secured, manage
):
    role = {"consume": "players", "outbox_relay": "relay", "setup_jetstream": "provision",
            "deadletters": "replay"}[command[0]]
    if command[0] == "deadletters":
        DeadLetter.objects.create(consumer="players", subject="user.registered", stream=STREAM,
                                  stream_seq=1, event_id="e", payload=b"{}", headers={},
                                  deliveries=1, error_type="Test", error_message="x")
    env = secured.env_for(role, NATS_URL=secured.url(role, "not-the-password"))
    process = manage(*command, **env)
    assert process.wait(10) == 1, process.output()  # ended, not retrying
    assert_one_clear_line(process.output(), secured, role, "authorization violation")
    assert "not-the-password" not in process.output()


def test_onboarding_status_reports_the_refusal_as_unhealthy(secured, manage):
    env = secured.env_for("monitor", NATS_URL=secured.url("monitor", "wrong"))
    process = manage("onboarding_status", **env)
    assert process.wait(10) == 1, process.output()
    assert_one_clear_line(process.output(), secured, "monitor", "authorization violation")


def test_a_permission_refused_at_run_time_ends_a_long_running_command(
    manage, secured, provisioned, settings  # manage first: it resets the suite's own stream
):
    # A consumer started with another consumer's user: its own durable is refused to it.
    consumer = manage("consume", "players", **secured.env_for("characters"))
    assert consumer.wait(10) == 1, consumer.output()
    assert_one_clear_line(consumer.output(), secured, "characters", "permissions violation")

    # A relay started with a consumer's user: connecting works, publishing is refused.
    settings.OUTBOX_PUBLISH_ON_COMMIT = False  # the relay alone is to publish this row
    user_register(username="refused", email="refused@example.com", password="x")
    relay = manage("outbox_relay", **secured.env_for("players", OUTBOX_RELAY_GRACE="0"))
    assert relay.wait(15) == 1, relay.output()
    assert_one_clear_line(relay.output(), secured, "players", "user.registered")
    assert OutboxEvent.objects.filter(published_at__isnull=True).count() == 1


def test_tls_with_the_wrong_ca_fails_clearly(secured, manage, tmp_path):
    other_ca = make_certificates(tmp_path / "other")["ca"]
    process = manage("consume", "players", **secured.env_for("players", NATS_TLS_CA=str(other_ca)))
    # It ends rather than retrying for ever (no timing asserted: a loaded machine takes seconds
    # to start a Django process; CI failed on "< 5 s" once, at 5.9 s).
    assert process.wait(10) == 1, process.output()
    assert_one_clear_line(process.output(), secured, "players", "TLS failed")


def test_a_missing_credentials_file_fails_clearly(secured, manage, tmp_path):
    missing = tmp_path / "nowhere.creds"
    process = manage("consume", "players", **secured.env_for("players", NATS_CREDS=str(missing)))
    assert process.wait(10) == 1, process.output()
    assert "Traceback" not in process.output()
    assert f"NATS_CREDS: no such file: {missing}" in process.output()


# -- other ways to authenticate: nkeys, client certificates ----------------------------------


def custom_server(tmp_path, authorization: str, tls: str = "") -> NatsServer:
    """A server with a hand-written config, for the client options deploy/nats/ does not use."""
    port = free_port()
    config = tmp_path / "custom.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nserver_name: custom\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}", max_memory_store: 64MB, '
        f"max_file_store: 256MB }}\n{authorization}\n{tls}\n"
    )
    return NatsServer(tmp_path, port=port, config=config).start()


def test_an_nkey_seed_authenticates(tmp_path, settings):
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    server = custom_server(tmp_path, f'authorization {{ users: [{{ nkey: "{public}" }}] }}')
    try:
        settings.NATS_URL = server.url
        settings.NATS_NKEY_SEED = seed  # the seed itself ...
        assert allowed(lambda js: js.account_info()) is not None
        seed_file = tmp_path / "user.nk"
        seed_file.write_text(seed)
        settings.NATS_NKEY_SEED = str(seed_file)  # ... or a file holding it
        assert allowed(lambda js: js.account_info()) is not None
        other = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        settings.NATS_NKEY_SEED = other
        with pytest.raises(NatsAccessError, match="authorization violation"):
            asyncio.run(connect("stranger"))
    finally:
        server.stop()


def test_a_client_certificate_is_presented_where_the_server_verifies_clients(tmp_path, settings):
    certs = make_certificates(tmp_path / "certs")
    server = custom_server(tmp_path, "", (
        f'tls {{ cert_file: "{certs["server_cert"]}", key_file: "{certs["server_key"]}", '
        f'ca_file: "{certs["ca"]}", verify: true, timeout: 2 }}'
    ))
    try:
        settings.NATS_URL = server.url
        settings.NATS_TLS_CA = str(certs["ca"])
        settings.NATS_TLS_CERT = str(certs["client_cert"])
        settings.NATS_TLS_KEY = str(certs["client_key"])
        assert allowed(lambda js: js.account_info()) is not None
        settings.NATS_TLS_CERT = settings.NATS_TLS_KEY = ""
        with pytest.raises(NatsAccessError):
            asyncio.run(asyncio.wait_for(connect("no-certificate"), 10))
    finally:
        server.stop()


def test_a_relay_that_may_not_delete_messages_ends_and_the_erasure_waits_for_one_that_may(
    provisioned, as_role, settings
):
    """Erasure's unhealthy state: a relay whose NATS user lacks the stream's message delete (an
    auth.conf from before erasure) publishes the deletion, then is refused the delete. As every
    refusal does, it ends the relay with one line naming it (retrying cannot help; a relay that
    went on would look healthy while no user is ever erased from the stream). The erasure stays
    pending, and the next relay with the permission carries it out."""
    from accounts.models import User
    from accounts.services import user_delete
    from conftest import relay_flush
    from onboarding.eventbus.models import Erasure

    settings.OUTBOX_PUBLISH_ON_COMMIT = False
    as_role("web")  # may publish user.>, may not delete a message
    user = user_register(username="kept", email="kept@example.com", password="x")
    user_delete(user=User.objects.get(pk=user.pk))
    with pytest.raises(NatsAccessError) as refused:
        relay_flush()
    assert 'permissions violation for publish to "$js.api.stream.msg.delete.users"' in (
        str(refused.value).lower())
    assert not OutboxEvent.objects.filter(key=str(user.pk), published_at__isnull=True).exists()
    assert Erasure.objects.get(key=str(user.pk)).stream_erased_at is None
    assert OutboxEvent.objects.filter(key=str(user.pk), subject="user.registered").exists()

    as_role("relay")
    relay_flush()
    assert Erasure.objects.get(key=str(user.pk)).stream_erased_at is not None
    assert not OutboxEvent.objects.filter(key=str(user.pk), subject="user.registered").exists()

"""Provisioning is idempotent and changes only what it manages."""

from __future__ import annotations

import io

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from nats.js.api import RetentionPolicy, StreamConfig

from conftest import run_async


def setup_output() -> str:
    out = io.StringIO()
    call_command("setup_jetstream", stdout=out)
    return out.getvalue()


def test_second_run_changes_nothing(jetstream):
    output = setup_output()
    assert f"stream {settings.NATS_STREAM}: unchanged" in output
    for name in ("players", "characters", "progression", "buildings"):
        assert f"consumer {name}: unchanged" in output


def test_creates_limits_stream_and_one_durable_per_context(jetstream):
    async def read(js):
        stream = await js.stream_info(settings.NATS_STREAM)
        consumers = {c.name: c.config for c in await js.consumers_info(settings.NATS_STREAM)}
        return stream.config, consumers

    stream, consumers = run_async(read)
    assert str(getattr(stream.retention, "value", stream.retention)) == "limits"
    assert stream.subjects == ["user.>", "replay.>"]
    assert stream.max_age == pytest.approx(settings.NATS_STREAM_MAX_AGE)
    assert stream.duplicate_window == pytest.approx(settings.NATS_DUPLICATE_WINDOW)
    assert set(consumers) == {"accounts", "players", "characters", "progression", "buildings"}
    for name, config in consumers.items():
        assert config.durable_name == name
        handled = ["user.registered", "user.deleted"]
        handled += ["user.renamed"] if name == "players" else []
        if name == "accounts":  # the services' announcements, into its readiness projection
            handled = ["user.onboarded.*", "user.erased.*"]
        assert sorted(config.filter_subjects) == sorted([*handled, f"replay.{name}.>"])
        assert str(getattr(config.ack_policy, "value", config.ack_policy)) == "explicit"
        assert config.max_deliver == -1  # the runner enforces CONSUMER_MAX_DELIVER
        assert config.inactive_threshold in (None, 0)  # durables never expire


def test_update_restores_managed_fields_and_keeps_the_rest(jetstream):
    async def drift(js):
        config = (await js.stream_info(settings.NATS_STREAM)).config
        config.max_age = 60.0
        config.duplicate_window = 30.0
        config.description = "set by an operator"
        await js.update_stream(config)
        consumer = (await js.consumer_info(settings.NATS_STREAM, "players")).config
        consumer.max_deliver = 99
        consumer.description = "tuned by hand"
        await js.add_consumer(settings.NATS_STREAM, consumer)

    run_async(drift)
    output = setup_output()
    assert f"stream {settings.NATS_STREAM}: updated (max_age, duplicate_window)" in output
    assert "consumer players: updated (max_deliver)" in output

    async def read(js):
        stream = (await js.stream_info(settings.NATS_STREAM)).config
        consumer = (await js.consumer_info(settings.NATS_STREAM, "players")).config
        return stream, consumer

    stream, consumer = run_async(read)
    assert stream.max_age == pytest.approx(settings.NATS_STREAM_MAX_AGE)
    assert stream.description == "set by an operator"
    assert consumer.max_deliver == -1
    assert consumer.description == "tuned by hand"


def test_refuses_a_stream_with_the_wrong_retention(jetstream):
    async def replace(js):
        await js.delete_stream(settings.NATS_STREAM)
        await js.add_stream(StreamConfig(name=settings.NATS_STREAM, subjects=["user.>"],
                                         retention=RetentionPolicy.INTEREST))

    run_async(replace)
    with pytest.raises(CommandError, match="interest retention"):
        setup_output()


def test_unreachable_nats_is_a_clear_error(settings):
    from onboarding.dev.natsserver import free_port

    settings.NATS_URL = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(CommandError, match="no NATS server answered"):
        call_command("setup_jetstream", wait=1)


def test_a_durable_from_an_older_config_is_brought_up_to_date(jetstream):
    from nats.js.api import ConsumerConfig

    async def old(js):
        await js.delete_consumer(settings.NATS_STREAM, "players")
        await js.add_consumer(settings.NATS_STREAM, ConsumerConfig(
            durable_name="players", filter_subject="user.registered", max_deliver=10,
        ))

    run_async(old)
    assert "consumer players: updated (filter_subject, filter_subjects, ack_wait, max_deliver" \
        in setup_output()

    async def read(js):
        return (await js.consumer_info(settings.NATS_STREAM, "players")).config

    config = run_async(read)
    assert config.filter_subjects == [
        "user.registered", "user.deleted", "user.renamed", "replay.players.>"]
    assert config.max_deliver == -1


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_consumer_on_a_durable_from_before_a_new_event_type_says_so(jetstream, start_consumers,
                                                                     caplog):
    """A durable that does not deliver user.deleted would never erase a user there: the
    consumer says which subjects it misses, and how to fix it, and goes on with the rest."""
    import logging

    from nats.js.api import ConsumerConfig

    from conftest import wait_until
    from onboarding.eventbus.nats.provisioning import missing_subjects
    from onboarding.eventbus.registry import get_consumers

    async def old(js):
        await js.delete_consumer(settings.NATS_STREAM, "players")
        await js.add_consumer(settings.NATS_STREAM, ConsumerConfig(
            durable_name="players", filter_subjects=["user.registered", "replay.players.>"]))

    run_async(old)
    spec = get_consumers()["players"]
    assert missing_subjects(spec, ConsumerConfig(filter_subject="user.registered")) == [
        "user.deleted", "user.renamed", "replay.players.>"]
    assert missing_subjects(spec, ConsumerConfig()) == []  # no filter: the whole stream
    caplog.set_level(logging.ERROR, logger="onboarding.eventbus.consumer.runner")
    start_consumers(["players"])
    wait_until(lambda: any(
        "the durable does not deliver user.deleted, user.renamed; run `manage.py "
        "setup_jetstream`" in record.getMessage() for record in caplog.records),
        message="the consumer names what its durable misses")

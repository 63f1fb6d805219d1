"""pull.py's ``fetch`` against a real nats-server, side by side with nats-py's own.

Each scenario runs with both, so that the cheaper fetch is shown to answer as nats-py's does:
the same messages, in the same order, the same errors, and the subscription's byte count back
at zero (nats-py's slow-consumer limit is measured against it).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from onboarding.eventbus.consumer.runner import ConsumerRunner
from onboarding.eventbus.nats import compat
from onboarding.eventbus.nats import pull as fetching
from onboarding.eventbus.registry import ConsumerSpec

FETCHERS = {
    "ours": lambda psub, batch, timeout: fetching.fetch(psub, batch, timeout),
    "nats-py": lambda psub, batch, timeout: psub.fetch(batch, timeout=timeout),
}


@pytest.fixture(params=sorted(FETCHERS))
def fetcher(request):
    return FETCHERS[request.param]


def on_a_stream(nats_server, scenario):
    """Run ``await scenario(js, psub, subject)`` on a stream and durable of its own."""

    async def main():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream(timeout=5)
        stream = f"FETCH_{uuid.uuid4().hex[:8]}"
        subject = f"{stream.lower()}.event"
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        await js.add_consumer(stream, ConsumerConfig(durable_name="d",
                                                     ack_policy=AckPolicy.EXPLICIT))
        try:
            psub = await js.pull_subscribe_bind("d", stream=stream)
            return await scenario(js, psub, subject)
        finally:
            await js.delete_stream(stream)
            await nc.close()

    return asyncio.run(main())


async def publish(js, subject: str, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        await js.publish(subject, str(i).encode())


def numbers(msgs) -> list[int]:
    return [int(msg.data) for msg in msgs]


def test_this_nats_py_is_the_one_fetching_knows(nats_server):
    async def scenario(js, psub, subject):
        return compat.pull_supported(psub)

    assert on_a_stream(nats_server, scenario)


# Every internal pull.py reads, as (object, attribute): a nats-py that renamed any one of them
# must fall back to its own fetch, not fail on every empty queue.
INTERNALS = [("psub", "_sub"), ("sub", "_pending_queue"), ("sub", "_pending_size"),
             ("sub", "_conn"), ("psub", "_nms"), ("psub", "_deliver"), ("psub", "_nc")]


@pytest.mark.parametrize("owner,attribute", INTERNALS, ids=[a for _, a in INTERNALS])
def test_a_nats_py_without_one_of_the_internals_is_not_supported(nats_server, owner, attribute):
    async def scenario(js, psub, subject):
        target = psub if owner == "psub" else psub._sub
        saved = getattr(target, attribute)
        delattr(target, attribute) if attribute in vars(target) else None
        try:
            return compat.pull_supported(psub)
        finally:
            setattr(target, attribute, saved)

    assert on_a_stream(nats_server, scenario) is False


def test_a_backlog_comes_in_full_batches_in_stream_order_and_each_message_once(
        nats_server, fetcher):
    async def scenario(js, psub, subject):
        await publish(js, subject, 250)
        batches = []
        for _ in range(3):
            msgs = await fetcher(psub, 100, 1.0)
            batches.append(numbers(msgs))
            for msg in msgs:
                await msg.ack()
        return batches, psub._sub._pending_size

    batches, pending_bytes = on_a_stream(nats_server, scenario)
    assert [len(batch) for batch in batches] == [100, 100, 50]
    assert sum(batches, []) == list(range(250))
    assert pending_bytes == 0


def test_an_idle_durable_times_out(nats_server, fetcher):
    async def scenario(js, psub, subject):
        with pytest.raises(TimeoutError):
            await fetcher(psub, 100, 0.3)
        # and a message published after that comes with the next fetch, alone
        await publish(js, subject, 1)
        return numbers(await fetcher(psub, 100, 1.0))

    assert on_a_stream(nats_server, scenario) == [0]


def test_a_message_published_while_waiting_is_returned_without_waiting_for_a_full_batch(
        nats_server, fetcher):
    async def scenario(js, psub, subject):
        async def later():
            await asyncio.sleep(0.2)
            await publish(js, subject, 3)

        publishing = asyncio.create_task(later())
        msgs = await fetcher(psub, 100, 5.0)
        await publishing
        rest = []
        while len(msgs) + len(rest) < 3:  # the three may come in one fetch or several
            rest += await fetcher(psub, 100, 1.0)
        return numbers(msgs + rest)

    assert on_a_stream(nats_server, scenario) == [0, 1, 2]


def test_what_an_earlier_pull_request_left_in_the_queue_comes_first(nats_server, fetcher):
    """A pull request outlives the fetch that returned early: what it delivers afterwards waits
    in the subscription's queue, and the next fetch returns it before asking for more."""

    async def scenario(js, psub, subject):
        await publish(js, subject, 8)
        # A request for 5 that no fetch is waiting on (as one left behind would be).
        await psub._nc.publish(psub._nms, b'{"batch": 5, "no_wait": true}', psub._deliver)
        await asyncio.sleep(0.2)  # its messages are in the queue now
        first = await fetcher(psub, 3, 1.0)
        second = await fetcher(psub, 10, 1.0)
        return numbers(first), numbers(second), psub._sub._pending_size

    first, second, pending_bytes = on_a_stream(nats_server, scenario)
    assert first + second == list(range(8))
    assert first[:3] == [0, 1, 2]
    assert pending_bytes == 0


def test_our_fetch_never_returns_more_than_its_batch(nats_server):
    """nats-py's returns everything queued, whatever the batch (5 queued, fetch(3): 6 messages);
    a runner that sized its work by the batch would be surprised."""

    async def scenario(js, psub, subject):
        await publish(js, subject, 8)
        await psub._nc.publish(psub._nms, b'{"batch": 5, "no_wait": true}', psub._deliver)
        await asyncio.sleep(0.2)
        return [numbers(await fetching.fetch(psub, 3, 1.0)) for _ in range(3)]

    assert on_a_stream(nats_server, scenario) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_a_request_the_durable_refuses_is_waited_out_not_retried_at_once(nats_server):
    """A durable that answers every pull request with a 409 (here: a batch over its max_batch)
    must not make the consumer's loop spin: the fetch waits out its time, as nats-py's does."""

    async def scenario(js, psub, subject):
        stream = psub._stream
        await js.delete_consumer(stream, "d")
        # max_batch: not in nats-py's ConsumerConfig, so through the API itself
        await psub._nc.request(f"$JS.API.CONSUMER.CREATE.{stream}.d", json.dumps({
            "stream_name": stream,
            "config": {"durable_name": "d", "ack_policy": "explicit", "max_batch": 10},
        }).encode(), timeout=5)
        await publish(js, subject, 3)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await fetching.fetch(psub, 100, 0.5)
        waited = asyncio.get_running_loop().time() - started
        return waited, numbers(await fetching.fetch(psub, 10, 1.0))

    waited, got = on_a_stream(nats_server, scenario)
    assert waited >= 0.45  # its whole timeout, not a few milliseconds
    assert got == [0, 1, 2]  # a batch within max_batch is served


# A fetch that waited out its timeout here would be a hang, not an answer: each test gives it
# far longer than an answer takes, and requires the error before a fraction of it.
PATIENCE = 5.0


def test_a_closed_connection_is_said_so(nats_server, fetcher):
    async def scenario(js, psub, subject):
        await psub._nc.close()
        started = asyncio.get_running_loop().time()
        with pytest.raises(nats.errors.ConnectionClosedError):
            await fetcher(psub, 10, PATIENCE)
        took = asyncio.get_running_loop().time() - started
        await psub._nc.connect(servers=[nats_server.url])  # for the scenario's clean-up
        return took

    assert on_a_stream(nats_server, scenario) < PATIENCE / 5


def test_a_durable_deleted_under_the_subscription_is_an_error_not_a_hang(nats_server, fetcher):
    async def scenario(js, psub, subject):
        stream = psub._stream
        await js.delete_consumer(stream, "d")
        started = asyncio.get_running_loop().time()
        with pytest.raises(nats.errors.Error) as raised:
            await fetcher(psub, 10, PATIENCE)
        assert not isinstance(raised.value, nats.errors.TimeoutError), raised.value
        return asyncio.get_running_loop().time() - started

    assert on_a_stream(nats_server, scenario) < PATIENCE / 5


def test_the_runner_falls_back_to_nats_py_fetch_when_the_internals_are_not_there():
    calls = []

    class Unknown:  # a pull subscription of some other nats-py
        async def fetch(self, batch, timeout):
            calls.append((batch, timeout))
            return ["msg"]

    spec = ConsumerSpec(name="players", subscriptions=())
    fetch = ConsumerRunner._fetcher(spec, Unknown())
    assert asyncio.run(fetch(7, 0.5)) == ["msg"]
    assert calls == [(7, 0.5)]

"""The Redis Streams transport against a real redis-server: batched read, ack, reclaim
after idle, dead letter after the last delivery, idempotent enqueue, queue limit."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import types
import weakref

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from redis_helpers import free_port, redis_server  # noqa: F401 (fixture)

from bot.jobs.consumer import JobConsumer
from bot.jobs.record import JobRecord
from bot.jobs.scripts import ScriptCall, run_calls, sent
from bot.jobs.shared import RedisEncodedCache, SharedPhotoBook
from bot.jobs.transport import (
    MAX_CONNECTIONS,
    QueueFullError,
    RedisTransport,
    UnreachableError,
    connect_client,
    encoded_key,
    wait_for_redis,
)

pytestmark = pytest.mark.timeout(30)
_prefixes = itertools.count()


@pytest_asyncio.fixture
async def client(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def make(client, **kwargs) -> RedisTransport:
    transport = RedisTransport(client, prefix=f"t{next(_prefixes)}", **kwargs)
    await transport.ensure_group()
    return transport


def job(update_id: int, **kwargs) -> JobRecord:
    values = dict(
        chat_id=10 + update_id % 3,
        user_id=7,
        message_id=100 + update_id,
        kind="caption",
        file_id=f"F{update_id}",
        file_unique_id=f"U{update_id}",
    )
    values.update(kwargs)
    return JobRecord(update_id=update_id, **values)


def test_a_job_record_survives_the_stream_fields():
    record = job(5, kind="samples", n=4, temperature=0.7, file_size=1234)
    assert (
        JobRecord.from_fields({k.encode(): v.encode() for k, v in record.to_fields().items()})
        == record
    )
    assert JobRecord.from_fields(job(6).to_fields()).file_size is None
    for anyway in (True, False):  # the "Caption anyway" button's job keeps its flag
        assert JobRecord.from_fields(job(8, anyway=anyway).to_fields()).anyway is anyway
    with pytest.raises(ValueError):
        JobRecord.from_fields({**job(7).to_fields(), "kind": "nope"})
    with pytest.raises(ValueError):
        JobRecord.from_fields({"update_id": "1"})


async def test_reads_come_in_batches_of_at_most_count(client):
    transport = await make(client)
    for update_id in range(1, 12):
        assert await transport.enqueue(job(update_id))
    first = await transport.read("w1", count=8, block_ms=10)
    second = await transport.read("w2", count=8, block_ms=10)
    assert [d.job.update_id for d in first] == list(range(1, 9))
    assert [d.job.update_id for d in second] == [9, 10, 11]
    assert all(d.deliveries == 1 for d in first + second)
    assert await transport.read("w1", count=8, block_ms=10) == []  # nothing new: waits, then []
    assert await transport.pending() == 11


async def test_a_blocked_read_returns_as_soon_as_a_job_arrives(client):
    transport = await make(client)
    reader = asyncio.create_task(transport.read("w1", count=8, block_ms=5000))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await transport.enqueue(job(1))
    got = await reader
    assert [d.job.update_id for d in got] == [1] and loop.time() - started < 1


async def test_finish_acks_deletes_and_records_the_answer(client):
    transport = await make(client)
    await transport.enqueue(job(1))
    await transport.enqueue(job(2))
    batch = await transport.read("w1", count=8, block_ms=10)
    assert not await transport.answered(1)
    await transport.finish(batch[0], "w1")
    assert await transport.pending() == 1
    assert await transport.answered(1) and not await transport.answered(2)
    record = json.loads(await client.get(transport.key("reply", 1)))
    assert record == {"deliveries": 1, "by": "w1", "at": record["at"]}
    assert await client.xlen(transport.stream) == 1  # acked entries are deleted too


async def test_an_idle_job_is_reclaimed_by_another_consumer(client):
    transport = await make(client, claim_idle_ms=200)
    await transport.enqueue(job(1))
    await transport.read("dead", count=8, block_ms=10)
    assert await transport.reclaim("alive", count=8) == []  # not idle long enough yet
    await asyncio.sleep(0.3)
    claimed = await transport.reclaim("alive", count=8)
    assert [(d.job.update_id, d.deliveries) for d in claimed] == [(1, 2)]
    await transport.finish(claimed[0], "alive")
    assert await transport.pending() == 0
    assert json.loads(await client.get(transport.key("reply", 1)))["deliveries"] == 2


async def test_after_the_last_delivery_a_job_goes_to_the_dead_letter_stream(client):
    transport = await make(client, claim_idle_ms=50, max_deliveries=2)
    await transport.enqueue(job(1))
    deliveries = [d.deliveries for d in await transport.read("a", count=8, block_ms=10)]
    for consumer in ("b", "c"):
        await asyncio.sleep(0.1)
        claimed = await transport.reclaim(consumer, count=8)
        deliveries += [d.deliveries for d in claimed]
    assert deliveries == [1, 2, 3]  # the third exceeds max_deliveries=2
    await transport.dead_letter(claimed[0], "c", "max_deliveries")
    assert await transport.pending() == 0 and await client.xlen(transport.stream) == 0
    [(_, dead)] = await client.xrange(transport.dead_stream)
    assert dead[b"update_id"] == b"1" and dead[b"deliveries"] == b"3"
    assert dead[b"reason"] == b"max_deliveries"
    assert await transport.answered(1)  # a later claim of a stale copy stays silent


async def test_the_same_update_enqueued_twice_makes_one_job(client):
    transport = await make(client)
    first = await transport.enqueue(job(42))
    again = await asyncio.gather(*(transport.enqueue(job(42)) for _ in range(5)))
    assert first is not None and again == [None] * 5
    assert await client.xlen(transport.stream) == 1
    # Even after the job was answered and its entry deleted:
    [delivery] = await transport.read("w", count=8, block_ms=10)
    await transport.finish(delivery, "w")
    assert await transport.enqueue(job(42)) is None


async def test_a_full_queue_refuses_new_jobs(client):
    transport = await make(client, queue_max=2)
    await transport.enqueue(job(1))
    await transport.enqueue(job(2))
    with pytest.raises(QueueFullError):
        await transport.enqueue(job(3))
    assert await transport.enqueue(job(1)) is None  # a duplicate is still just a duplicate
    [delivery, _] = await transport.read("w", count=8, block_ms=10)
    await transport.finish(delivery, "w")
    assert await transport.enqueue(job(3))  # room again


async def test_an_unreachable_redis_is_reported_after_a_bounded_wait():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UnreachableError) as caught:
        await wait_for_redis(client, url, wait_s=0.5)
    assert 0.4 < loop.time() - started < 3
    message = str(caught.value)
    assert "QUEUE_URL" in message and "hunter2" not in message and "\n" not in message
    await client.aclose()


async def test_a_job_kept_by_its_live_consumer_is_not_reclaimed(client):
    transport = await make(client, claim_idle_ms=200)
    await transport.enqueue(job(1))
    [delivery] = await transport.read("slow", count=8, block_ms=10)
    for _ in range(4):
        await asyncio.sleep(0.1)
        await transport.keep("slow", [delivery.entry_id])
    assert await transport.reclaim("other", count=8) == []
    await asyncio.sleep(0.3)
    [claimed] = await transport.reclaim("other", count=8)
    await transport.keep("slow", [delivery.entry_id])  # too late: it is not taken back
    assert (await transport.delivery_counts("other", [claimed.entry_id])) == {claimed.entry_id: 2}


async def until(condition, limit_s: float = 20) -> None:
    """Wait for `condition()`; fail (rather than hang) if it never holds."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), limit_s)


class _StuckService:
    """A CaptionService whose every caption waits until `release` is set."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release = asyncio.Event()

    async def caption(self, chat_id, reply_to, photo, *, anyway=False):
        self.started.append(reply_to)
        await self.release.wait()


async def test_the_photo_books_writes_go_with_the_enqueue_even_after_a_script_flush(client):
    transport = await make(client)
    book = SharedPhotoBook(client, transport.prefix, ttl_s=60)
    chat_key = f"{transport.prefix}:photos:10"
    await client.set(encoded_key(transport.prefix, "U2"), b"an entry")  # photo 2 was encoded
    async with book.writes_deferred():
        await book.remember(10, 100, job(1).photo)
        await book.remember(10, 101, job(2).photo)
        assert not await client.exists(chat_key)  # the writes wait for the job
        writes = book.take_writes()
        assert len(writes) == 2 and book.take_writes() == []
        await client.script_flush()  # Redis restarted: EVALSHA answers NOSCRIPT, then EVAL
        await transport.enqueue(job(1), writes)
        await transport.enqueue(job(2))
    reader = SharedPhotoBook(client, transport.prefix, ttl_s=60)
    assert await reader.by_message(10, 100) == job(1).photo
    assert await reader.latest(10) == job(2).photo
    # Each job says whether the photo's encoding was in the shared cache when enqueued.
    read = await transport.read("w", count=8, block_ms=10)
    assert [(d.job.update_id, d.job.cached) for d in read] == [(1, False), (2, True)]


async def test_a_worker_links_its_reply_with_the_finish_and_trusts_the_enqueues_cache_answer(
    client, redis_server
):
    transport = await make(client)
    photos = SharedPhotoBook(client, transport.prefix, ttl_s=60)
    sync = redis.Redis.from_url(redis_server.url)
    cache = RedisEncodedCache(4, sync, prefix=transport.prefix, ttl_s=60)
    seen: list[tuple[int, bool, bool]] = []

    class LinkingService:
        def __init__(self) -> None:
            self.photos = photos

        async def caption(self, chat_id, reply_to, photo, *, anyway=False):
            await self.photos.link_reply(chat_id, reply_to + 1000, photo)
            linked = await client.hexists(f"{transport.prefix}:photos:{chat_id}", "m:1101")
            seen.append((reply_to, await cache.holds(photo.key), linked))

    await transport.enqueue(job(1))
    await client.set(encoded_key(transport.prefix, "U1"), b"written after the enqueue")
    consumer = JobConsumer(transport, LinkingService(), types.SimpleNamespace(
        batch_max=4, shutdown_timeout_s=5), name="c")  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    try:
        await until(lambda: consumer.jobs_done == 1)
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        sync.close()
    # Not cached at the enqueue: no second question to Redis. The link waited for the finish.
    assert seen == [(101, False, False)]
    assert await SharedPhotoBook(client, transport.prefix).by_message(11, 1101) == job(1).photo
    assert await transport.pending() == 0 and await transport.answered(1)


async def test_a_consumer_holds_three_batches_one_decoding_one_encoding_one_downloading(
    client,
):
    transport = await make(client, claim_idle_ms=3000)
    for update_id in range(20):
        await transport.enqueue(job(update_id))
    service = _StuckService()
    settings = types.SimpleNamespace(batch_max=4, shutdown_timeout_s=5)
    consumer = JobConsumer(transport, service, settings, name="c")
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    try:
        await until(lambda: len(service.started) >= 12)
        await asyncio.sleep(0.3)  # a few more turns of its loop: it takes no more
        assert (len(service.started), consumer.in_hand, await transport.pending()) == (12, 12, 12)
        service.release.set()
        await until(lambda: consumer.jobs_done == 20)
    finally:
        service.release.set()
        stop.set()
        await asyncio.wait_for(running, 20)
    assert sorted(service.started) == [100 + update_id for update_id in range(20)]
    assert await transport.pending() == 0


async def test_a_client_waits_for_one_of_its_connections_rather_than_opening_more(
    redis_server, client
):
    bounded = connect_client(redis_server.url)
    before = (await client.info("stats"))["total_connections_received"]
    keys = [f"t{next(_prefixes)}:k{i}" for i in range(100)]
    await asyncio.gather(*(bounded.set(key, i) for i, key in enumerate(keys)))
    assert [int(v) for v in await bounded.mget(keys)] == list(range(100))
    opened = (await client.info("stats"))["total_connections_received"] - before
    await bounded.aclose()
    assert 1 <= opened <= MAX_CONNECTIONS


async def test_enqueues_made_together_share_one_pipeline_and_each_gets_its_own_answer(client):
    transport = await make(client)
    await transport.enqueue(job(0))
    pipelines, calls = sent(client)
    # As the frontend does with the updates of one getUpdates: one task per update.
    ids = await asyncio.gather(*(transport.enqueue(job(u)) for u in [0, 1, 2, 3, 2]))
    assert sent(client) == (pipelines + 1, calls + 5)
    assert ids[0] is None  # enqueued before
    assert ids[1] is not None and ids[2] is not None and ids[3] is not None
    assert ids[4] is None and len(set(ids[1:4])) == 3  # update 2 twice in one pipeline: one job
    read = await transport.read("w", count=10, block_ms=10)
    assert [d.job.update_id for d in read] == [0, 1, 2, 3]
    assert [d.entry_id for d in read[1:]] == ids[1:4]


async def test_calls_sent_together_fail_together_when_redis_is_gone():
    gone = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
    call = ScriptCall("return 1", ("k",), ())
    outcomes = await asyncio.gather(
        *(run_calls(gone, [call]) for _ in range(3)), return_exceptions=True
    )
    await gone.aclose()
    assert sent(gone)[0] == 1
    assert all(isinstance(outcome, redis.ConnectionError) for outcome in outcomes), outcomes
    # The batching keeps no client alive once its owner has let it go.
    collected = weakref.ref(gone)
    del gone, outcomes  # (their tracebacks hold the client too)
    gc.collect()
    assert collected() is None


async def test_a_caller_cancelled_while_its_pipeline_runs_leaves_the_others_their_answers(client):
    calls = [ScriptCall("return ARGV[1]", (), (str(i),)) for i in range(3)]
    tasks = [asyncio.create_task(run_calls(client, [call])) for call in calls]
    await asyncio.sleep(0)  # every call is waiting for the pipeline
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == [b"0"] and done[2] == [b"2"]
    assert isinstance(done[1], asyncio.CancelledError)


async def test_live_consumers_are_those_that_checked_in_within_the_claim_idle_time(client):
    transport = await make(client, claim_idle_ms=400)
    assert await transport.live_consumers("a") == {"a"}
    assert await transport.live_consumers("b") == {"a", "b"}
    await asyncio.sleep(0.5)
    assert await transport.live_consumers("a") == {"a"}  # b died: silent too long


async def test_a_worker_alone_stops_sharing_encodings_until_another_checks_in(client):
    transport = await make(client, claim_idle_ms=600)  # checks in every 0.2 s
    for update_id in range(20):
        await transport.enqueue(job(update_id))  # more than it holds: it stays at capacity
    cache = types.SimpleNamespace(shared=True)  # RedisEncodedCache's switch
    settings = types.SimpleNamespace(batch_max=4, shutdown_timeout_s=5)
    service = _StuckService()
    consumer = JobConsumer(transport, service, settings, name="a", cache=cache)
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    try:
        await until(lambda: not cache.shared)
        await until(lambda: consumer.in_hand == 12)
        await asyncio.sleep(0.7)
        # at capacity for longer than claim_idle_ms, and yet it checks in:
        checked_in = asyncio.get_running_loop().time()
        assert await transport.live_consumers("b") == {"a", "b"}  # a second worker, once
        await until(lambda: cache.shared)
        await until(lambda: not cache.shared)
        assert asyncio.get_running_loop().time() - checked_in >= 0.55  # live for claim_idle_ms
    finally:
        service.release.set()
        stop.set()
        await asyncio.wait_for(running, 20)

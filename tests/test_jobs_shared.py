"""State shared through a real redis-server: the encoded-photo cache (any worker sees what
another encoded; bounded; with a TTL), the photo book (which photo a message means, across
processes; bounded; with a TTL), the rate limit and the allowlist's refusals across
frontends."""

from __future__ import annotations

import asyncio
import io
import itertools
import threading

import numpy as np
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from PIL import Image
from redis_helpers import redis_server  # noqa: F401 (fixture)

from bot.jobs.shared import (
    SOURCE_MAX_BYTES,
    RedisEncodedCache,
    SharedAllowlist,
    SharedPhotoBook,
    SharedRateLimit,
    dumps_entry,
    loads_entry,
)
from bot.photos import PhotoRef
from bot.worker import _CacheEntry
from model.captioner import Encoded

pytestmark = pytest.mark.timeout(30)
_prefixes = itertools.count()


def entry(seed: int) -> _CacheEntry:
    grid = np.random.default_rng(seed).standard_normal((196, 488)).astype(np.float16)
    return _CacheEntry(Encoded(grid=grid), Image.new("RGB", (384, 288), (seed, 90, 200)))


@pytest.fixture
def sync_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest_asyncio.fixture
async def client(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def test_an_entry_round_trips_compactly_and_exactly():
    original = entry(3)
    data = dumps_entry(original)
    assert len(data) < 196 * 488 * 2 + 30_000  # float16 as is, plus a JPEG thumbnail
    back = loads_entry(data)
    assert back.encoded.grid.dtype == np.float16
    assert np.array_equal(back.encoded.grid, original.encoded.grid)
    assert back.thumbnail.size == (384, 288)
    assert dumps_entry(_CacheEntry("not a tensor", None)) is None


def test_a_small_photo_is_stored_as_itself_and_opened_as_the_worker_opened_it():
    from bot.worker import _thumbnail
    from model.images import open_image

    buffer = io.BytesIO()
    Image.new("RGB", (500, 300), (20, 140, 60)).save(buffer, format="PNG")
    source = buffer.getvalue()
    data = dumps_entry(entry(4), source)
    assert source in data  # no JPEG re-encoded: the photo's bytes as they came
    back = loads_entry(data).thumbnail
    expected = _thumbnail(open_image(source))
    assert back.size == expected.size == (384, 230)
    assert np.array_equal(np.asarray(back), np.asarray(expected))
    # A large file (a document) is not stored whole: its thumbnail is, as JPEG.
    large = dumps_entry(entry(4), source + bytes(SOURCE_MAX_BYTES))
    assert len(large) < 196 * 488 * 2 + 30_000
    assert loads_entry(large).thumbnail.size == (384, 288)


def test_a_photo_encoded_by_one_worker_is_cached_for_another(sync_client):
    prefix = f"s{next(_prefixes)}"
    first = RedisEncodedCache(4, sync_client, prefix=prefix, ttl_s=60)
    second = RedisEncodedCache(4, sync_client, prefix=prefix, ttl_s=60)
    assert "photo" not in second and second.get("photo") is None
    first.put("photo", entry(1))
    first.flush()
    assert "photo" in second
    got = second.get("photo")
    assert np.array_equal(got.encoded.grid, entry(1).encoded.grid)
    assert 0 < sync_client.ttl(f"{prefix}:encoded:photo") <= 60


def test_an_unshared_cache_keeps_its_entries_in_this_process(sync_client):
    prefix = f"s{next(_prefixes)}"
    alone = RedisEncodedCache(4, sync_client, prefix=prefix, ttl_s=60)
    other = RedisEncodedCache(4, sync_client, prefix=prefix, ttl_s=60)
    alone.shared = False  # a worker alone in its consumer group (JobConsumer)
    alone.put("photo", entry(1))
    alone.flush()
    assert np.array_equal(alone.get("photo").encoded.grid, entry(1).encoded.grid)
    assert "photo" not in other and sync_client.exists(f"{prefix}:encoded:photo") == 0
    alone.shared = True
    alone.put("next", entry(2))
    alone.flush()
    assert "next" in other


async def test_the_event_loop_asks_redis_whether_a_photo_is_cached_from_a_thread(sync_client):
    prefix = f"s{next(_prefixes)}"
    first = RedisEncodedCache(4, sync_client, prefix=prefix, ttl_s=60)
    second = RedisEncodedCache(4, sync_client, prefix=prefix, ttl_s=60)
    first.put("photo", entry(1))
    first.flush()
    asked_from = []
    exists = sync_client.exists

    def recording_exists(*keys):
        asked_from.append(threading.get_ident())
        return exists(*keys)

    sync_client.exists = recording_exists
    assert await second.holds("photo") and not await second.holds("never")
    assert await first.holds("photo")  # its own entry: Redis is not asked
    assert len(asked_from) == 2 and threading.get_ident() not in asked_from


def test_the_shared_cache_keeps_at_most_its_capacity(sync_client):
    prefix = f"s{next(_prefixes)}"
    cache = RedisEncodedCache(3, sync_client, prefix=prefix, ttl_s=60)
    for index in range(5):
        cache.put(f"p{index}", entry(index))
    cache.flush()
    other = RedisEncodedCache(3, sync_client, prefix=prefix, ttl_s=60)
    assert [f"p{i}" in other for i in range(5)] == [False, False, True, True, True]
    assert sync_client.zcard(f"{prefix}:encoded") == 3


def test_writes_still_land_after_redis_forgot_the_eviction_script(sync_client):
    prefix = f"s{next(_prefixes)}"
    cache = RedisEncodedCache(2, sync_client, prefix=prefix, ttl_s=60)
    cache.put("p0", entry(0))
    cache.flush()
    sync_client.script_flush()  # as after a restart
    for index in (1, 2):
        cache.put(f"p{index}", entry(index))
    cache.flush()
    other = RedisEncodedCache(2, sync_client, prefix=prefix, ttl_s=60)
    assert [f"p{i}" in other for i in range(3)] == [False, True, True]


def test_a_put_never_waits_for_redis_and_drops_writes_beyond_its_backlog(sync_client):
    prefix = f"s{next(_prefixes)}"
    cache = RedisEncodedCache(8, sync_client, prefix=prefix, ttl_s=60, backlog=1)
    writing, release = threading.Event(), threading.Event()
    write = cache._write

    def stalled_write(key, value, source):
        writing.set()
        release.wait(10)
        write(key, value, source)

    cache._write = stalled_write
    cache.put("p0", entry(0))
    assert writing.wait(10)  # the writer holds p0
    cache.put("p1", entry(1))  # waits in the backlog
    cache.put("p2", entry(2))  # the backlog is full: dropped
    assert all(f"p{i}" in cache for i in range(3))  # locally, at once
    release.set()
    cache.flush()
    other = RedisEncodedCache(8, sync_client, prefix=prefix, ttl_s=60)
    assert [f"p{i}" in other for i in range(3)] == [True, True, False]


def test_without_redis_the_cache_is_local_only():
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    cache = RedisEncodedCache(3, dead, prefix="x", ttl_s=60)
    cache.put("p", entry(1))
    cache.flush()  # the write failed (logged)
    assert "p" in cache and cache.get("p") is not None and "q" not in cache


async def test_the_rate_limit_holds_across_frontends(client):
    prefix = f"s{next(_prefixes)}"
    one, two = (SharedRateLimit(3, client, prefix) for _ in range(2))
    admitted = [await one._admit(7), await two._admit(7), await one._admit(7)]
    assert admitted == [None, None, None]
    wait = await two._admit(7)
    assert wait is not None and 1 <= wait <= 60
    assert await one._admit(8) is None  # another user
    assert await one._first_notice(7, wait) and not await two._first_notice(7, wait)


async def test_a_refused_user_is_refused_once_across_frontends(client):
    prefix = f"s{next(_prefixes)}"
    one, two = (SharedAllowlist({1}, 600, client, prefix) for _ in range(2))
    assert await one._first_refusal(9)
    assert not await two._first_refusal(9) and not await one._first_refusal(9)
    assert await two._first_refusal(10)


def photo(n: int) -> PhotoRef:
    return PhotoRef(f"file-{n}", f"key-{n}", 1000 + n)


async def test_the_photo_book_is_shared_between_processes(client):
    prefix = f"s{next(_prefixes)}"
    frontend, worker, other = (SharedPhotoBook(client, prefix, ttl_s=60) for _ in range(3))
    await frontend.remember(5, 10, photo(1))  # the user's photo
    await worker.link_reply(5, 11, photo(1))  # the bot's caption, sent by a worker
    await other.remember(5, 12, photo(2))  # a second photo, via another frontend
    assert await frontend.by_message(5, 11) == photo(1)
    assert await worker.by_key(5, "key-2") == photo(2)
    assert await frontend.latest(5) == photo(2)  # the chat's latest is read from Redis
    assert await frontend.latest(6) is None and await frontend.by_key(6, "key-1") is None
    assert 0 < await client.ttl(f"{prefix}:photos:5") <= 60


async def test_the_photo_book_keeps_a_bounded_number_of_entries(client):
    prefix = f"s{next(_prefixes)}"
    book = SharedPhotoBook(client, prefix, ttl_s=60, per_chat=4, chats=2)
    for n in range(4):  # two fields (message and key) per photo: the first two fall out
        await book.remember(7, 100 + n, photo(n), latest=n == 3)
    reader = SharedPhotoBook(client, prefix, ttl_s=60)
    found = [await reader.by_message(7, 100 + n) for n in range(4)]
    assert found == [None, None, photo(2), photo(3)]
    assert await reader.latest(7) == photo(3)
    for chat in (8, 9):  # at most two chats: the least recently active one goes
        await book.remember(chat, 1, photo(chat))
    assert not await client.exists(f"{prefix}:photos:7", f"{prefix}:photos:7:order")
    assert await client.zcard(f"{prefix}:photos") == 2


async def test_deferred_writes_wait_for_the_job_and_none_is_lost(client):
    prefix = f"s{next(_prefixes)}"
    book = SharedPhotoBook(client, prefix, ttl_s=60)
    reader = SharedPhotoBook(client, prefix, ttl_s=60)
    release = asyncio.Event()

    async def late() -> None:  # a task started within, still running after the job
        await release.wait()
        await book.link_reply(5, 12, photo(1))

    async with book.writes_deferred():
        await book.remember(5, 10, photo(1))
        assert await reader.latest(5) is None  # not yet in Redis
        started = asyncio.create_task(late())
        await book.link_reply(5, 11, photo(1))  # nobody takes it: written on the way out
    assert await reader.latest(5) == photo(1) and await reader.by_message(5, 11) == photo(1)
    release.set()
    await started
    assert await reader.by_message(5, 12) == photo(1)  # after the job: written at once


async def test_without_redis_the_photo_book_is_local():
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    book = SharedPhotoBook(dead, "x", ttl_s=60)
    await book.remember(1, 2, photo(1))
    await book.link_reply(1, 3, photo(1))
    assert await book.by_message(1, 3) == photo(1) and await book.latest(1) == photo(1)
    assert await book.by_key(1, "key-1") == photo(1) and await book.by_message(1, 9) is None
    await dead.aclose()

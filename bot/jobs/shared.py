"""State several processes share through Redis (QUEUE_URL).

- `RedisEncodedCache`: the encoded-photo cache behind /sample, /attention and the buttons,
  so any worker can answer a command about a photo another worker encoded. Each process
  keeps its local LRU in front; Redis holds at most ENCODED_CACHE_SIZE entries (oldest
  dropped first) for ENCODED_CACHE_TTL_S each. An entry is the float16 grid as raw bytes
  plus the photo's own bytes, or for a large file its thumbnail as JPEG (about 190 KB +
  20-60 KB with the bundled encoder). It is used from the inference thread, so it talks to
  Redis with a blocking client; its writes leave from a thread of their own.
- `SharedRateLimit` and `SharedAllowlist`: the per-user limit and the "refused once, then
  ignored" memory hold across every frontend.
- `SharedPhotoBook`: which photo a message (a user's photo, the bot's reply about it) or a
  button means, and each chat's latest photo, for every frontend and worker.
Redis trouble never fails a request here: the cache and the photo book fall back to their
local copies, the limits to letting the request through (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from bot.jobs.scripts import ScriptCall, run_calls
from bot.jobs.transport import encoded_key
from bot.log import get_logger
from bot.middlewares import AllowlistMiddleware, RateLimitMiddleware
from bot.photos import PhotoBook, PhotoRef
from bot.worker import EncodedCache, _CacheEntry, _thumbnail

log = get_logger("bot.jobs")

_MAGIC = b"CBE1"

# KEYS: the user's window (a sorted set of request times). ARGV: now (ms), window (ms),
# limit. Returns 0 when the request is admitted (and counted), else ms until a slot frees.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1] .. '-' .. redis.call('INCR', KEYS[1] .. ':n'))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1] .. ':n', ARGV[2])
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + tonumber(ARGV[2]) - tonumber(ARGV[1]))
"""


# ---- the encoded-photo cache ------------------------------------------------------------

# The entry's SET and this script go in one pipeline: one round trip per photo. (Before: SET
# + ZADD + trim + ZCARD in a MULTI, then ZPOPMIN and DEL once the cache was full: three. The
# entry itself as a script argument cost redis-server 0.35 ms per photo, against 0.09 ms
# this way and 0.14 ms before: 600 puts of 210 KB, 128 kept.)
# KEYS: the index (a sorted set of names by write time; an entry's key is '<index>:<name>').
# ARGV: TTL (s), now (s), capacity, the entry's name. Returns how many it evicted.
_EVICT = """
local ttl, now = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if extra > 0 then
  for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, extra - 1)) do
    redis.call('DEL', KEYS[1] .. ':' .. name)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
end
return math.max(extra, 0)
"""


# A photo's own bytes up to this size stand in for its thumbnail in a stored entry: re-encoding
# the thumbnail as JPEG cost the writer 0.3-0.45 ms per photo, and a Telegram photo (the
# 384 px size, bot/photos.py) is 20-60 KB. Larger files (documents) are re-encoded.
SOURCE_MAX_BYTES = 128 * 1024


def dumps_entry(entry: _CacheEntry, source: bytes | None = None) -> bytes | None:
    """Bytes for an entry whose encoding is a float16 `grid` (a numpy array, or a torch tensor
    from older code); None for others. `source`: the photo's bytes, kept instead of a JPEG of
    the thumbnail when small enough."""
    import numpy as np

    grid = getattr(entry.encoded, "grid", None)
    if isinstance(grid, np.ndarray):
        array = np.ascontiguousarray(grid)
    elif grid is not None and hasattr(grid, "numpy"):
        array = grid.detach().cpu().numpy()
    else:
        return None
    thumbnail, kind = b"", "jpeg"
    if source is not None and len(source) <= SOURCE_MAX_BYTES:
        thumbnail, kind = source, "source"
    elif hasattr(entry.thumbnail, "save"):
        buffer = io.BytesIO()
        entry.thumbnail.convert("RGB").save(buffer, format="JPEG", quality=90)
        thumbnail = buffer.getvalue()
    header = json.dumps(
        {
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "thumbnail": len(thumbnail),
            "thumbnail_is": kind,
        }
    ).encode()
    return b"".join((_MAGIC, len(header).to_bytes(4, "big"), header, array.tobytes(), thumbnail))


def loads_entry(data: bytes) -> _CacheEntry:
    import numpy as np
    from PIL import Image

    from model.bundle import Encoded
    from model.images import open_image

    if data[:4] != _MAGIC:
        raise ValueError("not an encoded-photo cache entry")
    size = int.from_bytes(data[4:8], "big")
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    split = len(body) - header["thumbnail"]
    array = np.frombuffer(body[:split], dtype=header["dtype"]).reshape(header["shape"])
    thumbnail = None
    if header["thumbnail"] and header.get("thumbnail_is") == "source":
        # opened as the worker opened it before encoding (draft decode, EXIF rotation)
        thumbnail = _thumbnail(open_image(body[split:]))
    elif header["thumbnail"]:
        thumbnail = Image.open(io.BytesIO(body[split:]), formats=("JPEG",))  # as dumps_entry
        thumbnail.load()
    return _CacheEntry(Encoded(grid=array.copy()), thumbnail)


class RedisEncodedCache(EncodedCache):
    """The local LRU, and behind it the entries every worker wrote to Redis.

    `put` only queues the Redis write: a writer thread serializes and stores it, off the
    encoding stage (the write took about 1 ms per photo there: the thumbnail's JPEG, 200 KB
    over the socket, three round trips). Until it lands, another worker misses and
    downloads the photo, as it would for a photo never seen. At most `backlog` writes
    wait; more are dropped (logged), so a slow Redis never holds the model up. With `shared`
    False (a worker alone in its consumer group: JobConsumer) entries stay in this process.
    """

    def __init__(
        self, capacity: int, client: redis.Redis, *, prefix: str, ttl_s: int, backlog: int = 64
    ) -> None:
        super().__init__(capacity)
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.index = f"{prefix}:encoded"
        self._evict = client.register_script(_EVICT)
        self._writes: queue.Queue[tuple[str, _CacheEntry, bytes | None]] = queue.Queue(
            maxsize=backlog
        )
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self.shared = True

    def _key(self, key: str) -> str:
        return encoded_key(self.prefix, key)

    def __contains__(self, key: str) -> bool:
        if super().__contains__(key):
            return True
        try:
            return bool(self.client.exists(self._key(key)))
        except RedisError as error:
            log.warning("shared_cache_unavailable", error=f"{type(error).__name__}: {error}")
            return False

    async def holds(self, key: str) -> bool:
        """This process's entries first; then what the job's enqueue found in Redis (see
        `known_in_redis`); else Redis, from a thread, since the client blocks: on the event
        loop, a loaded redis-server's reply stalled everything else (py-spy: 15 % of a
        worker's event-loop samples waited in this EXISTS, at 2 cores under full load)."""
        if super().__contains__(key):
            return True
        known = _known.get()
        if known is not None and known[0] == key:
            return known[1]
        return await asyncio.to_thread(self.__contains__, key)

    def get(self, key: str) -> _CacheEntry | None:
        entry = super().get(key)
        if entry is not None:
            return entry
        try:
            # redis-py types replies as a union of every RESP type; this client returns bytes
            data: Any = self.client.get(self._key(key))
        except RedisError as error:
            log.warning("shared_cache_unavailable", error=f"{type(error).__name__}: {error}")
            return None
        if data is None:
            return None
        try:
            entry = loads_entry(data)
        except Exception as error:  # noqa: BLE001 - a bad entry is a miss
            log.warning("shared_cache_bad_entry", error=f"{type(error).__name__}: {error}")
            return None
        super().put(key, entry)
        return entry

    def put(self, key: str, entry: _CacheEntry, source: bytes | None = None) -> None:
        super().put(key, entry)
        if self.capacity <= 0 or not self.shared:
            return
        self._start_writer()
        if source is not None and len(source) > SOURCE_MAX_BYTES:
            source = None  # not held in the backlog: the thumbnail is stored instead
        try:
            self._writes.put_nowait((key, entry, source))
        except queue.Full:
            log.warning("shared_cache_backlog_full", backlog=self._writes.maxsize)

    def flush(self) -> None:
        """Wait until every queued write has landed (or failed)."""
        self._writes.join()

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="shared-cache-writer", daemon=True
                )
                self._writer.start()

    def _write_loop(self) -> None:
        while True:
            key, entry, source = self._writes.get()
            try:
                self._write(key, entry, source)
            except Exception:  # a bug here must not end the thread
                log.exception("shared_cache_write_failed")
            finally:
                self._writes.task_done()

    def _write(self, key: str, entry: _CacheEntry, source: bytes | None) -> None:
        if (data := dumps_entry(entry, source)) is None:
            return
        try:
            try:
                self._store(key, data)
            except NoScriptError:  # first write, or Redis restarted: load it, once
                self.client.script_load(_EVICT)
                self._store(key, data)
        except RedisError as error:
            log.warning("shared_cache_unavailable", error=f"{type(error).__name__}: {error}")

    def _store(self, key: str, data: bytes) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self._key(key), data, ex=self.ttl_s)
            pipe.evalsha(
                self._evict.sha, 1, self.index, self.ttl_s, time.time(), self.capacity, key
            )
            pipe.execute()


# (photo key, whether its entry was in Redis when the job was enqueued), set by the worker
# around each job: `holds` then needs no round trip for a new photo (its entry is never
# there). An entry evicted since is a NotCached, and the photo is downloaded after all.
_known: ContextVar[tuple[str, bool] | None] = ContextVar("known_in_redis", default=None)


@contextlib.contextmanager
def known_in_redis(key: str, cached: bool | None) -> Iterator[None]:
    """Within: `RedisEncodedCache.holds(key)` takes `cached` as Redis's answer (None: asks)."""
    token = _known.set(None if cached is None else (key, cached))
    try:
        yield
    finally:
        _known.reset(token)


def shared_cache(settings: Any, prefix: str) -> RedisEncodedCache:
    client = redis.Redis.from_url(settings.queue_url, socket_timeout=5, socket_connect_timeout=5)
    return RedisEncodedCache(
        settings.encoded_cache_size, client, prefix=prefix, ttl_s=settings.encoded_cache_ttl_s
    )


# ---- limits across frontends ------------------------------------------------------------


class SharedRateLimit(RateLimitMiddleware):
    def __init__(self, per_minute: int, client: aioredis.Redis, prefix: str) -> None:
        super().__init__(per_minute)
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(_ADMIT)

    async def _admit(self, user_id: int) -> int | None:
        try:
            wait_ms = await self._script(
                keys=[f"{self.prefix}:rate:{user_id}"],
                args=[int(time.time() * 1000), int(self.WINDOW_S * 1000), self.per_minute],
            )
        except RedisError as error:
            log.warning("shared_limits_unavailable", error=f"{type(error).__name__}: {error}")
            return None
        return None if int(wait_ms) == 0 else max(1, round(int(wait_ms) / 1000))

    async def _first_notice(self, user_id: int, retry_in: int) -> bool:
        return await _set_once(self.client, f"{self.prefix}:rate_noticed:{user_id}", retry_in)


class SharedAllowlist(AllowlistMiddleware):
    def __init__(self, allowed: Any, ignore_s: float, client: aioredis.Redis, prefix: str) -> None:
        super().__init__(allowed, ignore_s)
        self.client = client
        self.prefix = prefix

    async def _first_refusal(self, user_id: int) -> bool:
        return await _set_once(self.client, f"{self.prefix}:refused:{user_id}", self.ignore_s)


async def _set_once(client: aioredis.Redis, key: str, seconds: float) -> bool:
    """True for the first caller across every process within `seconds`."""
    try:
        return bool(await client.set(key, "1", nx=True, px=max(1, int(seconds * 1000))))
    except RedisError as error:
        log.warning("shared_limits_unavailable", error=f"{type(error).__name__}: {error}")
        return True


# ---- which photo a message means, across processes --------------------------------------

# KEYS: the chat's hash, its fields in write order (numbered by the hash's '#seq'), the
# index of chats. ARGV: now (ms), TTL (s), fields kept per chat, chats kept, the chat id,
# then field, value, ... Returns how many chats it dropped (the least recently active).
_REMEMBER = """
local now = tonumber(ARGV[1])
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i] ~= 'latest' then
    redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[1], '#seq', 1), ARGV[i])
  end
end
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]) * 1000)
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[4])
if over <= 0 then return 0 end
for _, chat in ipairs(redis.call('ZRANGE', KEYS[3], 0, over - 1)) do
  redis.call('DEL', KEYS[3] .. ':' .. chat, KEYS[3] .. ':' .. chat .. ':order')
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, over - 1)
return over
"""


class _Deferred:
    """The photo book's writes made while a job is handled, waiting to go out with the job's
    own write (SharedPhotoBook.writes_deferred). Closed once that ends: a task started
    within and still running (it has a copy of the context) then writes at once."""

    def __init__(self) -> None:
        self.calls: list[ScriptCall] = []
        self.open = True


_deferred: ContextVar[_Deferred | None] = ContextVar("deferred_photo_writes", default=None)


class SharedPhotoBook(PhotoBook):
    """The PhotoBook in Redis, so a worker's reply links (and a frontend's "latest photo")
    are seen by every frontend and worker.

    Per chat one hash (`<prefix>:photos:<chat>`: `m:<message id>`, `k:<file_unique_id>`,
    `latest`), at most `per_chat` message/key fields (oldest dropped first), kept `ttl_s`
    after the chat's last photo; at most `chats` chats (the least recently active dropped).
    A local book sits in front: what a message id or key means never changes, so those hits
    skip Redis; the chat's latest photo is always read from Redis. Redis trouble falls
    back to the local book (logged), never fails the update.

    Within `writes_deferred()` (a frontend's update, a worker's job) writes wait for
    `take_writes()`, which hands them to the job's enqueue or finish: one round trip.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        ttl_s: int = 2 * 24 * 3600,
        per_chat: int = 64,
        chats: int = 10_000,
        capacity: int = 10_000,
    ) -> None:
        super().__init__(capacity)
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.per_chat = per_chat
        self.chats = chats
        self.index = f"{prefix}:photos"

    def _chat_key(self, chat_id: int) -> str:
        return f"{self.index}:{chat_id}"

    async def remember(
        self, chat_id: int, message_id: int, photo: PhotoRef, *, latest: bool = True
    ) -> None:
        await super().remember(chat_id, message_id, photo, latest=latest)
        value = json.dumps([photo.file_id, photo.key, photo.file_size])
        args: list[Any] = [int(time.time() * 1000), self.ttl_s, self.per_chat, self.chats]
        args += [chat_id, f"m:{message_id}", value, f"k:{photo.key}", value]
        if latest:
            args += ["latest", value]
        chat_key = self._chat_key(chat_id)
        call = ScriptCall(_REMEMBER, (chat_key, f"{chat_key}:order", self.index), tuple(args))
        deferred = _deferred.get()
        if deferred is not None and deferred.open:
            deferred.calls.append(call)
        else:
            await self._write([call])

    @contextlib.asynccontextmanager
    async def writes_deferred(self) -> AsyncIterator[None]:
        """Writes inside wait for `take_writes`; what nobody took is written on the way out."""
        deferred = _Deferred()
        token = _deferred.set(deferred)
        try:
            yield
        finally:
            deferred.open = False
            _deferred.reset(token)
            await self._write(deferred.calls)

    def take_writes(self) -> list[ScriptCall]:
        """The deferred writes so far, for the caller to send (with its own, in one pipeline)."""
        deferred = _deferred.get()
        if deferred is None:
            return []
        taken, deferred.calls = deferred.calls, []
        return taken

    async def _write(self, calls: list[ScriptCall]) -> None:
        try:
            results = await run_calls(self.client, calls)
        except (RedisError, OSError) as lost:
            results = [lost]
        for result in results:
            if isinstance(result, Exception):
                log.warning("shared_photos_unavailable", error=f"{type(result).__name__}: {result}")

    async def by_message(self, chat_id: int, message_id: int) -> PhotoRef | None:
        return await super().by_message(chat_id, message_id) or await self._read(
            chat_id, f"m:{message_id}"
        )

    async def by_key(self, chat_id: int, key: str) -> PhotoRef | None:
        return await super().by_key(chat_id, key) or await self._read(chat_id, f"k:{key}")

    async def latest(self, chat_id: int) -> PhotoRef | None:
        return await self._read(chat_id, "latest") or await super().latest(chat_id)

    async def _read(self, chat_id: int, field: str) -> PhotoRef | None:
        try:
            raw = await self.client.hget(self._chat_key(chat_id), field)
        except (RedisError, OSError) as error:
            log.warning("shared_photos_unavailable", error=f"{type(error).__name__}: {error}")
            return None
        if raw is None:
            return None
        try:
            file_id, key, size = json.loads(raw)
            return PhotoRef(str(file_id), str(key), None if size is None else int(size))
        except (ValueError, TypeError) as error:
            log.warning("shared_photos_bad_entry", error=f"{type(error).__name__}: {error}")
            return None


@contextlib.asynccontextmanager
async def photo_writes_deferred(book: object) -> AsyncIterator[None]:
    """`writes_deferred()` of a SharedPhotoBook; any other book writes nothing to Redis, so
    there is nothing to defer."""
    if isinstance(book, SharedPhotoBook):
        async with book.writes_deferred():
            yield
    else:
        yield


def take_photo_writes(book: object) -> list[ScriptCall]:
    """`take_writes()` of a SharedPhotoBook; nothing for any other book."""
    return book.take_writes() if isinstance(book, SharedPhotoBook) else []

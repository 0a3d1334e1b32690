"""Jobs on a Redis Stream with one consumer group (redis-py asyncio).

- `enqueue` adds a job once per update_id (a Lua script: a dedupe key set with NX and the
  XADD happen together, or neither does), or refuses it when QUEUE_MAX jobs are waiting.
  The job notes whether the photo's encoding is in the shared cache.
- `read` is XREADGROUP COUNT n BLOCK ms: new jobs, delivered to this consumer only.
- `reclaim` is XAUTOCLAIM: jobs another consumer has held for JOB_CLAIM_IDLE_MS (it died,
  or hangs) move to this one; each comes with its delivery count from XPENDING.
- `finish` writes the job's reply record, XACKs and XDELs it in one Lua script;
  `answered` reads that record, so a job retried after its answer was sent is not
  answered again. `dead_letter` moves a job that used up its deliveries to the
  dead-letter stream.
Both `enqueue` and `finish` take the photo book's writes along, in the same round trip
(bot/jobs/scripts.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from bot.jobs.record import JobRecord
from bot.jobs.scripts import ScriptCall, run_calls
from bot.log import get_logger
from bot.retry import backoff_delay

log = get_logger("bot.jobs")

PREFIX = "captionbot"
GROUP = "workers"
# How long "this update was enqueued" and "this job was answered" are remembered: longer
# than Telegram keeps an unconfirmed update (24 h).
DEDUPE_TTL_S = 2 * 24 * 3600

# KEYS: dedupe key, stream, the photo's shared encoded-cache entry. ARGV: dedupe TTL, queue
# max (0: none), then field, value, ... Returns the entry id, 0 for a duplicate, -1 when the
# queue is full. The job records whether the photo's encoding was in the shared cache, so
# the worker need not ask Redis again (an EXISTS per job, from a thread).
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('XLEN', KEYS[2]) >= limit then return -1 end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
local cached = redis.call('EXISTS', KEYS[3]) == 1 and 'True' or 'False'
return redis.call('XADD', KEYS[2], '*', 'cached', cached, unpack(ARGV, 3))
"""

# KEYS: the job's reply record, stream. ARGV: the record, its TTL (s), the group, the entry
# id. The record, the XACK and the XDEL happen together (a script is atomic).
_FINISH = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
return redis.call('XDEL', KEYS[2], ARGV[4])
"""

# KEYS: the roll (a sorted set of consumers by when they last checked in, in Redis's clock).
# ARGV: this consumer, how long (ms) a silent consumer still counts. Returns the live ones.
_ROLL_CALL = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


T = TypeVar("T")


async def retry_redis(make_call: Callable[[], Awaitable[T]], role: str) -> T:
    """`await make_call()`, retried with backoff (and logged) while Redis is unreachable."""
    attempt = 0
    while True:
        try:
            return await make_call()
        except (RedisError, OSError) as error:
            attempt += 1
            delay = backoff_delay(attempt)
            log.warning(
                "redis_unavailable",
                role=role,
                attempt=attempt,
                retry_in_s=round(delay, 2),
                error=f"{type(error).__name__}: {error}",
            )
            await asyncio.sleep(delay)


class QueueFullError(Exception):
    """QUEUE_MAX jobs are already waiting in the stream."""


@dataclass(frozen=True)
class Delivery:
    """One job as a consumer received it."""

    entry_id: str
    job: JobRecord | None  # None: the entry could not be parsed (dead-lettered at once)
    deliveries: int  # 1 on first delivery; XAUTOCLAIM adds one each time
    raw: dict[str, str]


class UnreachableError(RuntimeError):
    """Redis did not answer within the start-up wait."""


# Connections per process. A call waits for a free one rather than opening another: with no
# bound the frontend opened one per update in flight (80 more during the benchmark's burst
# of 200 photos), each a connect, a CLIENT SETINFO and redis-py's version look-up
# (importlib.metadata): 9 % of the frontend's CPU then (py-spy).
MAX_CONNECTIONS = 16


def connect_client(url: str) -> aioredis.Redis:
    # Socket timeouts bound every call; XREADGROUP's BLOCK is always shorter than this.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=10,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=15,
    )
    return aioredis.Redis.from_pool(pool)


async def wait_for_redis(client: aioredis.Redis, url: str, wait_s: float) -> None:
    """PING until it answers, for at most `wait_s` seconds; UnreachableError after that."""
    deadline = time.monotonic() + wait_s
    delay = 0.2
    while True:
        try:
            await client.ping()
            return
        except (RedisError, OSError) as error:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnreachableError(
                    f"cannot reach Redis at QUEUE_URL={_safe_url(url)} after {wait_s:g} s "
                    f"({type(error).__name__}: {error}); start it, fix QUEUE_URL, or unset "
                    "QUEUE_URL to run in one process"
                ) from None
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)


def _safe_url(url: str) -> str:
    """The URL without a password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return parts._replace(netloc=f"{parts.username or ''}:***@{host}{port}").geturl()
    return url


class RedisTransport:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = PREFIX,
        claim_idle_ms: int = 15_000,
        max_deliveries: int = 3,
        queue_max: int = 0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.dead_stream = f"{prefix}:jobs:dead"
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.queue_max = queue_max

    @classmethod
    def from_settings(cls, client: aioredis.Redis, settings: Any) -> RedisTransport:
        # Keys per bot: update ids are only unique within one bot, and two bots may share
        # a Redis server.
        bot_id = settings.require_token().split(":", 1)[0]
        return cls(
            client,
            prefix=f"{PREFIX}:{bot_id}",
            claim_idle_ms=settings.job_claim_idle_ms,
            max_deliveries=settings.job_max_deliveries,
            queue_max=settings.queue_max,
        )

    def key(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    # ---- the frontend side -----------------------------------------------------------

    async def enqueue(self, job: JobRecord, writes: Sequence[ScriptCall] = ()) -> str | None:
        """The new entry's id, or None if this update_id was enqueued before.
        Raises QueueFullError when QUEUE_MAX jobs are waiting. `writes` (the photo book's)
        go in the same round trip, first."""
        args: list[Any] = [DEDUPE_TTL_S, self.queue_max]
        for name, value in job.to_fields().items():
            if name != "cached":  # the script sets it
                args += [name, value]
        keys = (
            self.key("update", job.update_id),
            self.stream,
            encoded_key(self.prefix, job.file_unique_id),
        )
        result = await self._run(writes, ScriptCall(_ENQUEUE, keys, tuple(args)))
        if result == 0:
            return None
        if result == -1:
            raise QueueFullError(f"{self.queue_max} jobs waiting")
        return _str(result)

    # ---- the worker side -------------------------------------------------------------

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` new jobs, waiting at most `block_ms` for the first."""
        # redis-py types replies as a union of every RESP type; their shapes are the commands'
        reply: Any = await self.client.xreadgroup(
            GROUP,
            consumer,
            {self.stream: ">"},
            count=count,
            block=block_ms,
        )
        out: list[Delivery] = []
        for _stream, entries in reply or []:
            for entry_id, raw in entries:
                out.append(_delivery(entry_id, raw, 1))
        return out

    async def reclaim(self, consumer: str, count: int) -> list[Delivery]:
        """Jobs idle for `claim_idle_ms` in another (dead) consumer's hands, now this one's."""
        reply = await self.client.xautoclaim(
            self.stream,
            GROUP,
            consumer,
            self.claim_idle_ms,
            start_id="0-0",
            count=count,
        )
        entries = [(entry_id, raw) for entry_id, raw in reply[1] if raw]
        if not entries:
            return []
        counts = await self.delivery_counts(consumer, [_str(e) for e, _ in entries])
        return [
            _delivery(entry_id, raw, counts.get(_str(entry_id), 1)) for entry_id, raw in entries
        ]

    async def delivery_counts(self, consumer: str, entry_ids: list[str]) -> dict[str, int]:
        ordered = sorted(entry_ids, key=_id_key)
        pending: Any = await self.client.xpending_range(
            self.stream,
            GROUP,
            min=ordered[0],
            max=ordered[-1],
            count=len(ordered) * 4 + 100,
            consumername=consumer,
        )
        return {_str(p["message_id"]): int(p["times_delivered"]) for p in pending}

    async def keep(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of the jobs this consumer still holds (not those another
        consumer took over meanwhile), so they are not reclaimed while they run."""
        if not entry_ids:
            return
        mine: Any = await self.client.xpending_range(
            self.stream,
            GROUP,
            min="-",
            max="+",
            count=len(entry_ids) * 4 + 100,
            consumername=consumer,
        )
        held = {_str(p["message_id"]) for p in mine} & set(entry_ids)
        if held:
            # typed list[Any]: xclaim's stub wants a list of every id type, and list is invariant
            ordered: list[Any] = sorted(held, key=_id_key)
            await self.client.xclaim(self.stream, GROUP, consumer, 0, ordered, justid=True)

    async def live_consumers(self, consumer: str) -> set[str]:
        """Marks `consumer` live and returns every consumer marked within `claim_idle_ms`, itself
        included: the workers that checked in lately. (The group's own consumer list will not
        do: Redis 7.0 lists a consumer only once it was handed a job, and keeps a dead one.)"""
        call = ScriptCall(_ROLL_CALL, (self.key("consumers"),), (consumer, self.claim_idle_ms))
        return {_str(name) for name in await self._run((), call)}

    async def answered(self, update_id: int) -> bool:
        return bool(await self.client.exists(self.key("reply", update_id)))

    async def finish(
        self, delivery: Delivery, consumer: str, writes: Sequence[ScriptCall] = ()
    ) -> None:
        """The job is answered: remember that, then ack and delete its entry (atomically).
        `writes` (the photo book's) go in the same round trip, first."""
        assert delivery.job is not None, "a malformed entry is dead-lettered, not finished"
        record = {"deliveries": delivery.deliveries, "by": consumer, "at": round(time.time(), 3)}
        keys = (self.key("reply", delivery.job.update_id), self.stream)
        args = (json.dumps(record), DEDUPE_TTL_S, GROUP, delivery.entry_id)
        await self._run(writes, ScriptCall(_FINISH, keys, args))

    async def _run(self, writes: Sequence[ScriptCall], call: ScriptCall) -> Any:
        """`call`'s result, after `writes` in the same pipeline. A write that failed in Redis
        is logged (those are best effort); `call` failing raises."""
        *written, result = await run_calls(self.client, [*writes, call])
        for error in written:
            if isinstance(error, Exception):
                log.warning("shared_write_failed", error=f"{type(error).__name__}: {error}")
        if isinstance(result, Exception):
            raise result
        return result

    async def dead_letter(self, delivery: Delivery, consumer: str, reason: str) -> None:
        fields: dict[Any, Any] = {
            **delivery.raw,
            "deliveries": str(delivery.deliveries),
            "reason": reason,
            "entry_id": delivery.entry_id,
            "dead_at": str(round(time.time(), 3)),
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, fields, maxlen=10_000, approximate=True)
            if delivery.job is not None:
                record = {"deliveries": delivery.deliveries, "by": consumer, "dead": reason}
                pipe.set(
                    self.key("reply", delivery.job.update_id), json.dumps(record), ex=DEDUPE_TTL_S
                )
            pipe.xack(self.stream, GROUP, delivery.entry_id)
            pipe.xdel(self.stream, delivery.entry_id)
            await pipe.execute()

    async def pending(self) -> int:
        """Jobs delivered to a consumer and not acknowledged yet."""
        summary = await self.client.xpending(self.stream, GROUP)
        return int(summary["pending"])


def _delivery(entry_id: bytes | str, raw: dict[Any, Any], deliveries: int) -> Delivery:
    text = {_str(key): _str(value) for key, value in raw.items()}
    try:
        job: JobRecord | None = JobRecord.from_fields(text)
    except ValueError as error:
        log.error("bad_job_entry", entry_id=_str(entry_id), error=str(error))
        job = None
    return Delivery(_str(entry_id), job, deliveries, text)


def encoded_key(prefix: str, photo_key: str) -> str:
    """The shared encoded-photo cache's Redis key for a photo's file_unique_id."""
    return f"{prefix}:encoded:{photo_key}"


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)

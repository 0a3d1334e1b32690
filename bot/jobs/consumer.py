"""The worker's side of the queue: read jobs in batches, answer each through the same
`CaptionService` the one-process bot uses (getFile, the local InferenceWorker's
micro-batching, the reply), then acknowledge it.

- Up to 3 x BATCH_MAX jobs are in hand at once: the InferenceWorker decodes one batch
  while it encodes the next, and a third downloads meanwhile. (With 2 x, the encoder
  waited for downloads each time a batch left. Throughput with 1 worker against the
  in-process bot, bursts paired on a shared 2-core machine: 12.8 % lost with 2 x, 8.8 %
  with 3 x and the shared cache's writer thread; 4 x did no better than 3 x.) Reads ask
  for at most BATCH_MAX.
- Every JOB_CLAIM_IDLE_MS / 3 it resets the idle time of the jobs it holds (XCLAIM
  JUSTID), and reclaims (XAUTOCLAIM) what a dead consumer held. A job
  delivered more than JOB_MAX_DELIVERIES times is not run again: the user gets an
  apology and the job goes to the dead-letter stream.
- One visible answer: a job is acknowledged together with its reply record, and a
  redelivered job whose record exists is acknowledged without answering again.
- A worker that no other worker checked in beside for JOB_CLAIM_IDLE_MS keeps its encoded
  photos to itself: nobody would read them from Redis (`_watch_peers`).
- Redis trouble: every call is retried with backoff and logged; the loop never exits
  for it. A Redis that came back empty gets the consumer group made again. On stop it
  finishes what it holds within the timeout and releases the rest (marked idle, so another
  worker reclaims it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis.exceptions import RedisError, ResponseError

from bot import texts
from bot.jobs.record import JobRecord
from bot.jobs.shared import (
    RedisEncodedCache,
    known_in_redis,
    photo_writes_deferred,
    take_photo_writes,
)
from bot.jobs.transport import GROUP, Delivery, RedisTransport, retry_redis
from bot.log import get_logger
from bot.retry import backoff_delay
from bot.service import CaptionService
from bot.settings import Settings

log = get_logger("bot.jobs")

# Test hook (the crash test): a worker started with this set holds the first batch it
# reads, logging `test_holding_batch`, until it is killed.
HOLD_BATCH_ENV = "CAPTIONBOT_TEST_HOLD_BATCH"
IDLE_BLOCK_MS = 1000  # how long a read waits for a new job at most

T = TypeVar("T")


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class JobConsumer:
    def __init__(
        self,
        transport: RedisTransport,
        service: CaptionService,
        settings: Settings,
        name: str | None = None,
        cache: RedisEncodedCache | None = None,
    ) -> None:
        self.transport = transport
        self.service = service
        self.name = name or consumer_name()
        self.cache = cache  # the worker's encoded photos, shared while other workers live
        self.batch_max = settings.batch_max
        self.capacity = 3 * settings.batch_max
        # Jobs in hand are re-claimed (their idle time reset) three times per idle period,
        # so no live worker's job looks dead; dead workers' jobs are looked for twice.
        self.claim_every_s = max(0.1, transport.claim_idle_ms / 3000)
        self.read_block_ms = max(1, min(IDLE_BLOCK_MS, int(self.claim_every_s * 1000)))
        self.shutdown_timeout_s = settings.shutdown_timeout_s
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._hold = bool(os.environ.get(HOLD_BATCH_ENV))
        self._failures = 0
        self.jobs_done = 0
        self.last_contact = time.monotonic()

    @property
    def in_hand(self) -> int:
        return len(self._tasks)

    # ---- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain."""
        log.info("consumer_started", consumer=self.name, capacity=self.capacity)
        next_keep = next_reclaim = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_keep:
                    next_keep = time.monotonic() + self.claim_every_s
                    await self.transport.keep(self.name, [d.entry_id for d in self._tasks.values()])
                    await self._watch_peers()  # here, since a worker at capacity reclaims nothing
                if self.in_hand >= self.capacity:
                    await asyncio.wait(
                        list(self._tasks),
                        timeout=self.claim_every_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    continue
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self.claim_every_s
                    self._take(await self.transport.reclaim(self.name, self._room()))
                    if self.in_hand >= self.capacity:
                        continue
                # A new job ends the wait at once, so a long one costs no latency; it
                # only bounds how late the next keep/reclaim runs. (Short waits while jobs
                # were in hand polled Redis 100 times a second beside the model.)
                batch = await self.transport.read(self.name, self._room(), self.read_block_ms)
                self._contact()
                if batch and self._hold:
                    await self._hold_for_test(batch)
                self._take(batch)
            except ResponseError as error:
                if "NOGROUP" not in str(error):
                    await self._lost_redis(error, stop)
                    continue
                # Redis lost its data (restarted without persistence, or the stream was
                # deleted): the group is made again, and reads from the stream's start.
                log.warning("consumer_group_missing", stream=self.transport.stream)
                try:
                    await self.transport.ensure_group()
                except (RedisError, OSError) as lost:
                    await self._lost_redis(lost, stop)
            except (RedisError, OSError) as error:
                await self._lost_redis(error, stop)
        await self._drain()

    async def _watch_peers(self) -> None:
        """Share the encoded photos through Redis while another worker has checked in within
        JOB_CLAIM_IDLE_MS; one that joins is seen within a third of that, and a photo encoded
        before it is downloaded again if it is asked about. Alone, each photo's write (its grid
        and bytes, about 250 KB, and the eviction script) only cost CPU on the cores the model
        runs on: paired bursts of a frontend + 1 worker against the one-process bot lost 3.5 %
        of its photos/s without the writes, 6.2 % with them."""
        if self.cache is None:
            return
        shared = bool(await self.transport.live_consumers(self.name) - {self.name})
        if self.cache.shared != shared:
            self.cache.shared = shared
            log.info("shared_cache_writes", on=shared, consumer=self.name)

    def _room(self) -> int:
        return max(1, min(self.batch_max, self.capacity - self.in_hand))

    def _take(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            task = asyncio.create_task(self._handle(delivery))
            self._tasks[task] = delivery
            task.add_done_callback(self._tasks.pop)

    def _contact(self) -> None:
        if self._failures:
            log.info("redis_back", role="worker", after_attempts=self._failures)
        self._failures = 0
        self.last_contact = time.monotonic()

    async def _lost_redis(self, error: BaseException, stop: asyncio.Event) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures)
        log.warning(
            "redis_unavailable",
            role="worker",
            attempt=self._failures,
            retry_in_s=round(delay, 2),
            error=f"{type(error).__name__}: {error}",
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    # ---- one job ---------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        job = delivery.job
        if job is None:
            await self._retrying(
                lambda: self.transport.dead_letter(delivery, self.name, "malformed")
            )
            return
        with structlog.contextvars.bound_contextvars(
            update_id=job.update_id,
            chat_id=job.chat_id,
            user_id=job.user_id,
            message_id=job.message_id,
        ):
            if delivery.deliveries > self.transport.max_deliveries:
                await self._give_up(delivery, job)
                return
            # The photo book's writes (the reply's link to its photo) go with the finish.
            book = getattr(self.service, "photos", None)
            async with photo_writes_deferred(book):
                if delivery.deliveries > 1 and await self._retrying(
                    lambda: self.transport.answered(job.update_id)
                ):
                    log.info("job_already_answered", deliveries=delivery.deliveries)
                else:
                    try:
                        with known_in_redis(job.file_unique_id, job.cached):
                            await self._perform(job)
                    except Exception:  # a bug or an outage: leave it pending, it is retried
                        log.exception("job_error", kind=job.kind, deliveries=delivery.deliveries)
                        return
                writes = take_photo_writes(book)
                await self._retrying(lambda: self.transport.finish(delivery, self.name, writes))
            self.jobs_done += 1
            log.info(
                "job_done",
                kind=job.kind,
                deliveries=delivery.deliveries,
                consumer=self.name,
                entry_id=delivery.entry_id,
                total_ms=round((time.time() - job.enqueued_at) * 1000, 1),
            )

    async def _perform(self, job: JobRecord) -> None:
        service = self.service
        if job.kind == "caption":
            await service.caption(job.chat_id, job.message_id, job.photo, anyway=job.anyway)
        elif job.kind == "samples":
            await service.samples(job.chat_id, job.message_id, job.photo, job.n, job.temperature)
        else:
            await service.attention(job.chat_id, job.message_id, job.photo)

    async def _give_up(self, delivery: Delivery, job: JobRecord) -> None:
        log.error("job_dead_lettered", kind=job.kind, deliveries=delivery.deliveries)
        if not await self._retrying(lambda: self.transport.answered(job.update_id)):
            await self.service.tell(job.chat_id, job.message_id, texts.JOB_GAVE_UP)
        await self._retrying(
            lambda: self.transport.dead_letter(delivery, self.name, "max_deliveries")
        )

    async def _retrying(self, make_call: Callable[[], Awaitable[T]]) -> T:
        return await retry_redis(make_call, role="worker")

    # ---- stopping --------------------------------------------------------------------

    async def _drain(self) -> None:
        """Finish the jobs in hand within the shutdown timeout; release the rest."""
        entries = {task: delivery.entry_id for task, delivery in self._tasks.items()}
        tasks = list(entries)
        if not tasks:
            log.info("consumer_stopped", consumer=self.name, finished=0, released=0)
            return
        done, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # typed list[Any]: xclaim's stub wants a list of every id type, and list is invariant
        released: list[Any] = [entries[task] for task in pending]
        if released:
            try:  # idle as long as a dead consumer's jobs: the next reclaim takes them
                await self.transport.client.xclaim(
                    self.transport.stream,
                    GROUP,
                    self.name,
                    0,
                    released,
                    idle=self.transport.claim_idle_ms,
                    justid=True,
                )
            except (RedisError, OSError) as error:
                log.warning("release_failed", error=f"{type(error).__name__}: {error}")
        log.info("consumer_stopped", consumer=self.name, finished=len(done), released=len(released))

    async def _hold_for_test(self, batch: list[Delivery]) -> None:
        self._hold = False
        log.warning(
            "test_holding_batch",
            consumer=self.name,
            entry_ids=[d.entry_id for d in batch],
            update_ids=[d.job.update_id for d in batch if d.job is not None],
        )
        await asyncio.Event().wait()  # until SIGKILL

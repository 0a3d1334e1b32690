"""`python -m bot --role all|frontend|worker` with QUEUE_URL set.

- frontend: the dispatcher (polling or webhook); photos and commands become jobs.
- worker: no dispatcher; loads the model, consumes jobs, answers them itself.
- all: both in one process, through Redis (one model).
Every role keeps the photo book (which photo a message means) in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

from bot.app import BotApp, build_bot, start_worker
from bot.health import heartbeat
from bot.jobs.consumer import JobConsumer
from bot.jobs.frontend import EnqueueingService, UpdateGate
from bot.jobs.shared import (
    RedisEncodedCache,
    SharedAllowlist,
    SharedPhotoBook,
    SharedRateLimit,
    shared_cache,
)
from bot.jobs.transport import RedisTransport, UnreachableError, connect_client, wait_for_redis
from bot.log import get_logger
from bot.middlewares import AllowlistMiddleware, RateLimitMiddleware
from bot.service import CaptionService
from bot.settings import Settings, SettingsError
from bot.worker import InferenceWorker, StartupError

log = get_logger("bot")

ROLES = ("all", "frontend", "worker")


async def connect(settings: Settings) -> RedisTransport:
    """The transport, once Redis answers; StartupError (one line) after the bounded wait."""
    assert settings.queue_url is not None
    client = connect_client(settings.queue_url)
    try:
        await wait_for_redis(client, settings.queue_url, settings.redis_connect_timeout_s)
    except UnreachableError as error:
        await client.aclose()
        raise StartupError(str(error)) from None
    transport = RedisTransport.from_settings(client, settings)
    await transport.ensure_group()
    return transport


async def run_role(settings: Settings, role: str, worker: InferenceWorker | None = None) -> None:
    if settings.queue_url is None:
        raise SettingsError(
            [
                f"--role {role}: needs QUEUE_URL (redis://host:port/db); without "
                "it the bot runs as one process (--role all)"
            ]
        )
    transport = await connect(settings)
    try:
        if role == "worker":
            await run_worker(settings, transport, worker)
            return
        if role == "all" and worker is None:
            worker = await InferenceWorker.load(settings)
        if worker is not None:
            share_cache(worker, settings, transport)
        app = QueuedBotApp(settings, transport, worker if role == "all" else None)
        if settings.mode == "webhook":
            await app.run_webhook()
        else:
            await app.run_polling()
    finally:
        await transport.client.aclose()


class QueuedBotApp(BotApp):
    """A frontend; with a worker (role all) it also consumes the jobs it enqueues."""

    handle_in_background = False  # webhook: 200 only once the job is in the stream

    def __init__(
        self, settings: Settings, transport: RedisTransport, worker: InferenceWorker | None
    ) -> None:
        self.transport = transport
        self.photos = shared_photos(transport)
        super().__init__(settings, worker)
        self.gate = UpdateGate(self.photos)
        self.bot.session.middleware(self.gate.request_middleware)
        self.dispatcher.update.outer_middleware(self.gate.update_middleware)
        self.consumer: JobConsumer | None = None
        if worker is not None:
            self.consumer = JobConsumer(
                transport,
                CaptionService(self.bot, worker, self.photos, settings),
                settings,
                cache=redis_cache(worker),
            )
        self._stop_consuming = asyncio.Event()
        self._consuming: asyncio.Task[None] | None = None

    def _make_service(self) -> CaptionService:
        return EnqueueingService(self.bot, self.photos, self.settings, self.transport)

    def _limit_middlewares(self) -> tuple[AllowlistMiddleware, RateLimitMiddleware]:
        settings, client, prefix = self.settings, self.transport.client, self.transport.prefix
        return (
            SharedAllowlist(settings.allowed_user_ids, settings.allowlist_ignore_s, client, prefix),
            SharedRateLimit(settings.rate_limit_per_min, client, prefix),
        )

    def _alive(self) -> bool:
        if self._consuming is not None and self._consuming.done():
            return False
        return super()._alive()

    async def _started(self) -> None:
        if self.consumer is not None:
            self._consuming = asyncio.create_task(self.consumer.run(self._stop_consuming))

    async def _draining(self, deadline: float) -> None:
        if self._consuming is not None:
            self._stop_consuming.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(self._consuming), max(1.0, deadline - time.monotonic())
                )


def shared_photos(transport: RedisTransport) -> SharedPhotoBook:
    """The photo book every frontend and worker of this bot shares through Redis."""
    return SharedPhotoBook(transport.client, transport.prefix)


def share_cache(worker: InferenceWorker, settings: Settings, transport: RedisTransport) -> None:
    """The worker's encoded-photo cache, shared with every other worker through Redis."""
    worker.cache = shared_cache(settings, transport.prefix)


def redis_cache(worker: InferenceWorker) -> RedisEncodedCache | None:
    """The worker's cache if `share_cache` made it the Redis one (its consumer switches its
    writes off while no other worker lives)."""
    return worker.cache if isinstance(worker.cache, RedisEncodedCache) else None


async def run_worker(
    settings: Settings, transport: RedisTransport, worker: InferenceWorker | None = None
) -> None:
    if worker is None:
        worker = await InferenceWorker.load(settings)
    share_cache(worker, settings, transport)
    bot = build_bot(settings)
    consumer = JobConsumer(
        transport,
        CaptionService(bot, worker, shared_photos(transport), settings),
        settings,
        cache=redis_cache(worker),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    beat: asyncio.Task[None] | None = None
    consuming: asyncio.Task[None] | None = None
    try:
        await start_worker(worker)
        consuming = asyncio.create_task(consumer.run(stop))
        if settings.health_file is not None:
            beat = asyncio.create_task(
                heartbeat(settings.health_file, lambda: worker.running and not consuming.done())
            )
        log.info(
            "worker_started",
            consumer=consumer.name,
            batch_max=settings.batch_max,
            claim_idle_ms=transport.claim_idle_ms,
            max_deliveries=transport.max_deliveries,
        )
        await consuming
        log.info("signal_received")
    finally:
        stop.set()
        if consuming is not None and not consuming.done():
            await consuming
        await worker.stop(timeout=5.0)
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            with contextlib.suppress(OSError):
                settings.health_file.unlink()  # type: ignore[union-attr]
        await bot.session.close()
        log.info("stopped", jobs_done=consumer.jobs_done)

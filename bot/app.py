"""Wiring: the worker (which owns the model), the Bot and the Dispatcher, and how they start and
stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from typing import Any

from aiogram import Bot, Dispatcher
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramAPIError
from aiogram.types import BotCommand
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from bot import texts
from bot.handlers import routers
from bot.health import heartbeat
from bot.journal import Journal, JournalError, bot_id_of
from bot.journaling import JournaledRequestHandler, Journaling
from bot.log import get_logger
from bot.middlewares import (
    AllowlistMiddleware,
    ChatActionMiddleware,
    RateLimitMiddleware,
    UpdateContextMiddleware,
    keep_response_types,
)
from bot.photos import PhotoBook
from bot.retry import RetryMiddleware
from bot.service import CaptionService
from bot.settings import Settings
from bot.worker import InferenceWorker, StartupError

log = get_logger("bot")

# After the shutdown deadline, jobs that didn't run are failed; give their handlers
# this long to tell the users to resend before the HTTP session closes.
LAST_WORDS_S = 5.0


def build_bot(settings: Settings, retry: RetryMiddleware | None = None) -> Bot:
    token = settings.require_token()
    if settings.telegram_api_base:
        session = AiohttpSession(api=TelegramAPIServer.from_base(settings.telegram_api_base))
    else:
        session = AiohttpSession()
    session.middleware(keep_response_types)
    session.middleware(ChatActionMiddleware())
    session.middleware(retry or RetryMiddleware(budget_s=settings.send_retry_timeout_s))
    return Bot(token=token, session=session)


async def start_worker(worker: InferenceWorker) -> None:
    """Warm the model up, then start the worker; StartupError if the warm-up fails."""
    from PIL import Image

    try:
        seconds = await worker.warm_up(Image.new("RGB", (224, 224), (128, 128, 128)))
    except Exception as error:
        # A model that fails here would fail every photo: better not to start at all.
        raise StartupError(
            f"the captioning model failed its warm-up run: {type(error).__name__}: {error}"
        ) from error
    log.info("model_warmed_up", seconds=round(seconds, 2))
    freeze_heap()
    share_the_gil_sooner()
    await worker.start()


def freeze_heap() -> None:
    """What is loaded by now (modules, the model, its runtime) lives as long as the process:
    moved out of the garbage collector's generations, it is no longer scanned by every full
    collection (in the bot benchmark each took ~0.1-0.3 s of the event loop's time)."""
    gc.collect()
    gc.freeze()


# The worker's threads (encoding, decoding) hand the GIL back and forth with the event loop:
# each return from ONNX Runtime or a numba kernel takes the GIL again, and while the event loop
# runs Python a waiting thread got it only after CPython's switch interval, 5 ms (an encoder
# thread waited 1.9-2.4 ms per image in the bot benchmark's bursts, /proc schedstat). At 0.5 ms
# the bursts gave 3.3 % more photos/s against the previous code (paired median of 16 rounds),
# 4.2 % against 5 ms (12 rounds); 0.2 ms gave 2.9 %.
GIL_SWITCH_INTERVAL_S = 0.0005


def share_the_gil_sooner() -> None:
    """A thread waiting for the GIL gets it within GIL_SWITCH_INTERVAL_S."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


class BotApp:
    """The dispatcher and its service; `worker` is None in a frontend (QUEUE_URL), whose
    service enqueues jobs instead (bot/jobs/roles.py)."""

    # Webhook: the in-process bot answers 200 at once; a frontend only after the enqueue.
    handle_in_background = True

    def __init__(
        self,
        settings: Settings,
        worker: InferenceWorker | None,
        journaling: Journaling | None = None,
    ) -> None:
        self.settings = settings
        self.retry = RetryMiddleware(budget_s=settings.send_retry_timeout_s)
        self.bot = build_bot(settings, self.retry)
        self.journaling = journaling  # the one-process bot's journal (bot/journaling.py)
        if journaling is not None:
            self.bot.session.middleware(journaling.request_middleware)
        self.worker = worker
        self.service = self._make_service()
        self.updates = UpdateContextMiddleware()
        self.dispatcher = self._build_dispatcher()
        self._heartbeat: asyncio.Task[None] | None = None

    def _make_service(self) -> CaptionService:
        return CaptionService(
            self.bot,
            self.worker,  # type: ignore[arg-type]
            PhotoBook(),
            self.settings,
            journaled=self.journaling is not None,
        )

    def _alive(self) -> bool:
        return self.worker is None or self.worker.running

    async def _started(self) -> None:
        """Hook: after the worker started, before the first update."""

    async def _draining(self, deadline: float) -> None:
        """Hook: no updates are in flight any more (or the wait timed out)."""

    def _limit_middlewares(self) -> tuple[AllowlistMiddleware, RateLimitMiddleware]:
        return (
            AllowlistMiddleware(self.settings.allowed_user_ids, self.settings.allowlist_ignore_s),
            RateLimitMiddleware(self.settings.rate_limit_per_min),
        )

    def _build_dispatcher(self) -> Dispatcher:
        dp = Dispatcher()
        dp["service"] = self.service
        dp.update.outer_middleware(self.updates)
        if self.journaling is not None:
            dp.update.outer_middleware(self.journaling.update_middleware)
        allowlist, rate_limit = self._limit_middlewares()
        for observer in (dp.message, dp.callback_query):
            observer.outer_middleware(allowlist)
            observer.middleware(rate_limit)
        dp.include_routers(*routers())
        dp.startup.register(self._on_startup)
        dp.shutdown.register(self._on_shutdown)
        return dp

    async def _on_startup(self) -> None:
        if self.worker is not None:
            await start_worker(self.worker)
        else:
            # A frontend (QUEUE_URL): aiogram's, pydantic's and redis-py's objects. Its CPU
            # per photo in the sustained Redis benchmark fell from 1.48 to 0.95 ms.
            freeze_heap()
        await self._started()
        if self.journaling is not None:
            self.journaling.replay(self.dispatcher, self.bot, self.service.tell)
        if self.settings.health_file is not None:
            self._heartbeat = asyncio.create_task(heartbeat(self.settings.health_file, self._alive))
        try:
            await self.bot.set_my_commands(
                [
                    BotCommand(command=name, description=about)
                    for name, about in texts.COMMANDS.items()
                ]
            )
        except TelegramAPIError as error:  # the menu is a nicety; the bot works without it
            log.error("set_my_commands_failed", error=f"{type(error).__name__}: {error}")
        log.info(
            "bot_started",
            mode=self.settings.mode,
            batch_max=self.settings.batch_max,
            queue_max=self.settings.queue_max,
        )

    async def _on_shutdown(self) -> None:
        """No new updates arrive any more: finish what was accepted, then stop."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self.retry.finish_by(deadline)  # a reply retried during an outage must not outlast it
        log.info(
            "shutting_down",
            updates_in_flight=self.updates.in_flight,
            jobs_queued=self.worker.queued if self.worker else 0,
        )
        finished = await self.updates.wait_idle(self.settings.shutdown_timeout_s)
        await self._draining(deadline)
        if self.worker is not None:
            await self.worker.stop(timeout=max(0.0, deadline - time.monotonic()))
        if not finished:
            await self.updates.wait_idle(LAST_WORDS_S)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            with contextlib.suppress(OSError):
                self.settings.health_file.unlink()  # type: ignore[union-attr]
        if self.journaling is not None:
            self.journaling.close()
        log.info(
            "stopped",
            jobs_done=self.worker.jobs_done if self.worker else 0,
            batches=self.worker.batches_run if self.worker else 0,
        )

    # ---- run modes -------------------------------------------------------------------

    async def run_polling(self) -> None:
        # aiogram stops polling on SIGTERM/SIGINT, then runs _on_shutdown with the
        # session still open, then closes it.
        await self.dispatcher.start_polling(self.bot, handle_signals=True, close_bot_session=True)

    async def run_webhook(self) -> None:
        settings = self.settings
        app = web.Application()
        handler: dict[str, Any] = dict(
            dispatcher=self.dispatcher,
            bot=self.bot,
            secret_token=settings.webhook_secret_value,
            handle_in_background=self.handle_in_background,
        )
        if self.journaling is not None:
            JournaledRequestHandler(self.journaling, **handler).register(app, settings.webhook_path)
        else:
            SimpleRequestHandler(**handler).register(app, path=settings.webhook_path)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.webhook_host, settings.webhook_port)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.dispatcher.emit_startup(bot=self.bot)
            await site.start()
            assert settings.webhook_url is not None  # the settings require it in webhook mode
            await self.bot.set_webhook(
                settings.webhook_url,
                secret_token=settings.webhook_secret_value,
                allowed_updates=self.dispatcher.resolve_used_update_types(),
            )
            log.info(
                "webhook_listening",
                host=settings.webhook_host,
                port=settings.webhook_port,
                path=settings.webhook_path,
            )
            await stop.wait()
            log.info("signal_received")
        finally:
            await site.stop()  # stop taking updates first
            try:
                await self.dispatcher.emit_shutdown(bot=self.bot)
            finally:
                await runner.cleanup()
                await self.bot.session.close()

    async def _healthz(self, _request: web.Request) -> web.Response:
        ok = self._alive()
        queued = self.worker.queued if self.worker else 0
        return web.json_response({"ok": ok, "queued": queued}, status=200 if ok else 503)


async def run(settings: Settings, worker: InferenceWorker | None = None, role: str = "all") -> None:
    if settings.queue_url is not None or role != "all":
        from bot.jobs.roles import run_role

        await run_role(settings, role, worker)
        return
    journaling = open_journaling(settings)  # before the model loads: a bad place fails at once
    if worker is None:
        worker = await InferenceWorker.load(settings)
    app = BotApp(settings, worker, journaling)
    if settings.mode == "webhook":
        await app.run_webhook()
    else:
        await app.run_polling()


def open_journaling(settings: Settings) -> Journaling | None:
    """The one-process bot's journal at JOURNAL_FILE (None when off); StartupError, one line,
    when it cannot be kept there."""
    if settings.journal_file is None:
        return None
    try:
        journal = Journal.open(settings.journal_file, bot_id_of(settings.require_token()))
    except JournalError as error:
        raise StartupError(str(error)) from None
    log.info("journal_opened", path=str(settings.journal_file), pending=journal.pending_count())
    return Journaling(journal, settings.job_max_deliveries)

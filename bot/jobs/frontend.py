"""The frontend's side of the queue: handlers stay as they are, but the service they call
puts a job in the stream instead of running the model, and no update is confirmed to
Telegram before its job is in the stream.

- `EnqueueingService` is the `CaptionService` a frontend's handlers get: `caption`,
  `samples` and `attention` enqueue a `JobRecord` keyed by the update's id; everything
  else (help, usage, refusals) it answers itself, as before.
- `UpdateGate` holds polling back: getUpdates confirms every update before its `offset`,
  so the next getUpdates waits until each update the previous one returned was handled
  (its job enqueued). In webhook mode the 200 waits for the handler instead
  (`handle_in_background=False`).
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any

from aiogram import BaseMiddleware, Bot
from aiogram.types import TelegramObject, Update, User

from bot import texts
from bot.jobs.record import JobRecord
from bot.jobs.shared import photo_writes_deferred, take_photo_writes
from bot.jobs.transport import QueueFullError, RedisTransport, retry_redis
from bot.log import get_logger
from bot.middlewares import GetUpdatesMiddleware
from bot.photos import PhotoBook, PhotoRef
from bot.service import CaptionService
from bot.settings import Settings

log = get_logger("bot.jobs")


# (update_id, user_id) of the update being handled, set by UpdateGate's update middleware.
_current_update: ContextVar[tuple[int, int] | None] = ContextVar("current_update", default=None)


class EnqueueingService(CaptionService):
    def __init__(
        self, bot: Bot, photos: PhotoBook, settings: Settings, transport: RedisTransport
    ) -> None:
        super().__init__(bot, None, photos, settings)  # type: ignore[arg-type]  # no model here
        self.transport = transport

    async def caption(
        self, chat_id: int, reply_to: int, photo: PhotoRef, *, anyway: bool = False
    ) -> None:
        await self._enqueue("caption", chat_id, reply_to, photo, anyway=anyway)

    async def samples(
        self, chat_id: int, reply_to: int, photo: PhotoRef, n: int, temperature: float
    ) -> None:
        await self._enqueue("samples", chat_id, reply_to, photo, n=n, temperature=temperature)

    async def attention(self, chat_id: int, reply_to: int, photo: PhotoRef) -> None:
        await self._enqueue("attention", chat_id, reply_to, photo)

    async def _enqueue(
        self, kind: str, chat_id: int, reply_to: int, photo: PhotoRef, **args: Any
    ) -> None:
        current = _current_update.get()
        if current is None:
            raise RuntimeError("a job can only be enqueued while an update is handled")
        update_id, user_id = current
        job = JobRecord(
            update_id=update_id,
            chat_id=chat_id,
            user_id=user_id,
            message_id=reply_to,
            kind=kind,
            file_id=photo.file_id,
            file_unique_id=photo.key,
            file_size=photo.file_size,
            **args,
        )
        # The photo book's writes for this update go in the same round trip.
        writes = take_photo_writes(self.photos)
        try:  # retried until it is in the stream: the update must not be confirmed before
            entry_id = await retry_redis(
                lambda: self.transport.enqueue(job, writes), role="frontend"
            )
        except QueueFullError:
            log.warning("queue_full")
            await self.tell(chat_id, reply_to, texts.QUEUE_FULL)
            return
        log.info("job_enqueued" if entry_id else "job_duplicate", kind=kind, entry_id=entry_id)


class UpdateGate:
    """Counts the updates each getUpdates returned until their handlers finish; the next
    getUpdates (which confirms them) waits for that. While an update is handled, the photo
    book's writes wait to go out with its job (or at its end)."""

    def __init__(self, photos: PhotoBook | None = None) -> None:
        self._outstanding: set[int] = set()
        self._changed = asyncio.Event()
        self.photos = photos
        self.request_middleware = _HoldGetUpdates(self)
        self.update_middleware = _TrackUpdate(self)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    async def wait_handled(self) -> None:
        while self._outstanding:
            self._changed.clear()
            await self._changed.wait()

    def received(self, updates: list[Update]) -> None:
        self._outstanding.update(update.update_id for update in updates)

    def handled(self, update_id: int) -> None:
        self._outstanding.discard(update_id)
        self._changed.set()


class _HoldGetUpdates(GetUpdatesMiddleware):
    def __init__(self, gate: UpdateGate) -> None:
        super().__init__()
        self.gate = gate

    async def before(self) -> None:
        await self.gate.wait_handled()

    def received(self, updates: list[Update]) -> None:
        self.gate.received(updates)


class _TrackUpdate(BaseMiddleware):
    def __init__(self, gate: UpdateGate) -> None:
        self.gate = gate

    async def __call__(self, handler: Any, event: TelegramObject, data: dict[str, Any]) -> Any:
        assert isinstance(event, Update)
        user: User | None = data.get("event_from_user")
        token = _current_update.set((event.update_id, user.id if user else 0))
        try:
            async with photo_writes_deferred(self.gate.photos):
                return await handler(event, data)
        finally:
            _current_update.reset(token)
            self.gate.handled(event.update_id)

"""What handlers do once they know which photo is meant: fetch it if needed, submit
the job to the worker, and reply (or explain, specifically, what went wrong).

Handlers get one `CaptionService` through aiogram's dependency injection
(`dispatcher["service"]`), so they stay a few lines each.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiogram import Bot
from aiogram.enums import ChatAction
from aiogram.exceptions import TelegramAPIError, TelegramBadRequest
from aiogram.types import BufferedInputFile, InlineKeyboardMarkup, Message, ReplyParameters
from aiogram.utils.chat_action import ChatActionSender

from bot import texts
from bot.journaling import LeftForNextStart
from bot.log import get_logger
from bot.photos import DownloadFailed, PhotoBook, PhotoRef, TooLarge, download
from bot.settings import Settings
from bot.worker import (
    BadImage,
    InferenceFailed,
    InferenceWorker,
    NotCached,
    PhotoInput,
    QueueFull,
    WorkerStopped,
)

log = get_logger("bot.service")

T = TypeVar("T")


class CaptionService:
    def __init__(
        self,
        bot: Bot,
        worker: InferenceWorker,
        photos: PhotoBook,
        settings: Settings,
        *,
        journaled: bool = False,
    ) -> None:
        """`journaled`: the update being handled is in the journal (bot/journaling.py), so a
        job the stopping worker dropped is left for the next start rather than refused."""
        self.bot = bot
        self.worker = worker
        self.photos = photos
        self.settings = settings
        self.journaled = journaled

    # ---- the three things the bot does ---------------------------------------------

    async def caption(
        self, chat_id: int, reply_to: int, photo: PhotoRef, *, anyway: bool = False
    ) -> None:
        """The photo's captions; for a photo outside the decoders' domain, what the encoder
        sees instead, unless `anyway` (the "Caption anyway" button)."""
        async with self._action(chat_id, ChatAction.TYPING):
            result = await self._run(
                chat_id,
                reply_to,
                photo,
                lambda source: self.worker.caption(
                    source,
                    n_samples=self.settings.default_samples,
                    anyway=anyway,
                    chat_id=chat_id,
                    message_id=reply_to,
                ),
            )
        if result is None:
            return
        text, keyboard = texts.photo_reply(result, photo.key)
        await self._send_text(chat_id, reply_to, text, photo, keyboard)

    async def samples(
        self, chat_id: int, reply_to: int, photo: PhotoRef, n: int, temperature: float
    ) -> None:
        async with self._action(chat_id, ChatAction.TYPING):
            result = await self._run(
                chat_id,
                reply_to,
                photo,
                lambda source: self.worker.samples(
                    source,
                    n=n,
                    temperature=temperature,
                    chat_id=chat_id,
                    message_id=reply_to,
                ),
            )
        if result is None:
            return
        text = texts.samples_reply(result.samples, temperature, outside=result.out_of_domain)
        await self._send_text(chat_id, reply_to, text, photo)

    async def attention(self, chat_id: int, reply_to: int, photo: PhotoRef) -> None:
        async with self._action(chat_id, ChatAction.UPLOAD_PHOTO):
            result = await self._run(
                chat_id,
                reply_to,
                photo,
                lambda source: self.worker.attention(
                    source,
                    chat_id=chat_id,
                    message_id=reply_to,
                ),
            )
            if result is None:
                return
            figure = BufferedInputFile(result.figure, filename="attention.jpg")
            reply = self._reply_to(reply_to)
            caption = texts.attention_caption(result)
            try:
                sent: Message | None = await self.bot.send_photo(
                    chat_id,
                    figure,
                    caption=caption,
                    reply_parameters=reply,
                )
            except TelegramBadRequest as error:
                # Telegram rejects photos whose sides are very unequal (a long caption makes
                # a wide strip); the same JPEG as a file always goes through.
                log.warning("attention_as_document", error=str(error))
                sent = await self._deliver(
                    self.bot.send_document(
                        chat_id,
                        figure,
                        caption=caption,
                        reply_parameters=reply,
                    )
                )
            except TelegramAPIError as error:
                log.error("reply_not_sent", error=f"{type(error).__name__}: {error}")
                return
        if sent is not None:
            await self.photos.link_reply(chat_id, sent.message_id, photo)

    async def tell(self, chat_id: int, reply_to: int | None, text: str) -> None:
        await self._deliver(
            self.bot.send_message(chat_id, text, reply_parameters=self._reply_to(reply_to))
        )

    # ---- plumbing --------------------------------------------------------------------

    def _action(self, chat_id: int, action: ChatAction) -> ChatActionSender:
        """ "typing..." while a reply is prepared, from CHAT_ACTION_DELAY_MS on: a faster reply
        arrives before anyone would see it, and each action is one more Bot API call (in the bot
        benchmark, one of four per photo)."""
        return ChatActionSender(
            bot=self.bot,
            chat_id=chat_id,
            action=action,
            initial_sleep=self.settings.chat_action_delay_ms / 1000,
        )

    @staticmethod
    def _reply_to(message_id: int | None) -> ReplyParameters | None:
        if message_id is None:
            return None
        # If the user deleted their message meanwhile, still deliver the answer.
        return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)

    async def _run(
        self,
        chat_id: int,
        reply_to: int,
        photo: PhotoRef,
        job: Callable[[PhotoInput], Awaitable[T]],
    ) -> T | None:
        """Run `job` on the photo (cached encoding if any, else downloaded bytes).

        Every failure becomes a specific reply; returns None after such a reply.
        """
        try:
            if await self.worker.is_cached(photo.key):
                try:
                    return await job(PhotoInput(photo.key))
                except NotCached:  # evicted between the check and the job
                    pass
            data = await download(
                self.bot,
                photo,
                max_bytes=self.settings.max_image_bytes,
                retry_budget_s=self.settings.send_retry_timeout_s,
            )
            return await job(PhotoInput(photo.key, data))
        except TooLarge as error:
            reason = texts.too_large(error.size, error.limit)
        except TelegramBadRequest as error:
            # getFile answers 400 "file is too big" for files over the download limit.
            if "too big" in str(error).lower():
                reason = texts.too_large(photo.file_size, self.settings.max_image_bytes)
            else:
                log.warning("get_file_failed", error=str(error))
                reason = texts.DOWNLOAD_FAILED
        except (DownloadFailed, TelegramAPIError) as error:
            log.warning("download_failed", error=f"{type(error).__name__}: {error}")
            reason = texts.DOWNLOAD_FAILED
        except BadImage as error:
            reason = texts.bad_image(str(error))
        except QueueFull:
            log.warning("queue_full")
            reason = texts.QUEUE_FULL
        except WorkerStopped:
            if self.journaled:
                raise LeftForNextStart from None
            reason = texts.RESTARTING
        except InferenceFailed:
            reason = texts.INFERENCE_FAILED
        await self.tell(chat_id, reply_to, reason)
        return None

    async def _send_text(
        self,
        chat_id: int,
        reply_to: int,
        text: str,
        photo: PhotoRef,
        keyboard: InlineKeyboardMarkup | None = None,
    ) -> None:
        sent = await self._deliver(
            self.bot.send_message(
                chat_id,
                text,
                reply_parameters=self._reply_to(reply_to),
                reply_markup=keyboard,
            )
        )
        if sent is not None:
            await self.photos.link_reply(chat_id, sent.message_id, photo)

    @staticmethod
    async def _deliver(call: Awaitable[Message]) -> Message | None:
        """Send; the retry middleware already retried, so a failure here is final."""
        try:
            return await call
        except TelegramAPIError as error:
            log.error("reply_not_sent", error=f"{type(error).__name__}: {error}")
            return None


def parse_sample_args(args: str | None, max_samples: int) -> tuple[int, float] | None:
    """`/sample N [T]` arguments, or None if they are missing or out of range."""
    parts = (args or "").split()
    if not 1 <= len(parts) <= 2:
        return None
    try:
        n = int(parts[0])
        temperature = float(parts[1].replace(",", ".")) if len(parts) == 2 else 1.0
    except ValueError:
        return None
    if not 1 <= n <= max_samples or not 0 < temperature <= 2:
        return None
    return n, temperature

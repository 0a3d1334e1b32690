"""Which photo a message or button means, and getting its bytes within the limits.

`PhotoBook` remembers, per chat, recent photos by message id (the user's photo message
and the bot's replies to it) and the chat's latest photo, so `/sample` and `/attention`
can find "the photo it replies to, else the photo whose caption it is, else the chat's
most recent photo". Everything is bounded: old entries fall out first. Its methods are
coroutines so that `bot.jobs.shared.SharedPhotoBook` (QUEUE_URL) can keep the same book in
Redis for every frontend and worker.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath

import aiohttp
from aiogram import Bot
from aiogram.types import Document, Message, PhotoSize

from bot.retry import with_retries

IMAGE_MIME_TYPES = {
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/x-bmp",
    "image/x-ms-bmp",
    "image/gif",
    "image/heic",  # an iPhone's photo sent as a file
    "image/heif",
    "image/heic-sequence",  # a burst or Live Photo: its primary picture
    "image/heif-sequence",
    "image/avif",
    "image/tiff",
}
IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".heic",
    ".heif",
    ".avif",
    ".tif",
    ".tiff",
}
SUPPORTED_FORMATS = "JPEG, PNG, WebP, HEIC, AVIF, TIFF, BMP or GIF"  # model.images.FORMATS

# Telegram sends each photo in several sizes; the model looks at 224 px, so the
# smallest size that is at least this big keeps downloads and decoding cheap.
PREFERRED_PHOTO_SIDE = 384


@dataclass(frozen=True)
class PhotoRef:
    file_id: str
    key: str  # file_unique_id: stable across bots and time, used as the cache key
    file_size: int | None = None


class NotAnImage(Exception):
    """A document that is not one of the supported image types."""


class TooLarge(Exception):
    """`size` is None when the download was cut off at the limit (real size unknown)."""

    def __init__(self, size: int | None, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(f"{size if size is not None else 'more than'} bytes (limit {limit})")


class DownloadFailed(Exception):
    """Telegram did not give us the file (after retries)."""


def pick_photo_size(sizes: list[PhotoSize]) -> PhotoSize:
    by_area = sorted(sizes, key=lambda s: s.width * s.height)
    for size in by_area:
        if min(size.width, size.height) >= PREFERRED_PHOTO_SIDE:
            return size
    return by_area[-1]


def is_image_document(document: Document) -> bool:
    mime = (document.mime_type or "").lower()
    suffix = PurePosixPath(document.file_name or "").suffix.lower()
    if mime in IMAGE_MIME_TYPES:
        return True
    # Some clients send application/octet-stream; trust a known image extension then.
    return mime in ("", "application/octet-stream") and suffix in IMAGE_EXTENSIONS


def photo_of(message: Message | None) -> PhotoRef | None:
    """The image a message carries (photo or image document), else None.

    Raises NotAnImage for a document that isn't an image.
    """
    if message is None:
        return None
    if message.photo:
        size = pick_photo_size(message.photo)
        return PhotoRef(size.file_id, size.file_unique_id, size.file_size)
    if message.document is not None:
        if not is_image_document(message.document):
            raise NotAnImage(message.document.mime_type or message.document.file_name or "")
        doc = message.document
        return PhotoRef(doc.file_id, doc.file_unique_id, doc.file_size)
    return None


class PhotoBook:
    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._by_message: OrderedDict[tuple[int, int], PhotoRef] = OrderedDict()
        self._latest: OrderedDict[int, PhotoRef] = OrderedDict()
        # Per chat, so a button can only ever refer to a photo sent in its own chat.
        self._by_key: OrderedDict[tuple[int, str], PhotoRef] = OrderedDict()

    @staticmethod
    def _put(table: OrderedDict, key: object, value: PhotoRef, capacity: int) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > capacity:
            table.popitem(last=False)

    async def remember(
        self, chat_id: int, message_id: int, photo: PhotoRef, *, latest: bool = True
    ) -> None:
        self._put(self._by_message, (chat_id, message_id), photo, self.capacity)
        self._put(self._by_key, (chat_id, photo.key), photo, self.capacity)
        if latest:
            self._put(self._latest, chat_id, photo, self.capacity)

    async def link_reply(self, chat_id: int, bot_message_id: int, photo: PhotoRef) -> None:
        """The bot's reply about `photo`: replying to it later means the same photo."""
        await self.remember(chat_id, bot_message_id, photo, latest=False)

    async def by_message(self, chat_id: int, message_id: int) -> PhotoRef | None:
        return self._by_message.get((chat_id, message_id))

    async def by_key(self, chat_id: int, key: str) -> PhotoRef | None:
        return self._by_key.get((chat_id, key))

    async def latest(self, chat_id: int) -> PhotoRef | None:
        return self._latest.get(chat_id)

    async def resolve(self, message: Message) -> PhotoRef | None:
        """The photo a command means. Raises NotAnImage if it points at a non-image."""
        chat_id = message.chat.id
        replied = message.reply_to_message
        if replied is not None:
            photo = photo_of(replied) or await self.by_message(chat_id, replied.message_id)
            if photo is not None:
                return photo
        own = photo_of(message)
        if own is not None:
            return own
        return await self.latest(chat_id)


async def download(bot: Bot, photo: PhotoRef, *, max_bytes: int, retry_budget_s: float) -> bytes:
    """The file's bytes. Checks the size Telegram declares before downloading and stops
    reading past `max_bytes`, so an oversized file never fills memory."""
    if photo.file_size is not None and photo.file_size > max_bytes:
        raise TooLarge(photo.file_size, max_bytes)
    file = await bot.get_file(photo.file_id)
    if file.file_size is not None and file.file_size > max_bytes:
        raise TooLarge(file.file_size, max_bytes)
    if not file.file_path:
        raise DownloadFailed("Telegram returned no file path")
    url = bot.session.api.file_url(bot.token, file.file_path)

    async def fetch() -> bytes:
        # the bot's session is aiogram's AiohttpSession (bot/app.py), which BaseSession's type
        # does not promise
        session = await bot.session.create_session()  # type: ignore[attr-defined]
        async with session.get(url, timeout=30) as response:
            if response.status >= 500:
                raise _TransientDownloadError(f"HTTP {response.status}")
            if response.status != 200:
                # Deliberately no URL in the message: it contains the bot token.
                raise DownloadFailed(f"file download answered HTTP {response.status}")
            chunks: list[bytes] = []
            received = 0
            async for chunk in response.content.iter_chunked(256 * 1024):
                received += len(chunk)
                if received > max_bytes:  # the declared size was wrong: stop reading
                    raise TooLarge(None, max_bytes)
                chunks.append(chunk)
            return b"".join(chunks)

    try:
        return await with_retries(
            fetch, what="download", budget_s=retry_budget_s, transient=_TRANSIENT
        )
    except _TRANSIENT as error:
        raise DownloadFailed(f"file download failed: {type(error).__name__}") from None


class _TransientDownloadError(Exception):
    pass


_TRANSIENT = (_TransientDownloadError, aiohttp.ClientError, OSError, asyncio.TimeoutError)

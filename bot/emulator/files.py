"""In-memory file storage with Telegram-like identifiers, bounded in count and bytes.

Everything lives in memory (the playground must work on a fresh clone with nothing
configured), so the store evicts the oldest files once either bound is exceeded; a bot
that asks for an evicted file gets the same "wrong file_id" error Telegram gives for
an expired one.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pillow_heif
from PIL import Image, UnidentifiedImageError

pillow_heif.register_heif_opener()  # an iPhone's photos: its client sends them, as JPEG

# Bots may download files up to 20 MB through getFile; larger ones exist (users can send
# them) but can only be described, not fetched.
GETFILE_MAX_BYTES = 20 * 1024 * 1024
# Thumbnail sides Telegram generates for photos (the "s" and "m" sizes).
THUMBNAIL_SIDES = (90, 320)
# The bot's own MAX_IMAGE_PIXELS default: bigger images are refused from their header.
MAX_PHOTO_PIXELS = 40_000_000


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    mime_type: str
    # What getFile/Message report: normally len(data), but tests may declare a larger size
    # to exercise "file is too big" without moving 20 MB around.
    file_size: int
    file_name: str | None = None


class FileStore:
    def __init__(self, max_files: int = 500, max_bytes: int = 256 * 1024 * 1024):
        self.max_files = max_files
        self.max_bytes = max_bytes
        # Telegram gives the same file (a photo forwarded or sent again) the same
        # file_unique_id under a new file_id. Off by default: each upload is a new file.
        self.unique_ids_by_content = False
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._by_path: dict[str, str] = {}
        self._bytes = 0
        self._counter = itertools.count(1)

    def __len__(self) -> int:
        return len(self._files)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def add(
        self,
        data: bytes,
        kind: str,
        extension: str,
        mime_type: str,
        declared_size: int | None = None,
        file_name: str | None = None,
    ) -> StoredFile:
        number = next(self._counter)
        stored = StoredFile(
            # Real ids are long opaque base64 strings; a recognisable prefix helps debugging.
            file_id=f"AgAC{kind[:3]}{number:06d}{secrets.token_urlsafe(12)}",
            file_unique_id=(
                f"AQAD{hashlib.sha256(data).hexdigest()[:16]}"
                if self.unique_ids_by_content
                else f"AQAD{number:06d}{secrets.token_hex(3)}"
            ),
            file_path=f"{kind}/file_{number}.{extension}",
            data=data,
            mime_type=mime_type,
            file_size=declared_size if declared_size is not None else len(data),
            file_name=file_name,
        )
        self._files[stored.file_id] = stored
        self._by_path[stored.file_path] = stored.file_id
        self._bytes += len(data)
        self._evict()
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        return self._files.get(file_id)

    def by_path(self, file_path: str) -> StoredFile | None:
        file_id = self._by_path.get(file_path)
        return self._files.get(file_id) if file_id else None

    def _evict(self) -> None:
        # Keep at least the newest file even if it alone exceeds the byte bound.
        while len(self._files) > 1 and (
            len(self._files) > self.max_files or self._bytes > self.max_bytes
        ):
            _, oldest = self._files.popitem(last=False)
            self._by_path.pop(oldest.file_path, None)
            self._bytes -= len(oldest.data)


def image_info(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, PIL format) of an image, or None if it is not one we can decode.

    The size is checked from the header first, as the bot does: an image over
    MAX_PHOTO_PIXELS (a decompression bomb: a small file claiming a huge size) is not
    a photo, and is never decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PHOTO_PIXELS:
                return None
            info = image.width, image.height, image.format or ""
            image.verify()
        return info
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _thumbnail(data: bytes, side: int) -> tuple[bytes, int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))  # JPEGs: decode at a reduced scale
        rgb = image.convert("RGB")
        rgb.thumbnail((side, side))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=80)
        return buffer.getvalue(), rgb.width, rgb.height


@dataclass(frozen=True)
class PreparedPhoto:
    """What storing a photo needs from decoding it: its size, format and thumbnails."""

    width: int
    height: int
    image_format: str
    thumbnails: tuple[tuple[bytes, int, int], ...]
    as_jpeg: bytes | None = None  # the original as Telegram keeps it, where not as sent


# What the emulator keeps of a photo as sent; Telegram's clients and servers turn the rest (an
# iPhone's HEIC, a TIFF, a BMP) into JPEG, which is what a bot then downloads.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}


def prepare_photo(data: bytes) -> PreparedPhoto | None:
    """Decode a photo for storing (slow: callers on an event loop run it in a thread);
    None if it is not an image the emulator takes as a photo."""
    info = image_info(data)
    if info is None:
        return None
    width, height, image_format = info
    thumbnails = tuple(
        _thumbnail(data, side) for side in THUMBNAIL_SIDES if max(width, height) > side
    )
    as_jpeg = None if image_format in KEPT_FORMATS else _thumbnail(data, max(width, height))[0]
    return PreparedPhoto(width, height, image_format, thumbnails, as_jpeg)


def store_photo(
    store: FileStore, data: bytes, prepared: PreparedPhoto | None = None
) -> list[dict[str, Any]]:
    """Store a photo and return its PhotoSize list, smallest first, the original last.

    Telegram re-encodes photos; the emulator keeps the original bytes as the largest size
    so tests can compare exactly what the bot downloaded with what the user sent.
    `prepared` is `prepare_photo(data)` when the caller already ran it.
    Raises ValueError if `data` is not a decodable image.
    """
    prepared = prepared or prepare_photo(data)
    if prepared is None:
        raise ValueError(f"not an image (or more than {MAX_PHOTO_PIXELS // 1_000_000} megapixels)")
    sizes = []
    for thumb, thumb_width, thumb_height in prepared.thumbnails:
        stored = store.add(thumb, "photos", "jpg", "image/jpeg")
        sizes.append(photo_size(stored, thumb_width, thumb_height))
    extension = KEPT_FORMATS.get(prepared.image_format, "jpg")
    mime_type = "image/jpeg" if extension == "jpg" else f"image/{extension}"
    original = store.add(prepared.as_jpeg or data, "photos", extension, mime_type)
    sizes.append(photo_size(original, prepared.width, prepared.height))
    return sizes


def photo_size(stored: StoredFile, width: int, height: int) -> dict[str, Any]:
    return {
        "file_id": stored.file_id,
        "file_unique_id": stored.file_unique_id,
        "width": width,
        "height": height,
        "file_size": stored.file_size,
    }

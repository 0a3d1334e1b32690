"""The job record a frontend puts in the stream: everything a worker needs to answer one
update, and nothing it would have to download from the frontend (the photo is named by
its Telegram file_id; the worker fetches it itself with getFile)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from bot.photos import PhotoRef

KINDS = ("caption", "samples", "attention")


@dataclass(frozen=True)
class JobRecord:
    update_id: int  # the idempotency key: one update makes at most one job
    chat_id: int
    user_id: int
    message_id: int  # what the answer replies to
    kind: str  # "caption" | "samples" | "attention"
    file_id: str
    file_unique_id: str
    file_size: int | None = None
    n: int = 0  # samples: how many
    temperature: float = 1.0
    anyway: bool = False  # caption: the "Caption anyway" button (a photo outside the domain)
    # Set by the enqueue script: the photo's encoding was in the shared cache then.
    cached: bool | None = None
    enqueued_at: float = field(default_factory=time.time)

    @property
    def photo(self) -> PhotoRef:
        return PhotoRef(self.file_id, self.file_unique_id, self.file_size)

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for XADD (None is left out)."""
        return {name: str(value) for name, value in asdict(self).items() if value is not None}

    @classmethod
    def from_fields(cls, raw: Mapping[Any, bytes | str]) -> JobRecord:
        """Parses what XREADGROUP returns; raises ValueError on a malformed entry."""
        text = {_str(key): _str(value) for key, value in raw.items()}
        values: dict[str, object] = {}
        for spec in fields(cls):
            if spec.name not in text:
                continue
            value = text[spec.name]
            kind = spec.type if isinstance(spec.type, str) else spec.type.__name__
            if kind.startswith("bool"):
                values[spec.name] = value == "True"
            elif kind.startswith("int"):
                values[spec.name] = int(value)
            elif kind.startswith("float"):
                values[spec.name] = float(value)
            else:
                values[spec.name] = value
        try:
            record = cls(**values)  # type: ignore[arg-type]
        except TypeError as error:
            raise ValueError(f"malformed job: {error}") from None
        if record.kind not in KINDS:
            raise ValueError(f"unknown job kind {record.kind!r}")
        return record


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

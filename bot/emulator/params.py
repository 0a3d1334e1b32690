"""Reading Bot API request parameters the way Telegram does.

Telegram accepts the same parameters as a URL query, an urlencoded form, a multipart form
or a JSON body. In the form encodings every value is a string and structured values
(keyboards, reply parameters, entity lists) are JSON inside that string; aiogram sends
everything as a form. We normalise all of them to one dict of Python values so the
method implementations never care how a request was encoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from .errors import bad_request

# Parameters whose value is a JSON object/array when sent in a form.
JSON_FIELDS = {
    "reply_markup",
    "reply_parameters",
    "entities",
    "caption_entities",
    "allowed_updates",
    "commands",
    "scope",
    "link_preview_options",
    "media",
    "menu_button",
}
INT_FIELDS = {
    "offset",
    "limit",
    "timeout",
    "message_id",
    "reply_to_message_id",
    "user_id",
    "cache_time",
    "message_thread_id",
    "from_chat_id",
    "width",
    "height",
    "duration",
}
# chat_id may also be "@channelusername", so it is converted only when it looks numeric.
MAYBE_INT_FIELDS = {"chat_id"}
BOOL_FIELDS = {
    "disable_notification",
    "protect_content",
    "show_alert",
    "drop_pending_updates",
    "disable_web_page_preview",
    "allow_sending_without_reply",
    "has_spoiler",
    "show_caption_above_media",
    "disable_content_type_detection",
    "allow_paid_broadcast",
}


@dataclass(frozen=True)
class UploadedFile:
    """A file part of a multipart request (what `InputFile` became on the wire)."""

    filename: str
    content_type: str
    data: bytes

    def __repr__(self) -> str:  # the bytes would drown any assertion message
        return f"UploadedFile({self.filename!r}, {self.content_type!r}, {len(self.data)} bytes)"


async def read_params(request: web.Request) -> dict[str, Any]:
    """All parameters of a Bot API call, with `attach://name` replaced by the uploaded file."""
    raw: dict[str, Any] = dict(request.query)
    files: dict[str, UploadedFile] = {}
    content_type = request.content_type
    if request.method == "POST" and request.can_read_body:
        if content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise bad_request("can't parse JSON object") from None
            if not isinstance(body, dict):
                raise bad_request("JSON object expected")
            raw.update(body)
        elif content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):  # a nested multipart: not a field
                    continue
                if part.name is None:
                    continue
                if part.filename is not None:
                    files[part.name] = UploadedFile(
                        filename=part.filename,
                        content_type=part.headers.get("Content-Type", "application/octet-stream"),
                        data=bytes(await part.read()),
                    )
                else:
                    raw[part.name] = await part.text()
        else:
            raw.update(await request.post())
    params = {key: _coerce(key, value) for key, value in raw.items()}
    for key, value in list(params.items()):
        if isinstance(value, str) and value.startswith("attach://"):
            name = value[len("attach://") :]
            if name not in files:
                raise bad_request(f"file attachment {name!r} not found")
            params[key] = files.pop(name)
    # A file part named like the parameter itself (curl -F photo=@x.png) is allowed too.
    for name, upload in files.items():
        params.setdefault(name, upload)
    return params


def _coerce(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if key in JSON_FIELDS:
        try:
            return json.loads(value)
        except ValueError:
            if key == "reply_markup":
                raise bad_request("can't parse reply keyboard markup JSON object") from None
            raise bad_request(f"can't parse {key} JSON object") from None
    if key in INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            raise bad_request(f"invalid {key} specified") from None
    if key in MAYBE_INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            return value
    if key in BOOL_FIELDS:
        return value.lower() in ("true", "1")
    return value

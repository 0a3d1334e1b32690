"""The playground: the Bot API emulator plus a local Telegram-like chat page.

`start_playground` serves both on one aiohttp app and port: the bot polls
`/bot<token>/...` while a browser opens `/` and plays the users. Each browser tab picks
its own chat id, so several tabs are several users.

The page's own API (JSON over HTTP, events by long polling):

    GET  /api/info                               bot name, its command menu, upload limit
    GET  /api/chats/{chat_id}/events?after=N&timeout=S
                                                 {"events": [...]} newer than event N,
                                                 waiting up to S (<= 25) seconds for one
    POST /api/chats/{chat_id}/messages           {"text", "reply_to_message_id"?}
    POST /api/chats/{chat_id}/uploads            multipart: file, caption?, reply_to_message_id?
    POST /api/chats/{chat_id}/buttons            {"message_id", "callback_data"}
    GET  /api/files/{file_id}                    a photo (inline) or a document (download)

Errors are {"error": "..."} with a 4xx status.

Only the page itself may change a chat: every POST must carry the page's token (served in
the page's HTML, header `X-Playground-Token`), JSON bodies must say `application/json`, and
requests from another origin (including the `null` origin of sandboxed frames and local
files) or to another host name (DNS rebinding) are refused.
"""

from __future__ import annotations

import asyncio
import secrets
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import BodyPartReader, web

from .files import prepare_photo
from .methods import MAX_PHOTO_UPLOAD_BYTES
from .server import BotAPIEmulator

# Uploads a little larger than the bot's 20 MB download limit are accepted, so a
# person can see how the bot answers a file that is too big.
MAX_PAGE_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_EVENTS_WAIT_SECONDS = 25
# Chat ids are chosen by the page; keep them positive and exactly representable in JS.
MAX_CHAT_ID = 2**53 - 1
PLAYGROUND_BOT_ID = 7_000_000_001
# Shown inline by the browser; anything else is served as a download, so an uploaded
# HTML file can never run as a page of this origin.
INLINE_IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TOKEN_HEADER = "X-Playground-Token"
TOKEN_META = '<meta name="playground-token" content="">'


def static_dir() -> Path:
    return Path(str(resources.files("bot.emulator") / "static"))


async def start_playground(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    bot_token: str | None = None,
    max_files: int = 200,
    max_file_bytes: int = 200 * 1024 * 1024,
) -> BotAPIEmulator:
    """Start the emulator with the chat page on the same port; returns it started.

    Use `emu.page_url` for the browser, `emu.base_url` and `emu.bot_token` for the bot,
    and `await emu.stop()` to shut both down.
    """
    token = bot_token or f"{PLAYGROUND_BOT_ID}:{secrets.token_urlsafe(24)}"
    emu = BotAPIEmulator(
        bot_token=token,
        bot_username="captionbot_playground_bot",
        max_files=max_files,
        max_file_bytes=max_file_bytes,
        max_calls=2_000,  # nobody inspects them here; uploads in them hold memory
    )
    Playground(emu).attach()
    try:
        await emu.start(host=host, port=port)
    except OSError as problem:
        raise OSError(
            problem.errno,
            f"the playground cannot listen on {host}:{port} ({problem.strerror}); "
            "set PLAYGROUND_PORT to a free port",
        ) from problem
    emu.page_url = f"{emu.base_url}/"
    return emu


class Playground:
    """The chat page and its API, mounted on an emulator's aiohttp app (before start)."""

    def __init__(self, emu: BotAPIEmulator):
        self.emu = emu
        # Given to the page in its HTML; another site can neither read that page nor send
        # a custom header without a CORS preflight, which this server never grants.
        self.page_token = secrets.token_urlsafe(24)

    def attach(self) -> None:
        router = self.emu.app.router
        router.add_get("/", self.index)
        router.add_static("/static/", static_dir(), append_version=False)
        router.add_get("/api/info", self.info)
        router.add_get("/api/chats/{chat_id}/events", self.events)
        router.add_post("/api/chats/{chat_id}/messages", self.send_text)
        router.add_post("/api/chats/{chat_id}/uploads", self.upload)
        router.add_post("/api/chats/{chat_id}/buttons", self.press_button)
        router.add_get("/api/files/{file_id}", self.file)
        self.emu.app.middlewares.append(self._local_only)

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = (static_dir() / "index.html").read_text(encoding="utf-8")
        return web.Response(
            text=page.replace(
                TOKEN_META, f'<meta name="playground-token" content="{self.page_token}">'
            ),
            content_type="text/html",
            headers={
                **SECURITY_HEADERS,
                "Content-Security-Policy": PAGE_CSP,
                "Cache-Control": "no-cache",
            },
        )

    async def info(self, request: web.Request) -> web.Response:
        bot = self.emu.bot_user
        return _ok(
            {
                "bot": {
                    "id": bot["id"],
                    "first_name": bot["first_name"],
                    "username": bot["username"],
                },
                "commands": self.emu.commands(),
                "max_upload_bytes": MAX_PAGE_UPLOAD_BYTES,
            }
        )

    async def events(self, request: web.Request) -> web.Response:
        chat_id = _chat_id(request)
        after = _int_query(request, "after", 0)
        timeout = min(max(_int_query(request, "timeout", 0), 0), MAX_EVENTS_WAIT_SECONDS)
        events = await self.emu.wait_chat_events(chat_id, after=after, timeout=timeout)
        return _ok({"events": events})

    async def send_text(self, request: web.Request) -> web.Response:
        chat_id = _chat_id(request)
        body = await _json_body(request)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _error(400, "text is empty")
        if len(text) > 4096:
            raise _error(400, "text is longer than 4096 characters")
        try:
            message = self.emu.user_sends_text(
                chat_id, text, reply_to_message_id=_optional_int(body.get("reply_to_message_id"))
            )
        except ValueError as problem:
            raise _error(400, str(problem)) from None
        return _ok({"message": message})

    async def upload(self, request: web.Request) -> web.Response:
        chat_id = _chat_id(request)
        if request.content_type != "multipart/form-data":
            raise _error(400, "expected a multipart/form-data upload")
        fields: dict[str, str] = {}
        upload: tuple[str, str, bytes] | None = None
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):  # a nested multipart: not a field
                continue
            if part.name == "file" and part.filename is not None:
                data = await _read_bounded(part, MAX_PAGE_UPLOAD_BYTES)
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                upload = (part.filename, content_type, data)
            elif part.name in ("caption", "reply_to_message_id"):
                fields[part.name] = (await part.text())[:1024]
        if upload is None:
            raise _error(400, "no file in the upload")
        file_name, content_type, data = upload
        caption = fields.get("caption") or None
        reply_to = _optional_int(fields.get("reply_to_message_id") or None)
        # Like Telegram clients: pictures go as photos, anything else (or a picture too big
        # to be a photo) as a document, which the bot must cope with too. Decoding (checked
        # from the header first) runs off the event loop.
        photo = None
        if len(data) <= MAX_PHOTO_UPLOAD_BYTES:
            photo = await asyncio.to_thread(prepare_photo, data)
        try:
            if photo is not None:
                message = self.emu.user_sends_photo(
                    chat_id, data, caption=caption, reply_to_message_id=reply_to, prepared=photo
                )
            else:
                message = self.emu.user_sends_document(
                    chat_id,
                    data,
                    _safe_file_name(file_name),
                    content_type,
                    caption=caption,
                    reply_to_message_id=reply_to,
                )
        except ValueError as problem:
            raise _error(400, str(problem)) from None
        return _ok({"message": message})

    async def press_button(self, request: web.Request) -> web.Response:
        chat_id = _chat_id(request)
        body = await _json_body(request)
        message_id = _optional_int(body.get("message_id"))
        data = body.get("callback_data")
        if message_id is None or not isinstance(data, str):
            raise _error(400, "message_id and callback_data are required")
        try:
            query_id = self.emu.user_presses_button(chat_id, message_id, data)
        except ValueError as problem:
            raise _error(400, str(problem)) from None
        return _ok({"callback_query_id": query_id})

    async def file(self, request: web.Request) -> web.Response:
        stored = self.emu.files.get(request.match_info["file_id"])
        if stored is None:
            raise _error(404, "no such file (it may have been evicted)")
        headers = {**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"}
        if stored.mime_type in INLINE_IMAGE_TYPES:
            return web.Response(body=stored.data, content_type=stored.mime_type, headers=headers)
        name = _safe_file_name(stored.file_name or stored.file_path.rsplit("/", 1)[-1])
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return web.Response(
            body=stored.data, content_type="application/octet-stream", headers=headers
        )

    @web.middleware
    async def _local_only(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Refuse page-API requests made on behalf of other web sites.

        The playground listens on loopback, but any page open in the same browser could
        still send requests to it: Host stops DNS rebinding, Origin stops cross-site
        requests whose browser says where they come from (a sandboxed frame says `null`),
        and the page token stops every other change, such as a `text/plain` form post.
        """
        if request.path.startswith("/api/"):
            host = (request.host or "").rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                return _json_error(403, "the playground only answers requests to localhost")
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.host:
                return _json_error(403, "cross-origin requests are not allowed")
            if request.method not in ("GET", "HEAD") and not secrets.compare_digest(
                request.headers.get(TOKEN_HEADER, "").encode(), self.page_token.encode()
            ):
                return _json_error(403, "missing or wrong page token: reload the page")
        try:
            return await handler(request)
        except web.HTTPException as problem:
            if request.path.startswith("/api/") and problem.status >= 400:
                return _json_error(problem.status, problem.text or problem.reason)
            raise


def _ok(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=SECURITY_HEADERS)


def _error(status: int, message: str) -> web.HTTPException:
    if status == 413:
        return web.HTTPRequestEntityTooLarge(
            MAX_PAGE_UPLOAD_BYTES, MAX_PAGE_UPLOAD_BYTES + 1, text=message
        )
    if status == 404:
        return web.HTTPNotFound(text=message)
    if status == 415:
        return web.HTTPUnsupportedMediaType(text=message)
    return web.HTTPBadRequest(text=message)


def _chat_id(request: web.Request) -> int:
    raw = request.match_info["chat_id"]
    if not raw.isdigit() or not 0 < int(raw) <= MAX_CHAT_ID:
        raise _error(400, "chat id must be a positive integer")
    return int(raw)


def _int_query(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise _error(400, f"{name} must be an integer") from None


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _error(400, "message ids are integers") from None


async def _json_body(request: web.Request) -> dict[str, Any]:
    # aiohttp parses any body as JSON; a text/plain one would have skipped CORS's preflight.
    if request.content_type != "application/json":
        raise _error(415, "expected Content-Type: application/json")
    try:
        body = await request.json()
    except ValueError:
        raise _error(400, "expected a JSON body") from None
    if not isinstance(body, dict):
        raise _error(400, "expected a JSON object")
    return body


async def _read_bounded(part: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise _error(413, f"the file is larger than {limit // (1024 * 1024)} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def _safe_file_name(name: str) -> str:
    cleaned = "".join(c for c in Path(name).name if c.isprintable() and c not in '"\\/')
    return cleaned[:128] or "file"

"""A Telegram Bot API emulator: the real HTTP API shapes, served locally by aiohttp.

The bot talks to it exactly as it talks to api.telegram.org (point aiogram at `base_url`
with TelegramAPIServer.from_base). The other side, the *users*, is driven either by tests
(`user_sends_text`, `next_bot_message`, `inject_fault`, ...) or by the playground chat page,
which is built on the same methods plus `chat_events`.

It comes in three parts: `state` (what the emulator holds, and the users' side),
`methods` (the Bot API methods) and this module (HTTP: routing, downloads, faults).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web

from .errors import NOT_FOUND, UNAUTHORIZED, BotAPIError, too_many_requests
from .methods import MAX_DOCUMENT_UPLOAD_BYTES, MAX_PHOTO_UPLOAD_BYTES, METHODS, BotAPIMethods
from .params import read_params

__all__ = ["MAX_PHOTO_UPLOAD_BYTES", "BotAPIEmulator"]

log = logging.getLogger(__name__)

# The pseudo-method name under which file downloads (GET /file/...) can be faulted.
DOWNLOAD = "download"


class BotAPIEmulator(BotAPIMethods):
    """The emulator: state and Bot API methods (see `EmulatorState` for the arguments),
    served over HTTP."""

    def __init__(self, bot_token: str = "123456:TEST", **options: Any) -> None:
        super().__init__(bot_token, **options)
        self.app = web.Application(client_max_size=MAX_DOCUMENT_UPLOAD_BYTES + 1024 * 1024)
        self.app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        self.app.router.add_get("/file/bot{token}/{file_path:.+}", self._handle_download)
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        bound_port = self._runner.addresses[0][1]
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "", None) else host
        self.base_url = f"http://{shown_host}:{bound_port}"
        log.debug("Bot API emulator listening on %s", self.base_url)

    async def stop(self) -> None:
        # Release long polls first so shutdown does not wait for them to time out.
        self._closing = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> BotAPIEmulator:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- internals: HTTP ---------------------------------------------------------------

    async def _handle_method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.bot_token:
            return _json(UNAUTHORIZED.to_json(), 401)
        requested = request.match_info["method"]
        name, impl = METHODS.get(requested.lower(), (requested, None))
        try:
            params = await read_params(request)
        except BotAPIError as error:
            self._record_call(name, {})
            return _json(error.to_json(), error.error_code)
        self._record_call(name, params)
        if impl is None:
            log.warning("bot called %s, which the emulator does not implement", requested)
            return _json(NOT_FOUND.to_json(), 404)
        try:
            await self._apply_fault(name)
            result = await impl(self, params)
        except BotAPIError as error:
            return _json(error.to_json(), error.error_code)
        return _json({"ok": True, "result": result}, 200)

    async def _handle_download(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.bot_token:
            return _json(UNAUTHORIZED.to_json(), 401)
        try:
            await self._apply_fault(DOWNLOAD)
        except BotAPIError as error:
            return _json(error.to_json(), error.error_code)
        stored = self.files.by_path(request.match_info["file_path"])
        if stored is None:
            return _json(NOT_FOUND.to_json(), 404)
        return web.Response(body=stored.data, content_type=stored.mime_type)

    async def _apply_fault(self, method: str) -> None:
        queue = self._faults.get(method.lower())
        if not queue:
            return
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status == 429:
            raise too_many_requests(fault.retry_after or 1)
        if fault.status is not None:
            raise BotAPIError(fault.status, _status_description(fault.status))


def _json(body: dict[str, Any], status: int) -> web.Response:
    return web.json_response(body, status=status)


def _status_description(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return f"Bad Request: {phrase.lower()}" if status == 400 else phrase

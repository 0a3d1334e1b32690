"""A Telegram Bot API emulator: the real HTTP API shapes, served locally by aiohttp.

The bot talks to it exactly as it talks to api.telegram.org (point aiogram at `base_url`
with TelegramAPIServer.from_base). The other side, the *users*, is driven either by tests
(`user_sends_text`, `next_bot_message`, `inject_fault`, ...) or by the playground chat page,
which is built on the same methods plus `chat_events`.

Everything is in memory and bounded. The test-facing methods are not thread-safe: call
them from the event loop the emulator runs in.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import mimetypes
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from .errors import NOT_FOUND, UNAUTHORIZED, BotAPIError, bad_request, too_many_requests
from .files import GETFILE_MAX_BYTES, FileStore, StoredFile, image_info, store_photo
from .formatting import parse_formatted, utf16_len, with_detected_entities
from .params import UploadedFile, read_params

log = logging.getLogger(__name__)

Params = dict[str, Any]
MethodImpl = Callable[["BotAPIEmulator", Params], Awaitable[Any]]

MAX_TEXT_LENGTH = 4096
MAX_CAPTION_LENGTH = 1024
MAX_CALLBACK_DATA_BYTES = 64
# Upload limits of the Bot API: photos up to 10 MB, other files up to 50 MB.
MAX_PHOTO_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_DOCUMENT_UPLOAD_BYTES = 50 * 1024 * 1024
MAX_LONG_POLL_SECONDS = 50
CHAT_ACTIONS = {
    "typing",
    "upload_photo",
    "record_video",
    "upload_video",
    "record_voice",
    "upload_voice",
    "upload_document",
    "choose_sticker",
    "find_location",
    "record_video_note",
    "upload_video_note",
}
# Update types a bot receives when it never said which it wants (Telegram's default).
DEFAULT_EXCLUDED_UPDATES = {"chat_member", "message_reaction", "message_reaction_count"}
COMMAND_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
# The pseudo-method name under which file downloads (GET /file/...) can be faulted.
DOWNLOAD = "download"

_METHODS: dict[str, tuple[str, MethodImpl]] = {}


def bot_method(name: str) -> Callable[[MethodImpl], MethodImpl]:
    """Register a Bot API method. Telegram matches method names case-insensitively."""

    def register(impl: MethodImpl) -> MethodImpl:
        _METHODS[name.lower()] = (name, impl)
        return impl

    return register


@dataclass
class Fault:
    status: int | None
    retry_after: int | None
    delay: float | None
    remaining: int


class BotAPIEmulator:
    def __init__(
        self,
        bot_token: str = "123456:TEST",
        *,
        bot_username: str = "captionbot_emulated_bot",
        bot_first_name: str = "Caption Bot",
        max_files: int = 500,
        max_file_bytes: int = 256 * 1024 * 1024,
        max_messages: int = 10_000,
        max_pending_updates: int = 1_000,
        max_events_per_chat: int = 500,
        max_calls: int = 100_000,
    ):
        bot_id, _, secret = bot_token.partition(":")
        if not bot_id.isdigit() or not secret:
            raise ValueError("bot_token must look like a Telegram token: '<digits>:<secret>'")
        self.bot_token = bot_token
        self.bot_user: dict[str, Any] = {
            "id": int(bot_id),
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }
        self.files = FileStore(max_files=max_files, max_bytes=max_file_bytes)
        self.calls: list[tuple[str, Params]] = []
        self.base_url: str | None = None
        self.page_url: str | None = None  # set by the playground when it serves the chat page

        self._max_messages = max_messages
        self._max_pending_updates = max_pending_updates
        self._max_events_per_chat = max_events_per_chat
        self._max_calls = max_calls

        self._changed = asyncio.Event()  # replaced on every change; see _notify
        self._closing = False
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(100_000_001)
        self._allowed_updates: list[str] | None = None
        self._poll_generation = 0
        self._webhook_url = ""

        self._users: dict[int, dict[str, Any]] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._last_message_id: dict[int, int] = {}
        self._messages: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._photo_sets: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._callback_queries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._event_seq = itertools.count(1)
        self._chat_events: dict[int, deque[dict[str, Any]]] = {}
        self._bot_message_cursor: dict[int, int] = {}
        # wait_for_call remembers what it returned by absolute call number, so trimming
        # the oldest calls (see _record_call) never shifts what counts as consumed.
        self._consumed_calls: set[int] = set()
        self._calls_trimmed = 0
        self._faults: dict[str, deque[Fault]] = {}
        self._commands: dict[tuple[str, str], list[dict[str, str]]] = {}
        self._bot_texts: dict[str, str] = {}  # name, description, short_description

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

    # --- the user side (tests and the playground page) -----------------------------

    def user_sends_text(
        self,
        chat_id: int,
        text: str,
        user_id: int | None = None,
        reply_to_message_id: int | None = None,
    ) -> dict[str, Any]:
        """A user sends `text`; returns the Message (bot_command entities for /commands)."""
        content: dict[str, Any] = {"text": text}
        if entities := with_detected_entities(text, []):
            content["entities"] = entities
        return self._user_message(chat_id, user_id, reply_to_message_id, content)

    def user_sends_photo(
        self,
        chat_id: int,
        image_bytes: bytes,
        caption: str | None = None,
        user_id: int | None = None,
        reply_to_message_id: int | None = None,
    ) -> dict[str, Any]:
        """A user sends a photo; the Message's `photo` lists thumbnails, then the original.

        Raises ValueError if `image_bytes` is not an image (a Telegram client would send
        such a file as a document instead).
        """
        content: dict[str, Any] = {"photo": self._store_photo_set(image_bytes)}
        content.update(self._user_caption(caption))
        return self._user_message(chat_id, user_id, reply_to_message_id, content)

    def user_sends_document(
        self,
        chat_id: int,
        data: bytes,
        file_name: str,
        mime_type: str,
        caption: str | None = None,
        user_id: int | None = None,
        declared_size: int | None = None,
        reply_to_message_id: int | None = None,
    ) -> dict[str, Any]:
        """A user sends a file as a document. `declared_size` overrides the reported size."""
        stored = self.files.add(
            data,
            "documents",
            _extension(file_name, mime_type),
            mime_type,
            declared_size=declared_size,
            file_name=file_name,
        )
        content: dict[str, Any] = {"document": _document_json(stored)}
        content.update(self._user_caption(caption))
        return self._user_message(chat_id, user_id, reply_to_message_id, content)

    def user_presses_button(
        self, chat_id: int, message_id: int, callback_data: str, user_id: int | None = None
    ) -> str:
        """A user presses an inline button of a message; returns the callback query id."""
        message = self._messages.get((chat_id, message_id))
        if message is None:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        user = self._user(user_id if user_id is not None else chat_id)
        query_id = str(secrets.randbits(62))
        self._callback_queries[query_id] = {"chat_id": chat_id, "answered": False}
        _trim(self._callback_queries, 1_000)
        self._queue_update(
            "callback_query",
            {
                "id": query_id,
                "from": user,
                "message": copy.deepcopy(message),
                "chat_instance": str(-abs(chat_id) * 7919),
                "data": callback_data,
            },
        )
        return query_id

    async def next_bot_message(self, chat_id: int, timeout: float = 30) -> dict[str, Any]:
        """The next message the bot sent to `chat_id` (each is returned once, in order).

        Photo messages carry the uploaded bytes under "photo_bytes", documents under
        "document_bytes".
        """
        found: list[dict[str, Any]] = []

        def take() -> bool:
            cursor = self._bot_message_cursor.get(chat_id, 0)
            for event in self._chat_events.get(chat_id, ()):
                if event["seq"] > cursor and event["type"] == "message":
                    message = event["message"]
                    if message["from"]["is_bot"]:
                        self._bot_message_cursor[chat_id] = event["seq"]
                        found.append(message)
                        return True
            return False

        if not await self._wait_until(take, timeout):
            recent = [name for name, _ in self.calls[-10:]]
            raise TimeoutError(
                f"the bot sent nothing to chat {chat_id} within {timeout}s (last calls: {recent})"
            )
        message = copy.deepcopy(found[0])
        if "photo" in message:
            stored = self.files.get(message["photo"][-1]["file_id"])
            message["photo_bytes"] = stored.data if stored else None
        if "document" in message:
            stored = self.files.get(message["document"]["file_id"])
            message["document_bytes"] = stored.data if stored else None
        return message

    async def wait_for_call(
        self,
        method: str,
        predicate: Callable[[Params], bool] | None = None,
        timeout: float = 30,
    ) -> Params:
        """Params of the first call of `method` (matching `predicate`) not returned before.

        Calls made before waiting count too, so there is no race with the action that
        caused them.
        """
        wanted = method.lower()
        found: list[Params] = []

        def take() -> bool:
            for index, (name, params) in enumerate(self.calls, start=self._calls_trimmed):
                if index in self._consumed_calls or name.lower() != wanted:
                    continue
                if predicate is None or predicate(params):
                    self._consumed_calls.add(index)
                    found.append(params)
                    return True
            return False

        if not await self._wait_until(take, timeout):
            recent = [name for name, _ in self.calls[-10:]]
            raise TimeoutError(f"no {method} call within {timeout}s (last calls: {recent})")
        return found[0]

    def inject_fault(
        self,
        method: str,
        status: int | None = None,
        retry_after: int | None = None,
        delay: float | None = None,
        times: int = 1,
    ) -> None:
        """Make the next `times` calls of `method` fail or stall.

        status 429 answers "Too Many Requests: retry after N" (N = retry_after, default 1);
        any other status answers that HTTP error. With `delay` alone the call is held for
        `delay` seconds and then answered normally; with both, held and then failed.
        Neither given means status 500. Use method "download" for file downloads.
        """
        if status is None and delay is None:
            status = 500
        if status == 429 and retry_after is None:
            retry_after = 1
        fault = Fault(status=status, retry_after=retry_after, delay=delay, remaining=times)
        self._faults.setdefault(method.lower(), deque()).append(fault)

    def clear_faults(self) -> None:
        self._faults.clear()

    def chat_events(self, chat_id: int, after: int = 0) -> list[dict[str, Any]]:
        """What happened in a chat after event number `after` (for the playground page).

        Event types: message, edited_message, deleted_message (message_id), chat_action
        (action) and callback_answer (text, show_alert, url).
        """
        return [copy.deepcopy(e) for e in self._chat_events.get(chat_id, ()) if e["seq"] > after]

    async def wait_chat_events(
        self, chat_id: int, after: int = 0, timeout: float = 25
    ) -> list[dict[str, Any]]:
        """Like chat_events, but waits up to `timeout` seconds for something to happen."""

        def has_new() -> bool:
            events = self._chat_events.get(chat_id)
            return bool(events) and events[-1]["seq"] > after

        await self._wait_until(has_new, timeout)
        return self.chat_events(chat_id, after)

    def chat_history(self, chat_id: int) -> list[dict[str, Any]]:
        """The chat's messages still held, oldest first, as they are now (after edits)."""
        return [copy.deepcopy(m) for (cid, _), m in self._messages.items() if cid == chat_id]

    def commands(self, language_code: str = "") -> list[dict[str, str]]:
        """The bot's command menu for private chats, as setMyCommands left it."""
        for key in (("default", language_code), ("default", "")):
            if key in self._commands:
                return copy.deepcopy(self._commands[key])
        return []

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._updates)

    # --- internals: waiting ----------------------------------------------------------

    def _notify(self) -> None:
        # One shared "something changed" event: every waiter re-checks its own condition.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if condition():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                return False
            changed = self._changed  # taken right after the check: no wake-up can be lost
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    # --- internals: users, chats, messages, updates ----------------------------------

    def _user(self, user_id: int) -> dict[str, Any]:
        if user_id not in self._users:
            self._users[user_id] = {
                "id": user_id,
                "is_bot": False,
                "first_name": "Tester",
                "last_name": str(user_id)[-4:],
                "username": f"tester{user_id}",
                "language_code": "en",
            }
        return self._users[user_id]

    def _chat(self, chat_id: int, user: dict[str, Any]) -> dict[str, Any]:
        if chat_id not in self._chats:
            if chat_id == user["id"]:
                self._chats[chat_id] = {
                    "id": chat_id,
                    "type": "private",
                    "first_name": user["first_name"],
                    "last_name": user.get("last_name", ""),
                    "username": user.get("username", ""),
                }
            else:
                self._chats[chat_id] = {"id": chat_id, "type": "group", "title": f"Group {chat_id}"}
        return self._chats[chat_id]

    def _user_caption(self, caption: str | None) -> dict[str, Any]:
        if not caption:
            return {}
        content: dict[str, Any] = {"caption": caption}
        if entities := with_detected_entities(caption, []):
            content["caption_entities"] = entities
        return content

    def _user_message(
        self,
        chat_id: int,
        user_id: int | None,
        reply_to_message_id: int | None,
        content: dict[str, Any],
    ) -> dict[str, Any]:
        user = self._user(user_id if user_id is not None else chat_id)
        chat = self._chat(chat_id, user)
        message = self._new_message(chat, user, content)
        if reply_to_message_id is not None:
            replied = self._messages.get((chat_id, reply_to_message_id))
            if replied is None:
                raise ValueError(f"no message {reply_to_message_id} in chat {chat_id}")
            message["reply_to_message"] = _without_reply(replied)
        self._record_message(message)
        self._queue_update("message", copy.deepcopy(message))
        return copy.deepcopy(message)

    def _new_message(
        self, chat: dict[str, Any], sender: dict[str, Any], content: dict[str, Any]
    ) -> dict[str, Any]:
        message_id = self._last_message_id.get(chat["id"], 0) + 1
        self._last_message_id[chat["id"]] = message_id
        return {
            "message_id": message_id,
            "from": copy.deepcopy(sender),
            "chat": copy.deepcopy(chat),
            "date": int(time.time()),
            **content,
        }

    def _record_message(self, message: dict[str, Any]) -> None:
        self._messages[(message["chat"]["id"], message["message_id"])] = message
        _trim(self._messages, self._max_messages)
        self._chat_event(message["chat"]["id"], "message", message=copy.deepcopy(message))

    def _chat_event(self, chat_id: int, kind: str, **payload: Any) -> None:
        events = self._chat_events.setdefault(chat_id, deque(maxlen=self._max_events_per_chat))
        events.append({"seq": next(self._event_seq), "type": kind, **payload})
        self._notify()

    def _queue_update(self, kind: str, payload: dict[str, Any]) -> None:
        self._updates.append({"update_id": next(self._update_ids), kind: payload})
        del self._updates[: -self._max_pending_updates]
        self._notify()

    def _store_photo_set(self, data: bytes) -> list[dict[str, Any]]:
        sizes = store_photo(self.files, data)
        for size in sizes:  # any size's file_id can be used to send the photo again
            self._photo_sets[size["file_id"]] = sizes
        _trim(self._photo_sets, 3 * self.files.max_files)
        return copy.deepcopy(sizes)

    # --- internals: HTTP ---------------------------------------------------------------

    async def _handle_method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.bot_token:
            return _json(UNAUTHORIZED.to_json(), 401)
        requested = request.match_info["method"]
        name, impl = _METHODS.get(requested.lower(), (requested, None))
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

    def _record_call(self, name: str, params: Params) -> None:
        self.calls.append((name, params))
        if len(self.calls) > self._max_calls:
            # Long playground sessions must not grow without bound: drop the oldest tenth.
            dropped = max(1, self._max_calls // 10)
            del self.calls[:dropped]
            self._calls_trimmed += dropped
            self._consumed_calls = {i for i in self._consumed_calls if i >= self._calls_trimmed}
        self._notify()

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

    # --- internals: what bot methods share --------------------------------------------

    def _target_chat(self, params: Params) -> dict[str, Any]:
        chat_id = params.get("chat_id")
        if chat_id in (None, ""):
            raise bad_request("chat_id is empty")
        chat = self._chats.get(chat_id) if isinstance(chat_id, int) else None
        if chat is None:  # bots can only write to chats whose users wrote to them first
            raise bad_request("chat not found")
        return chat

    def _bot_message(self, params: Params, content: dict[str, Any]) -> dict[str, Any]:
        chat = self._target_chat(params)
        replied = self._replied_message(chat["id"], params)
        markup = _inline_markup(params.get("reply_markup"))
        message = self._new_message(chat, self.bot_user, content)
        if replied is not None:
            message["reply_to_message"] = _without_reply(replied)
        if markup is not None:
            message["reply_markup"] = markup
        self._record_message(message)
        return copy.deepcopy(message)

    def _replied_message(self, chat_id: int, params: Params) -> dict[str, Any] | None:
        reply = params.get("reply_parameters")
        if reply is None and params.get("reply_to_message_id"):
            reply = {
                "message_id": params["reply_to_message_id"],
                "allow_sending_without_reply": params.get("allow_sending_without_reply", False),
            }
        if not reply:
            return None
        if not isinstance(reply, dict) or not isinstance(reply.get("message_id"), int):
            raise bad_request("invalid reply parameters specified")
        replied = self._messages.get((reply.get("chat_id", chat_id), reply["message_id"]))
        if replied is None and not reply.get("allow_sending_without_reply"):
            raise bad_request("message to be replied not found")
        return replied

    def _formatted(
        self, params: Params, text_key: str, entities_key: str, max_length: int, what: str
    ) -> dict[str, Any]:
        """text/caption plus entities, from explicit entities or parse_mode markup."""
        raw = params.get(text_key)
        if raw is None or raw == "":
            return {}
        raw = str(raw)
        if params.get(entities_key):
            text, entities = raw, params[entities_key]
        else:
            text, entities = parse_formatted(raw, params.get("parse_mode"))
        entities = with_detected_entities(text, entities)
        if utf16_len(text) > max_length:
            raise bad_request(f"{what} is too long")
        content: dict[str, Any] = {text_key: text}
        if entities:
            content[entities_key] = entities
        return content

    def _text_content(self, params: Params) -> dict[str, Any]:
        content = self._formatted(params, "text", "entities", MAX_TEXT_LENGTH, "message")
        if not content.get("text", "").strip():
            raise bad_request("message text is empty")
        return content

    def _caption_content(self, params: Params) -> dict[str, Any]:
        return self._formatted(
            params, "caption", "caption_entities", MAX_CAPTION_LENGTH, "message caption"
        )

    def _editable_message(self, params: Params) -> dict[str, Any]:
        if params.get("inline_message_id"):
            raise bad_request("MESSAGE_ID_INVALID")
        chat = self._target_chat(params)
        if not params.get("message_id"):
            raise bad_request("message identifier is not specified")
        message = self._messages.get((chat["id"], params["message_id"]))
        if message is None:
            raise bad_request("message to edit not found")
        if not message["from"]["is_bot"]:
            raise bad_request("message can't be edited")
        return message

    def _apply_edit(self, message: dict[str, Any], changes: dict[str, Any], drop: list[str]) -> Any:
        edited = {k: v for k, v in message.items() if k not in drop and k != "edit_date"}
        edited.update(changes)
        unchanged = {k: v for k, v in message.items() if k != "edit_date"}
        if edited == unchanged:
            raise bad_request(
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message"
            )
        edited["edit_date"] = int(time.time())
        message.clear()
        message.update(edited)
        self._chat_event(message["chat"]["id"], "edited_message", message=copy.deepcopy(message))
        return copy.deepcopy(message)

    # --- Bot API methods -----------------------------------------------------------------

    @bot_method("getMe")
    async def _get_me(self, params: Params) -> Any:
        return self.bot_user

    @bot_method("logOut")
    async def _log_out(self, params: Params) -> Any:
        return True

    @bot_method("close")
    async def _close(self, params: Params) -> Any:
        return True

    @bot_method("getUpdates")
    async def _get_updates(self, params: Params) -> Any:
        if self._webhook_url:
            raise BotAPIError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = params.get("offset") or 0
        limit = min(max(params.get("limit") or 100, 1), 100)
        timeout = min(max(params.get("timeout") or 0, 0), MAX_LONG_POLL_SECONDS)
        if "allowed_updates" in params:
            self._allowed_updates = params["allowed_updates"] or None
        # A newer getUpdates terminates an older one still waiting, as in Telegram: it is
        # how two bot instances polling one token notice each other.
        self._poll_generation += 1
        generation = self._poll_generation
        self._notify()
        self._confirm_updates(offset)

        def ready() -> bool:
            return generation != self._poll_generation or bool(self._deliverable())

        await self._wait_until(ready, timeout)
        if generation != self._poll_generation:
            raise BotAPIError(
                409,
                "Conflict: terminated by other getUpdates request; "
                "make sure that only one bot instance is running",
            )
        return self._deliverable()[:limit]

    def _confirm_updates(self, offset: int) -> None:
        if offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        elif offset < 0:
            self._updates = self._updates[offset:]

    def _deliverable(self) -> list[dict[str, Any]]:
        def allowed(update: dict[str, Any]) -> bool:
            kind = next(k for k in update if k != "update_id")
            if self._allowed_updates is None:
                return kind not in DEFAULT_EXCLUDED_UPDATES
            return kind in self._allowed_updates

        # Updates of types the bot does not want are dropped, never delivered later.
        self._updates = [u for u in self._updates if allowed(u)]
        return copy.deepcopy(self._updates)

    @bot_method("setWebhook")
    async def _set_webhook(self, params: Params) -> Any:
        # Nothing is ever delivered to a webhook here; remembering it makes getUpdates
        # fail as in Telegram, which is the mistake worth catching.
        self._webhook_url = str(params.get("url") or "")
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    @bot_method("deleteWebhook")
    async def _delete_webhook(self, params: Params) -> Any:
        self._webhook_url = ""
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    @bot_method("getWebhookInfo")
    async def _get_webhook_info(self, params: Params) -> Any:
        return {
            "url": self._webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }

    @bot_method("getChat")
    async def _get_chat(self, params: Params) -> Any:
        chat = dict(self._target_chat(params))
        chat.setdefault("accent_color_id", 0)
        chat.setdefault("max_reaction_count", 11)
        return chat

    @bot_method("sendMessage")
    async def _send_message(self, params: Params) -> Any:
        self._target_chat(params)  # "chat not found" comes before content errors
        return self._bot_message(params, self._text_content(params))

    @bot_method("sendPhoto")
    async def _send_photo(self, params: Params) -> Any:
        self._target_chat(params)
        photo = params.get("photo")
        if isinstance(photo, UploadedFile):
            if len(photo.data) > MAX_PHOTO_UPLOAD_BYTES:
                raise BotAPIError(413, "Request Entity Too Large")
            info = image_info(photo.data)
            if info is None:
                raise bad_request("IMAGE_PROCESS_FAILED")
            width, height, _ = info
            if width + height > 10_000 or max(width, height) > 20 * min(width, height):
                raise bad_request("PHOTO_INVALID_DIMENSIONS")
            sizes = self._store_photo_set(photo.data)
        elif isinstance(photo, str) and photo in self._photo_sets:
            sizes = copy.deepcopy(self._photo_sets[photo])
        elif photo:
            raise bad_request("wrong file identifier/HTTP URL specified")
        else:
            raise bad_request("there is no photo in the request")
        content: dict[str, Any] = {"photo": sizes}
        content.update(self._caption_content(params))
        if params.get("has_spoiler"):
            content["has_media_spoiler"] = True
        return self._bot_message(params, content)

    @bot_method("sendDocument")
    async def _send_document(self, params: Params) -> Any:
        self._target_chat(params)
        document = params.get("document")
        if isinstance(document, UploadedFile):
            if len(document.data) > MAX_DOCUMENT_UPLOAD_BYTES:
                raise BotAPIError(413, "Request Entity Too Large")
            mime_type = (
                mimetypes.guess_type(document.filename)[0]
                or document.content_type
                or "application/octet-stream"
            )
            stored = self.files.add(
                document.data,
                "documents",
                _extension(document.filename, mime_type),
                mime_type,
                file_name=document.filename,
            )
        elif isinstance(document, str) and (existing := self.files.get(document)):
            stored = existing
        elif document:
            raise bad_request("wrong file identifier/HTTP URL specified")
        else:
            raise bad_request("there is no document in the request")
        content: dict[str, Any] = {"document": _document_json(stored)}
        content.update(self._caption_content(params))
        return self._bot_message(params, content)

    @bot_method("sendChatAction")
    async def _send_chat_action(self, params: Params) -> Any:
        chat = self._target_chat(params)
        action = params.get("action")
        if action not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        self._chat_event(chat["id"], "chat_action", action=action)
        return True

    @bot_method("getFile")
    async def _get_file(self, params: Params) -> Any:
        stored = self.files.get(str(params.get("file_id") or ""))
        if stored is None:
            raise bad_request("wrong file_id or the file is temporarily unavailable")
        if stored.file_size > GETFILE_MAX_BYTES:
            raise bad_request("file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
            "file_path": stored.file_path,
        }

    @bot_method("editMessageText")
    async def _edit_message_text(self, params: Params) -> Any:
        message = self._editable_message(params)
        if "text" not in message:
            raise bad_request("there is no text in the message to edit")
        changes = self._text_content(params)
        markup = _inline_markup(params.get("reply_markup"))
        if markup is not None:
            changes["reply_markup"] = markup
        # Like Telegram, an edit without reply_markup removes the inline keyboard.
        return self._apply_edit(message, changes, drop=["text", "entities", "reply_markup"])

    @bot_method("editMessageCaption")
    async def _edit_message_caption(self, params: Params) -> Any:
        message = self._editable_message(params)
        if "text" in message:
            raise bad_request("there is no caption in the message to edit")
        changes = self._caption_content(params)
        markup = _inline_markup(params.get("reply_markup"))
        if markup is not None:
            changes["reply_markup"] = markup
        return self._apply_edit(
            message, changes, drop=["caption", "caption_entities", "reply_markup"]
        )

    @bot_method("editMessageReplyMarkup")
    async def _edit_message_reply_markup(self, params: Params) -> Any:
        message = self._editable_message(params)
        markup = _inline_markup(params.get("reply_markup"))
        changes = {"reply_markup": markup} if markup is not None else {}
        return self._apply_edit(message, changes, drop=["reply_markup"])

    @bot_method("deleteMessage")
    async def _delete_message(self, params: Params) -> Any:
        chat = self._target_chat(params)
        key = (chat["id"], params.get("message_id"))
        if key not in self._messages:
            raise bad_request("message to delete not found")
        del self._messages[key]
        self._chat_event(chat["id"], "deleted_message", message_id=key[1])
        return True

    @bot_method("answerCallbackQuery")
    async def _answer_callback_query(self, params: Params) -> Any:
        query = self._callback_queries.get(str(params.get("callback_query_id") or ""))
        if query is None or query["answered"]:
            raise bad_request("query is too old and response timeout expired or query ID is invalid")
        query["answered"] = True
        self._chat_event(
            query["chat_id"],
            "callback_answer",
            callback_query_id=params["callback_query_id"],
            text=params.get("text") or "",
            show_alert=bool(params.get("show_alert")),
            url=params.get("url") or "",
        )
        return True

    @bot_method("setMyCommands")
    async def _set_my_commands(self, params: Params) -> Any:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise bad_request("can't parse commands JSON object")
        cleaned = []
        for command in commands:
            if not isinstance(command, dict):
                raise bad_request("can't parse BotCommand JSON object")
            name = str(command.get("command", "")).removeprefix("/")
            description = str(command.get("description", ""))
            if not COMMAND_NAME.match(name):
                raise bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(description) <= 256:
                raise bad_request("command description must be non-empty")
            cleaned.append({"command": name, "description": description})
        self._commands[_commands_key(params)] = cleaned
        return True

    @bot_method("getMyCommands")
    async def _get_my_commands(self, params: Params) -> Any:
        return self._commands.get(_commands_key(params), [])

    @bot_method("deleteMyCommands")
    async def _delete_my_commands(self, params: Params) -> Any:
        self._commands.pop(_commands_key(params), None)
        return True

    @bot_method("setMyName")
    async def _set_my_name(self, params: Params) -> Any:
        self._bot_texts["name"] = str(params.get("name") or "")
        return True

    @bot_method("getMyName")
    async def _get_my_name(self, params: Params) -> Any:
        return {"name": self._bot_texts.get("name") or self.bot_user["first_name"]}

    @bot_method("setMyDescription")
    async def _set_my_description(self, params: Params) -> Any:
        self._bot_texts["description"] = str(params.get("description") or "")
        return True

    @bot_method("getMyDescription")
    async def _get_my_description(self, params: Params) -> Any:
        return {"description": self._bot_texts.get("description", "")}

    @bot_method("setMyShortDescription")
    async def _set_my_short_description(self, params: Params) -> Any:
        self._bot_texts["short_description"] = str(params.get("short_description") or "")
        return True

    @bot_method("getMyShortDescription")
    async def _get_my_short_description(self, params: Params) -> Any:
        return {"short_description": self._bot_texts.get("short_description", "")}

    @bot_method("setChatMenuButton")
    async def _set_chat_menu_button(self, params: Params) -> Any:
        return True

    @bot_method("getChatMenuButton")
    async def _get_chat_menu_button(self, params: Params) -> Any:
        return {"type": "commands"}


# --- helpers ---------------------------------------------------------------------------


def _json(body: dict[str, Any], status: int) -> web.Response:
    return web.json_response(body, status=status)


def _status_description(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return f"Bad Request: {phrase.lower()}" if status == 400 else phrase


def _trim(mapping: OrderedDict[Any, Any], limit: int) -> None:
    while len(mapping) > limit:
        mapping.popitem(last=False)


def _without_reply(message: dict[str, Any]) -> dict[str, Any]:
    # Telegram nests only one level: a quoted message does not carry its own quote.
    return copy.deepcopy({k: v for k, v in message.items() if k != "reply_to_message"})


def _document_json(stored: StoredFile) -> dict[str, Any]:
    document: dict[str, Any] = {
        "file_id": stored.file_id,
        "file_unique_id": stored.file_unique_id,
        "mime_type": stored.mime_type,
        "file_size": stored.file_size,
    }
    if stored.file_name:
        document["file_name"] = stored.file_name
    return document


def _extension(file_name: str, mime_type: str) -> str:
    suffix = file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    if suffix.isalnum() and len(suffix) <= 8:
        return suffix
    guessed = mimetypes.guess_extension(mime_type or "") or ".bin"
    return guessed.lstrip(".")


def _commands_key(params: Params) -> tuple[str, str]:
    scope = params.get("scope") or {}
    scope_type = scope.get("type", "default") if isinstance(scope, dict) else "default"
    return scope_type, str(params.get("language_code") or "")


def _inline_markup(markup: Any) -> dict[str, Any] | None:
    """The inline keyboard to store with a message (other keyboards are not part of it)."""
    if not markup or not isinstance(markup, dict) or "inline_keyboard" not in markup:
        return None
    rows = markup["inline_keyboard"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise bad_request("field \"inline_keyboard\" of the InlineKeyboardMarkup must be an Array of Arrays")
    for row in rows:
        for button in row:
            if not isinstance(button, dict) or not button.get("text"):
                raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
            if "callback_data" in button:
                size = len(str(button["callback_data"]).encode())
                if not 1 <= size <= MAX_CALLBACK_DATA_BYTES:
                    raise bad_request("BUTTON_DATA_INVALID")
            elif not any(key in button for key in ("url", "switch_inline_query", "web_app", "copy_text", "switch_inline_query_current_chat", "login_url", "pay", "callback_game")):
                raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
    return {"inline_keyboard": copy.deepcopy(rows)}

"""The emulator's state: the bot, users, chats, messages, pending updates, files and the
calls the bot made, with the API the *users'* side drives (`user_sends_photo`,
`next_bot_message`, `inject_fault`, ...), used by tests and the playground page.

Everything is in memory and bounded. These methods are not thread-safe: call them from
the event loop the emulator runs in.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import mimetypes
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .files import FileStore, PreparedPhoto, StoredFile, store_photo
from .formatting import with_detected_entities

Params = dict[str, Any]


@dataclass
class Fault:
    """A failure or stall `inject_fault` queued for the next calls of a method."""

    status: int | None
    retry_after: int | None
    delay: float | None
    remaining: int


class EmulatorState:
    """What the emulator holds, and the users' side of every chat. The limits bound the
    memory a long playground session can use; the oldest entries go first."""

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
        prepared: PreparedPhoto | None = None,
    ) -> dict[str, Any]:
        """A user sends a photo; the Message's `photo` lists thumbnails, then the original.

        Raises ValueError if `image_bytes` is not an image (a Telegram client would send
        such a file as a document instead). `prepared`: `prepare_photo(image_bytes)`,
        decoded already (off the event loop).
        """
        content: dict[str, Any] = {"photo": self._store_photo_set(image_bytes, prepared)}
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
                "message": clone(message),
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
        message = clone(found[0])
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
        return [clone(e) for e in self._chat_events.get(chat_id, ()) if e["seq"] > after]

    async def wait_chat_events(
        self, chat_id: int, after: int = 0, timeout: float = 25
    ) -> list[dict[str, Any]]:
        """Like chat_events, but waits up to `timeout` seconds for something to happen."""

        def has_new() -> bool:
            events = self._chat_events.get(chat_id)
            if not events:
                return False
            return events[-1]["seq"] > after

        await self._wait_until(has_new, timeout)
        return self.chat_events(chat_id, after)

    def chat_history(self, chat_id: int) -> list[dict[str, Any]]:
        """The chat's messages still held, oldest first, as they are now (after edits)."""
        return [clone(m) for (cid, _), m in self._messages.items() if cid == chat_id]

    def commands(self, language_code: str = "") -> list[dict[str, str]]:
        """The bot's command menu for private chats, as setMyCommands left it."""
        for key in (("default", language_code), ("default", "")):
            if key in self._commands:
                return clone(self._commands[key])
        return []

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        return clone(self._updates)

    # --- internals: waiting ----------------------------------------------------------

    def _notify(self) -> None:
        # One shared "something changed" event: every waiter re-checks its own condition.
        self._changed.set()
        self._changed = asyncio.Event()

    def _wake(self, changed: asyncio.Event) -> None:
        if changed is self._changed:  # else a change has set it already
            self._notify()

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
            # At the deadline every waiter wakes up and re-checks, as for a change: cheaper than
            # asyncio.wait_for (a task per wait), which counts, since every change wakes every
            # waiter (in the bot benchmark, 50 chats' readers).
            timer = loop.call_at(deadline, self._wake, changed)
            try:
                await changed.wait()
            finally:
                timer.cancel()

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
        self._queue_update("message", clone(message))
        return clone(message)

    def _new_message(
        self, chat: dict[str, Any], sender: dict[str, Any], content: dict[str, Any]
    ) -> dict[str, Any]:
        message_id = self._last_message_id.get(chat["id"], 0) + 1
        self._last_message_id[chat["id"]] = message_id
        return {
            "message_id": message_id,
            "from": clone(sender),
            "chat": clone(chat),
            "date": int(time.time()),
            **content,
        }

    def _record_message(self, message: dict[str, Any]) -> None:
        self._messages[(message["chat"]["id"], message["message_id"])] = message
        _trim(self._messages, self._max_messages)
        self._chat_event(message["chat"]["id"], "message", message=clone(message))

    def _chat_event(self, chat_id: int, kind: str, **payload: Any) -> None:
        events = self._chat_events.setdefault(chat_id, deque(maxlen=self._max_events_per_chat))
        events.append({"seq": next(self._event_seq), "type": kind, **payload})
        self._notify()

    def _queue_update(self, kind: str, payload: dict[str, Any]) -> None:
        self._updates.append({"update_id": next(self._update_ids), kind: payload})
        del self._updates[: -self._max_pending_updates]
        self._notify()

    def _store_photo_set(
        self, data: bytes, prepared: PreparedPhoto | None = None
    ) -> list[dict[str, Any]]:
        sizes = store_photo(self.files, data, prepared)
        for size in sizes:  # any size's file_id can be used to send the photo again
            self._photo_sets[size["file_id"]] = sizes
        _trim(self._photo_sets, 3 * self.files.max_files)
        return clone(sizes)

    def _record_call(self, name: str, params: Params) -> None:
        self.calls.append((name, params))
        if len(self.calls) > self._max_calls:
            # Long playground sessions must not grow without bound: drop the oldest tenth.
            dropped = max(1, self._max_calls // 10)
            del self.calls[:dropped]
            self._calls_trimmed += dropped
            self._consumed_calls = {i for i in self._consumed_calls if i >= self._calls_trimmed}
        self._notify()


# --- helpers ---------------------------------------------------------------------------

_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes})


def clone(value: Any) -> Any:
    """A deep copy of JSON-like data (what the emulator holds: dicts, lists and scalars), about
    three times faster than copy.deepcopy, which every message, update and event passes through
    several times; anything else is left to copy.deepcopy."""
    kind = type(value)
    if kind is dict:
        return {key: clone(item) for key, item in value.items()}
    if kind is list:
        return [clone(item) for item in value]
    if kind in _IMMUTABLE:
        return value
    return copy.deepcopy(value)


def _trim(mapping: OrderedDict[Any, Any], limit: int) -> None:
    while len(mapping) > limit:
        mapping.popitem(last=False)


def _without_reply(message: dict[str, Any]) -> dict[str, Any]:
    # Telegram nests only one level: a quoted message does not carry its own quote.
    return clone({k: v for k, v in message.items() if k != "reply_to_message"})


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

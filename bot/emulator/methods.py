"""The Bot API methods the emulator implements, each registered by `bot_method` under
Telegram's name, with the checks and error texts of the real API."""

from __future__ import annotations

import mimetypes
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import BotAPIError, bad_request
from .files import GETFILE_MAX_BYTES, image_info
from .formatting import parse_formatted, utf16_len, with_detected_entities
from .params import UploadedFile
from .state import EmulatorState, Params, _document_json, _extension, _without_reply, clone

MethodImpl = Callable[["BotAPIMethods", Params], Awaitable[Any]]

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

# Lower-cased method name -> (Telegram's spelling, implementation).
METHODS: dict[str, tuple[str, MethodImpl]] = {}


def bot_method(name: str) -> Callable[[MethodImpl], MethodImpl]:
    """Register a Bot API method. Telegram matches method names case-insensitively."""

    def register(impl: MethodImpl) -> MethodImpl:
        METHODS[name.lower()] = (name, impl)
        return impl

    return register


class BotAPIMethods(EmulatorState):
    """The Bot API methods, on the emulator's state; `METHODS` maps each name to one."""

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
        return clone(message)

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
        self._chat_event(message["chat"]["id"], "edited_message", message=clone(message))
        return clone(message)

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
        return [clone(update) for update in self._deliverable()[:limit]]

    def _confirm_updates(self, offset: int) -> None:
        if offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        elif offset < 0:
            self._updates = self._updates[offset:]

    def _deliverable(self) -> list[dict[str, Any]]:
        """The pending updates the bot wants, oldest first (not copied: callers copy what they
        hand out)."""

        def allowed(update: dict[str, Any]) -> bool:
            kind = next(k for k in update if k != "update_id")
            if self._allowed_updates is None:
                return kind not in DEFAULT_EXCLUDED_UPDATES
            return kind in self._allowed_updates

        # Updates of types the bot does not want are dropped, never delivered later.
        self._updates = [u for u in self._updates if allowed(u)]
        return self._updates

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
            sizes = clone(self._photo_sets[photo])
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
        # parameters are untyped JSON; a missing or odd message_id is simply not found
        key: Any = (chat["id"], params.get("message_id"))
        if key not in self._messages:
            raise bad_request("message to delete not found")
        del self._messages[key]
        self._chat_event(chat["id"], "deleted_message", message_id=key[1])
        return True

    @bot_method("answerCallbackQuery")
    async def _answer_callback_query(self, params: Params) -> Any:
        query = self._callback_queries.get(str(params.get("callback_query_id") or ""))
        if query is None or query["answered"]:
            raise bad_request(
                "query is too old and response timeout expired or query ID is invalid"
            )
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
        raise bad_request(
            'field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays'
        )
    for row in rows:
        for button in row:
            if not isinstance(button, dict) or not button.get("text"):
                raise bad_request(
                    "can't parse inline keyboard button: Text buttons are unallowed in the inline "
                    "keyboard"
                )
            if "callback_data" in button:
                size = len(str(button["callback_data"]).encode())
                if not 1 <= size <= MAX_CALLBACK_DATA_BYTES:
                    raise bad_request("BUTTON_DATA_INVALID")
            elif not any(
                key in button
                for key in (
                    "url",
                    "switch_inline_query",
                    "web_app",
                    "copy_text",
                    "switch_inline_query_current_chat",
                    "login_url",
                    "pay",
                    "callback_game",
                )
            ):
                raise bad_request(
                    "can't parse inline keyboard button: Text buttons are unallowed in the inline "
                    "keyboard"
                )
    return {"inline_keyboard": clone(rows)}

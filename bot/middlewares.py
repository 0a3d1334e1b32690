"""Cross-cutting concerns, kept out of the handlers.

- `UpdateContextMiddleware` (outer, every update): binds chat/user/update ids to the
  structlog context so every line logged while handling an update carries them, and
  counts updates in flight so shutdown can wait for their replies.
- `AllowlistMiddleware` (outer, messages and button presses): with `ALLOWED_USER_IDS`
  set, anyone else gets one refusal and is then ignored for a while.
- `RateLimitMiddleware` (inner, only handlers flagged `inference`): at most N requests
  per user per sliding minute; the first request over the limit gets a polite answer,
  the rest of that minute is ignored so a flood doesn't become a flood of replies.
- `ChatActionMiddleware` (the Bot API session, every call): a chat action ("typing...") that the
  chat is still showing is not sent again.
- `GetUpdatesMiddleware` (the Bot API session, getUpdates only): the base of what must happen
  to the updates a getUpdates returns before the next one confirms them to Telegram (the
  journal's write, bot/journaling.py; a Redis frontend's gate, bot/jobs/frontend.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from aiogram import BaseMiddleware, Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.dispatcher.flags import get_flag
from aiogram.methods import GetUpdates, SendChatAction, TelegramMethod
from aiogram.methods.base import Response, TelegramType
from aiogram.types import CallbackQuery, Message, TelegramObject, Update, User

from bot import texts
from bot.log import get_logger

log = get_logger("bot.updates")

Handler = Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]]

INFERENCE_FLAG = "inference"

# Test hook (the crash tests): a bot started with this set handles the first updates it gets,
# then never confirms them (it holds the next getUpdates), until it is killed.
HOLD_CONFIRM_ENV = "CAPTIONBOT_TEST_HOLD_CONFIRM"


class UpdateContextMiddleware(BaseMiddleware):
    def __init__(self) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """True when no update is being handled; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        assert isinstance(event, Update)
        user: User | None = data.get("event_from_user")
        chat = data.get("event_chat")
        message = event.message or (event.callback_query.message if event.callback_query else None)
        self._in_flight += 1
        self._idle.clear()
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(
            update_id=event.update_id,
            chat_id=chat.id if chat else None,
            user_id=user.id if user else None,
            message_id=message.message_id if message else None,
        ):
            try:
                return await handler(event, data)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
                log.debug("update_handled", ms=round((time.perf_counter() - started) * 1000, 1))


async def _tell(event: TelegramObject, text: str) -> None:
    """Answer a message or a button press with `text`; failures are logged, not raised."""
    try:
        if isinstance(event, Message):
            await event.reply(text, allow_sending_without_reply=True)
        elif isinstance(event, CallbackQuery):
            await event.answer(text, show_alert=True)
    except Exception as error:  # noqa: BLE001 - a refusal that can't be sent isn't fatal
        log.warning("notice_not_sent", error=f"{type(error).__name__}: {error}")


class AllowlistMiddleware(BaseMiddleware):
    def __init__(self, allowed_user_ids: Iterable[int], ignore_s: float = 600) -> None:
        self.allowed = frozenset(allowed_user_ids)
        self.ignore_s = ignore_s
        self._refused_at: dict[int, float] = {}

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        user: User | None = data.get("event_from_user")
        if not self.allowed or (user is not None and user.id in self.allowed):
            return await handler(event, data)
        if not await self._first_refusal(user.id if user is not None else 0):
            log.info("ignored_not_allowed")
            return None
        log.info("refused_not_allowed")
        await _tell(event, texts.NOT_ALLOWED)
        return None

    async def _first_refusal(self, user_id: int) -> bool:
        """True if `user_id` was not refused in the last `ignore_s` (and is now)."""
        now = time.monotonic()
        last = self._refused_at.get(user_id)
        if last is not None and now - last < self.ignore_s:
            return False
        self._forget_old(now)
        self._refused_at[user_id] = now
        return True

    def _forget_old(self, now: float) -> None:
        if len(self._refused_at) > 10_000:
            for uid, at in list(self._refused_at.items()):
                if now - at >= self.ignore_s:
                    del self._refused_at[uid]


class RateLimitMiddleware(BaseMiddleware):
    WINDOW_S = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._recent: dict[int, deque[float]] = {}
        self._noticed_until: dict[int, float] = {}

    async def __call__(self, handler: Handler, event: TelegramObject, data: dict[str, Any]) -> Any:
        user: User | None = data.get("event_from_user")
        if self.per_minute <= 0 or user is None or not get_flag(data, INFERENCE_FLAG):
            return await handler(event, data)
        retry_in = await self._admit(user.id)
        if retry_in is None:
            return await handler(event, data)
        if not await self._first_notice(user.id, retry_in):
            log.info("rate_limited_quietly")
            if isinstance(event, CallbackQuery):
                # A button press must always be answered, or the client shows a spinner.
                await _tell(event, texts.rate_limited(self.per_minute, retry_in))
            return None
        log.info("rate_limited", retry_in_s=retry_in)
        await _tell(event, texts.rate_limited(self.per_minute, retry_in))
        return None

    async def _admit(self, user_id: int) -> int | None:
        """None if the user is under the limit (the request counts), else seconds to wait."""
        now = time.monotonic()
        recent = self._recent.setdefault(user_id, deque())
        while recent and now - recent[0] >= self.WINDOW_S:
            recent.popleft()
        if len(recent) < self.per_minute:
            recent.append(now)
            if len(self._recent) > 10_000:
                self._forget_idle(now)
            return None
        return max(1, round(self.WINDOW_S - (now - recent[0])))

    async def _first_notice(self, user_id: int, retry_in: int) -> bool:
        """True for the first refusal of a limited stretch (it gets a notice)."""
        now = time.monotonic()
        if self._noticed_until.get(user_id, 0) > now:
            return False
        self._noticed_until[user_id] = now + retry_in
        return True

    def _forget_idle(self, now: float) -> None:
        for uid, stamps in list(self._recent.items()):
            if not stamps or now - stamps[-1] >= self.WINDOW_S:
                del self._recent[uid]
                self._noticed_until.pop(uid, None)


class ChatActionMiddleware(BaseRequestMiddleware):
    """Sends a chat action only if the chat is not showing it already.

    Telegram shows an action for 5 seconds, or until the bot's next message arrives in the chat.
    Each photo's reply shows "typing..." while it takes long (bot/service.py), so a chat with
    several photos in flight sent the same action once per photo: one Bot API call in four
    when photos queue (bench/bot_bench.py). The same action to the same chat (and thread) within
    `shown_s` of the last one, with no other call to that chat since, is answered True at once.
    Any other call naming the chat forgets its action once it is answered, whatever it was:
    at worst an action is sent that the chat still showed, as it always was.
    """

    def __init__(self, shown_s: float = 4.0) -> None:
        self.shown_s = shown_s  # under Telegram's 5 s, for the time a request takes
        # chat_id -> (action, thread, business connection, when it was sent)
        self._shown: dict[int | str, tuple[str, int | None, str | None, float]] = {}

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        if isinstance(method, SendChatAction):
            return await self._action(make_request, bot, method)
        chat_id = getattr(method, "chat_id", None)
        if chat_id is None:
            return await make_request(bot, method)
        try:
            return await make_request(bot, method)
        finally:
            self._shown.pop(chat_id, None)  # a message may have ended the action

    async def _action(
        self, make_request: NextRequestMiddlewareType[Any], bot: Bot, method: SendChatAction
    ) -> Any:
        now = time.monotonic()
        what = (method.action, method.message_thread_id, method.business_connection_id)
        shown = self._shown.get(method.chat_id)
        if shown is not None and shown[:3] == what and now - shown[3] < self.shown_s:
            return True  # what Telegram answers: the chat shows the action
        if len(self._shown) > 10_000:
            self._forget_old(now)
        record = (*what, now)
        self._shown[method.chat_id] = record  # before the call: actions sent together go once
        try:
            return await make_request(bot, method)
        except BaseException:
            if self._shown.get(method.chat_id) == record:
                del self._shown[method.chat_id]
            raise

    def _forget_old(self, now: float) -> None:
        for chat_id, shown in list(self._shown.items()):
            if now - shown[3] >= self.shown_s:
                del self._shown[chat_id]


# aiogram validates every Bot API reply with the pydantic model `Response[<what the method
# returns>]`, which pydantic keeps in a weak cache only: once the garbage collector takes it, the
# next reply rebuilds the model and its validator (1-5 ms on the event loop). In the bot benchmark
# that was about a tenth of the event loop's CPU per photo. Holding each one used keeps it built.
_response_types: dict[Any, type] = {}


async def keep_response_types(
    make_request: NextRequestMiddlewareType[TelegramType],
    bot: Bot,
    method: TelegramMethod[TelegramType],
) -> Response[TelegramType]:
    """Session middleware: keeps `Response[...]` for each Bot API method's result type alive."""
    returning = method.__returning__
    if returning not in _response_types:
        _response_types[returning] = Response[returning]  # type: ignore[valid-type]
    return await make_request(bot, method)


class GetUpdatesMiddleware(BaseRequestMiddleware):
    """Around getUpdates only: `before` runs before each call (the offset in it confirms every
    update the previous call returned), `received` with the updates each call returns, before
    the dispatcher sees them. Other calls pass through."""

    def __init__(self) -> None:
        self.hold_confirm = bool(os.environ.get(HOLD_CONFIRM_ENV))

    async def before(self) -> None:
        """Hook: wait here for what must happen before updates are confirmed."""

    def received(self, updates: list[Update]) -> None:
        """Hook: the updates a getUpdates returned (none: not called)."""

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        if not isinstance(method, GetUpdates):
            return await make_request(bot, method)
        await self.before()
        if self.hold_confirm and method.offset is not None:
            log.warning("test_holding_confirm", offset=method.offset)
            await asyncio.Event().wait()  # until SIGKILL
        # narrowed by isinstance, which aiogram's generic middleware type cannot follow
        response = await make_request(bot, method)  # type: ignore[arg-type]
        # aiogram's session hands middlewares the method's result (a list of updates).
        updates = getattr(response, "result", response)
        if isinstance(updates, list) and updates:
            self.received(updates)
        return response

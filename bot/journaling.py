"""The aiogram side of the one-process bot's journal (bot/journal.py): no accepted update is
lost when the process dies, and none is answered twice for it.

- `request_middleware` (the Bot API session): a getUpdates response is journaled, in one
  transaction, before the dispatcher sees it. aiogram polls one request at a time, so the
  next getUpdates, whose offset confirms those updates to Telegram, leaves only after that.
- `JournaledRequestHandler` (webhook mode): an authenticated update is journaled before the
  200 that confirms it.
- `update_middleware` (outer, inside the logging context's): an update the journal already
  knew (Telegram hands over again what was not confirmed before a crash) is not handled again;
  a handled one is marked done when its handler returns or fails. A cancelled handler (the
  process is going away) leaves its update pending, and so does one whose job the worker
  dropped at a graceful stop's deadline (`LeftForNextStart`): the next start answers it,
  instead of the user being asked to send it again.
- `replay` (at start, once the model is up): the updates still pending are handled again,
  as Telegram would have sent them; one that JOB_MAX_DELIVERIES starts found pending (a photo
  that takes the process down with it each time) gets an apology instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiogram import BaseMiddleware, Bot, Dispatcher
from aiogram.types import TelegramObject, Update
from aiogram.webhook.aiohttp_server import SimpleRequestHandler
from aiohttp import web

from bot import texts
from bot.journal import Journal, Pending
from bot.log import get_logger
from bot.middlewares import GetUpdatesMiddleware

log = get_logger("bot.journal")

REPLAYED = "journal_replayed"  # in a replayed update's handler data
_SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"

Tell = Callable[[int, int | None, str], Awaitable[None]]  # chat, message replied to, text


class LeftForNextStart(Exception):
    """Raised by a handler whose job the stopping worker dropped: its update stays pending."""


class Journaling:
    def __init__(self, journal: Journal, max_deliveries: int) -> None:
        self.journal = journal
        self.max_deliveries = max_deliveries
        self._known: set[int] = set()  # journaled before they arrived: not to be handled
        self._replays: set[asyncio.Task[Any]] = set()
        self.request_middleware = _JournalGetUpdates(self)
        self.update_middleware = _MarkDone(self)

    def accept(self, updates: list[tuple[int, str]]) -> None:
        known = self.journal.accept(updates)
        if known:
            log.info("updates_already_journaled", update_ids=sorted(known))
            self._known |= known

    def seen_before(self, update_id: int) -> bool:
        """True (once) for an update that was in the journal before it arrived."""
        if update_id in self._known:
            self._known.discard(update_id)
            return True
        return False

    def replay(self, dispatcher: Dispatcher, bot: Bot, tell: Tell) -> int:
        """Handles the updates still pending from an earlier run, each in a task of its own;
        returns how many."""
        pending = self.journal.take_pending()
        for entry in pending:
            task = asyncio.create_task(self._replay(entry, dispatcher, bot, tell))
            self._replays.add(task)
            task.add_done_callback(self._replays.discard)
        if pending:
            log.warning("replaying_pending_updates", count=len(pending))
        return len(pending)

    async def _replay(self, entry: Pending, dispatcher: Dispatcher, bot: Bot, tell: Tell) -> None:
        update = json.loads(entry.body)
        if entry.starts >= self.max_deliveries:
            log.error("update_gave_up", update_id=entry.update_id, starts=entry.starts)
            if (where := _reply_place(update)) is not None:
                with contextlib.suppress(Exception):  # tell() logs what it could not send
                    await tell(*where, texts.JOB_GAVE_UP)
            self.journal.done(entry.update_id)
            return
        log.info("update_replayed", update_id=entry.update_id, starts=entry.starts)
        try:
            await dispatcher.feed_raw_update(bot, update, **{REPLAYED: True})
        except Exception:  # logged, as aiogram's polling loop does; it would fail again
            log.exception("update_replay_failed", update_id=entry.update_id)
            self.journal.done(entry.update_id)

    def close(self) -> None:
        self.journal.close()


class _JournalGetUpdates(GetUpdatesMiddleware):
    def __init__(self, journaling: Journaling) -> None:
        super().__init__()
        self.journaling = journaling

    def received(self, updates: list[Update]) -> None:
        self.journaling.accept([(u.update_id, _as_json(u)) for u in updates])


class _MarkDone(BaseMiddleware):
    def __init__(self, journaling: Journaling) -> None:
        self.journaling = journaling

    async def __call__(self, handler: Any, event: TelegramObject, data: dict[str, Any]) -> Any:
        assert isinstance(event, Update)
        if not data.get(REPLAYED) and self.journaling.seen_before(event.update_id):
            return None  # handled (or being handled) from the journal already
        try:
            result = await handler(event, data)
        except LeftForNextStart:
            log.info("update_left_for_next_start", update_id=event.update_id)
            return None
        except Exception:
            self.journaling.journal.done(event.update_id)  # aiogram logs the error itself
            raise
        self.journaling.journal.done(event.update_id)
        return result


class JournaledRequestHandler(SimpleRequestHandler):
    """aiogram's webhook handler, journaling each authenticated update before the 200."""

    def __init__(self, journaling: Journaling, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.journaling = journaling

    async def handle(self, request: web.Request) -> web.Response:
        if self.verify_secret(request.headers.get(_SECRET_HEADER, ""), self.bot):
            body = await request.text()  # aiohttp keeps it for aiogram's own read
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.journaling.accept([(int(json.loads(body)["update_id"]), body)])
        return await super().handle(request)


def _as_json(update: Update) -> str:
    """The update as Telegram's JSON (11 us for a photo message)."""
    return update.model_dump_json(exclude_none=True, by_alias=True)


def _reply_place(update: dict[str, Any]) -> tuple[int, int | None] | None:
    """(chat id, message id) an apology for `update` goes to, if it has a chat."""
    message = update.get("message") or (update.get("callback_query") or {}).get("message")
    if not isinstance(message, dict):
        return None
    chat, reply_to = message.get("chat"), message.get("message_id")
    if not isinstance(chat, dict) or not isinstance(chat.get("id"), int):
        return None
    return chat["id"], reply_to if isinstance(reply_to, int) else None

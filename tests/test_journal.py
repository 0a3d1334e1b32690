"""The one-process bot's journal (bot/journal.py) and its webhook side (bot/journaling.py):
what is written, what a start finds pending, a broken or unwritable file, and that a write
survives the process being killed right after it."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from aiogram import Bot, Dispatcher
from aiogram.types import Message
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bot import texts
from bot.journal import DONE_KEEP_S, Journal, JournalError, bot_id_of
from bot.journaling import JournaledRequestHandler, Journaling

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def body(update_id: int, chat: int = 7, text: str = "hi") -> str:
    return json.dumps(
        {
            "update_id": update_id,
            "message": {
                "message_id": update_id * 10,
                "date": 1_700_000_000,
                "chat": {"id": chat, "type": "private"},
                "from": {"id": chat, "is_bot": False, "first_name": "A"},
                "text": text,
            },
        }
    )


def test_accepted_updates_are_pending_until_done_and_known_after(tmp_path):
    journal = Journal.open(tmp_path / "j.sqlite3", bot_id=42)
    assert journal.accept([(3, body(3)), (1, body(1)), (2, body(2))]) == set()
    journal.done(2)
    # Telegram hands 1 and 2 over again (not confirmed before a crash), and a new 4.
    assert journal.accept([(1, body(1)), (2, body(2)), (4, body(4))]) == {1, 2}
    journal.close()

    again = Journal.open(tmp_path / "j.sqlite3", bot_id=42)
    pending = again.take_pending()
    assert [(p.update_id, p.starts) for p in pending] == [(1, 1), (3, 1), (4, 1)]
    assert json.loads(pending[0].body)["message"]["text"] == "hi"
    again.close()
    # Each start that finds an update pending counts.
    third = Journal.open(tmp_path / "j.sqlite3", bot_id=42)
    assert [p.starts for p in third.take_pending()] == [2, 2, 2]
    assert third.pending_count() == 3


def test_two_bots_keep_their_updates_apart_in_one_file(tmp_path):
    first = Journal.open(tmp_path / "j.sqlite3", bot_id=1)
    second = Journal.open(tmp_path / "j.sqlite3", bot_id=2)
    first.accept([(5, body(5))])
    assert second.accept([(5, body(5))]) == set()  # the other bot's update 5 is another one
    second.done(5)
    assert [p.update_id for p in first.take_pending()] == [5]
    assert second.take_pending() == []


def test_done_rows_are_forgotten_after_two_days_pending_ones_never(tmp_path):
    journal = Journal.open(tmp_path / "j.sqlite3", bot_id=1)
    journal.accept([(1, body(1)), (2, body(2))])
    journal.done(1)
    journal.purge(now=time.time() + DONE_KEEP_S - 60)
    assert journal.accept([(1, body(1))]) == {1}  # still known
    journal.purge(now=time.time() + DONE_KEEP_S + 60)
    assert [p.update_id for p in journal.take_pending()] == [2]
    assert journal.accept([(1, body(1))]) == set()  # forgotten: new again


def test_a_file_that_is_not_a_journal_is_moved_aside(tmp_path):
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    journal = Journal.open(path, bot_id=1)
    journal.accept([(1, body(1))])
    assert [p.update_id for p in journal.take_pending()] == [1]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("j.sqlite3.broken-")]
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


def test_a_place_that_cannot_be_written_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(JournalError) as raised:
        Journal.open(blocker / "journal.sqlite3", bot_id=1)
    message = str(raised.value)
    assert "JOURNAL_FILE=" in message and "JOURNAL_FILE=off" in message and "\n" not in message


def test_the_bot_id_is_the_token_number():
    assert bot_id_of("123456:ABC-def") == 123456
    assert bot_id_of("nonsense") == 0


_ACCEPT_THEN_DIE = """
import os, signal, sys
from bot.journal import Journal
journal = Journal.open(sys.argv[1], bot_id=9)
journal.accept([(int(i), '{"update_id": %s}' % i) for i in range(1, 101)])
journal.done(50)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_was_accepted_survives_a_sigkill_right_after(tmp_path):
    path = tmp_path / "j.sqlite3"
    run = subprocess.run(
        [sys.executable, "-c", _ACCEPT_THEN_DIE, str(path)], cwd=REPO, timeout=60, check=False
    )
    assert run.returncode == -signal.SIGKILL
    pending = Journal.open(path, bot_id=9).take_pending()
    assert [p.update_id for p in pending] == [i for i in range(1, 101) if i != 50]


# ---- webhook: journaled before the 200 ------------------------------------------------------


async def test_a_webhook_update_is_journaled_before_its_200_and_done_after(tmp_path):
    journal = Journal.open(tmp_path / "j.sqlite3", bot_id=123)
    journaling = Journaling(journal, max_deliveries=3)
    dispatcher = Dispatcher()
    dispatcher.update.outer_middleware(journaling.update_middleware)
    release, seen = asyncio.Event(), []

    @dispatcher.message()
    async def slow(message: Message) -> None:
        seen.append(message.text)
        await release.wait()

    bot = Bot("123:secret-part")
    app = web.Application()
    JournaledRequestHandler(
        journaling, dispatcher=dispatcher, bot=bot, secret_token="s3cret", handle_in_background=True
    ).register(app, "/hook")
    async with TestClient(TestServer(app)) as client:
        wrong = await client.post("/hook", data=body(1), headers=_secret("nope"))
        assert wrong.status == 401
        answer = await client.post("/hook", data=body(2, text="photo"), headers=_secret("s3cret"))
        assert answer.status == 200
        # 200 given, the handler still running: the update is in the journal.
        assert _pending_ids(tmp_path) == [2]
        await _until(lambda: seen == ["photo"])
        # Telegram retries it (its 200 was lost): not handled twice.
        again = await client.post("/hook", data=body(2, text="photo"), headers=_secret("s3cret"))
        assert again.status == 200
        release.set()
        await _until(lambda: _pending_ids(tmp_path) == [])
        await asyncio.sleep(0.1)
        assert seen == ["photo"]
    await bot.session.close()


def _secret(value: str) -> dict[str, str]:
    return {"X-Telegram-Bot-Api-Secret-Token": value, "Content-Type": "application/json"}


def _pending_ids(tmp_path) -> list[int]:
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        rows = db.execute("SELECT update_id FROM updates WHERE done_at IS NULL ORDER BY 1")
        return [row[0] for row in rows]


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_pending_update_that_no_longer_parses_is_logged_and_dropped(tmp_path):
    journal = Journal.open(tmp_path / "j.sqlite3", bot_id=5)
    journal.accept(
        [(1, json.dumps({"update_id": 1, "message": {"chat": "garbage"}})), (2, body(2))]
    )
    journal.close()
    journaling = Journaling(Journal.open(tmp_path / "j.sqlite3", bot_id=5), max_deliveries=3)
    dispatcher, seen = Dispatcher(), []
    dispatcher.update.outer_middleware(journaling.update_middleware)

    @dispatcher.message()
    async def handle(message: Message) -> None:
        seen.append(message.message_id)

    async def tell(chat: int, reply_to: int | None, text: str) -> None:
        raise AssertionError("nobody is told anything: the update is not over its deliveries")

    bot = Bot("5:secret-part")
    assert journaling.replay(dispatcher, bot, tell) == 2
    await _until(lambda: journaling.journal.pending_count() == 0)
    assert seen == [20]  # update 2 handled; update 1 logged (update_replay_failed) and dropped
    await bot.session.close()


async def test_an_update_over_its_deliveries_gets_an_apology_where_it_came_from(tmp_path):
    journal = Journal.open(tmp_path / "j.sqlite3", bot_id=5)
    journal.accept([(3, body(3, chat=77)), (4, json.dumps({"update_id": 4}))])
    journal.take_pending()  # one start found them pending
    journal.close()
    journaling = Journaling(Journal.open(tmp_path / "j.sqlite3", bot_id=5), max_deliveries=2)
    told: list[tuple[int, int | None, str]] = []

    async def tell(chat: int, reply_to: int | None, text: str) -> None:
        told.append((chat, reply_to, text))

    bot = Bot("5:secret-part")
    journaling.replay(Dispatcher(), bot, tell)
    await _until(lambda: journaling.journal.pending_count() == 0)
    assert told == [(77, 30, texts.JOB_GAVE_UP)]  # update 4 has no chat to tell
    await bot.session.close()

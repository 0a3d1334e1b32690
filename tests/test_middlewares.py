"""The allowlist's ignore period, chat actions sent once while shown, and the health check's view
of a dead worker (in process)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest
import structlog.testing
from aiogram.exceptions import TelegramNetworkError
from aiogram.methods import GetFile, SendChatAction, SendMessage
from aiogram.types import User
from bot_helpers import REPO

from bot import health
from bot.middlewares import AllowlistMiddleware, ChatActionMiddleware
from bot.worker import InferenceWorker

pytestmark = pytest.mark.timeout(30)


async def test_a_refused_user_is_refused_again_once_the_ignore_period_is_over(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("bot.middlewares.time.monotonic", lambda: clock[0])
    allowlist = AllowlistMiddleware({1}, ignore_s=600)
    handled: list[int] = []

    async def handler(event, data):
        handled.append(data["event_from_user"].id)

    async def update_from(user_id: int) -> list[str]:
        with structlog.testing.capture_logs() as logs:
            await allowlist(
                handler,
                object(),
                {"event_from_user": User(id=user_id, is_bot=False, first_name="x")},
            )
        return [line["event"] for line in logs]

    assert await update_from(2) == ["refused_not_allowed"]
    clock[0] += 599
    assert await update_from(2) == ["ignored_not_allowed"]
    clock[0] += 1  # ALLOWLIST_IGNORE_S after the refusal: refused (once) again
    assert await update_from(2) == ["refused_not_allowed"]
    assert await update_from(2) == ["ignored_not_allowed"]
    assert await update_from(1) == [] and handled == [1]


async def test_a_chat_action_the_chat_still_shows_is_not_sent_again(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("bot.middlewares.time.monotonic", lambda: clock[0])
    actions = ChatActionMiddleware(shown_s=4)
    sent: list[str] = []
    failing = [False]

    async def make_request(bot, method):
        if failing[0]:
            raise TelegramNetworkError(method=method, message="down")
        sent.append(f"{type(method).__name__} {getattr(method, 'chat_id', '')}")
        return True

    async def call(method) -> None:
        await actions(make_request, None, method)

    def typing(chat: int = 1, action: str = "typing") -> SendChatAction:
        return SendChatAction(chat_id=chat, action=action)

    await call(typing())
    await call(typing())  # still shown: answered without a call
    await call(typing(chat=2))  # another chat
    await call(typing(action="upload_photo"))  # another action replaces the first
    await call(GetFile(file_id="x"))  # names no chat
    await call(typing(action="upload_photo"))
    assert sent == [
        "SendChatAction 1",
        "SendChatAction 2",
        "SendChatAction 1",
        "GetFile ",
    ]
    await call(SendMessage(chat_id=1, text="captions"))  # the message ends the action
    await call(typing())
    clock[0] += 4  # Telegram's indicator has (nearly) run out: sent again
    await call(typing())
    await call(typing())
    assert sent[4:] == ["SendMessage 1", "SendChatAction 1", "SendChatAction 1"]

    failing[0] = True  # an action that was not sent is not shown
    with pytest.raises(TelegramNetworkError):
        await call(typing(chat=3))
    failing[0] = False
    await call(typing(chat=3))
    assert sent[-1] == "SendChatAction 3"


class IdleCaptioner:
    def encode(self, images):
        return list(images)


def run_health_check(path) -> int:
    env = {**os.environ, "HEALTH_FILE": str(path), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "bot.health"], env=env, capture_output=True, timeout=30
    ).returncode


async def test_the_health_check_fails_once_the_worker_has_died(tmp_path, monkeypatch, stop_at_end):
    monkeypatch.setattr(health, "HEARTBEAT_EVERY_S", 0.05)
    worker = stop_at_end(InferenceWorker(IdleCaptioner()))
    crash = asyncio.Event()

    async def next_batch():
        await crash.wait()
        raise RuntimeError("the worker loop broke")

    monkeypatch.setattr(worker, "_next_batch", next_batch)
    await worker.start()
    path = tmp_path / "health"
    beating = asyncio.create_task(health.heartbeat(path, lambda: worker.running))
    try:
        await asyncio.sleep(0.2)
        assert path.exists() and worker.running
        assert await asyncio.to_thread(run_health_check, path) == 0
        crash.set()
        await asyncio.sleep(0.1)
        assert not worker.running
        last_beat = path.stat().st_mtime_ns
        await asyncio.sleep(0.3)
        assert path.stat().st_mtime_ns == last_beat  # no heartbeat from a dead worker
        stale = time.time() - health.STALE_AFTER_S - 1
        os.utime(path, (stale, stale))  # ...so STALE_AFTER_S later the check fails
        assert await asyncio.to_thread(run_health_check, path) == 1
    finally:
        beating.cancel()

"""End to end: the one-process bot (`python -m bot`, no QUEUE_URL) SIGKILLed with photos it
had accepted and not answered, then started again, against the Bot API emulator.

- Confirmed to Telegram, not answered (a test hook holds the worker's first batch): the
  restarted bot answers each photo from its journal, exactly once.
- Journaled, not yet confirmed (another hook holds the getUpdates that would confirm them):
  Telegram hands them over again and the journal has them too; each is answered once.
- A photo pending at JOB_MAX_DELIVERIES starts gets an apology, not another try.
- A graceful stop whose deadline strikes with photos unanswered leaves them for the next start
  (without the journal they are told to send again: test_bot_shutdown).
- Webhook mode: photos whose posts got their 200 are answered after a SIGKILL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from bot_helpers import (  # noqa: F401 (emu: fixture)
    TOKEN,
    BotProcess,
    bot_env,
    dump_output,
    emu,
    free_port,
    image_bytes,
    replies_to,
    start_until,
    wait_until,
)

from bot import texts
from bot.emulator import BotAPIEmulator
from bot.journal import Journal, bot_id_of
from bot.middlewares import HOLD_CONFIRM_ENV
from bot.worker import HOLD_JOBS_ENV

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]


def env(emu, tmp: Path, **overrides) -> dict[str, str]:
    settings = dict(
        CAPTIONER="untrained",
        RATE_LIMIT_PER_MIN=0,
        DEFAULT_SAMPLES=1,
        OMP_NUM_THREADS=1,
        INFERENCE_THREADS=1,
        BATCH_MAX=2,
    )
    return bot_env(emu.base_url, tmp, **{**settings, **overrides})


async def start(environment: dict[str, str], tmp: Path) -> BotProcess:
    return await start_until(environment, tmp, "bot_started")


async def kill(process: BotProcess) -> None:
    dump_output(process)
    if process.proc is not None and process.proc.returncode is None:
        process.proc.kill()
        await process.wait_exit(10)


def send_photos(emu, chats: range, per_chat: int) -> list[tuple[int, int]]:
    sent = []
    for chat in chats:
        for k in range(per_chat):
            photo = image_bytes(color=(chat % 256, 40 + k, 90))
            sent.append((chat, emu.user_sends_photo(chat, photo)["message_id"]))
    return sent


def pending_in_journal(tmp: Path) -> int:
    journal = Journal.open(tmp / "state" / "journal.sqlite3", bot_id_of(TOKEN))
    try:
        return journal.pending_count()
    finally:
        journal.close()


async def restart_answers_once_each(
    emu, tmp: Path, sent: list[tuple[int, int]], ready: str = "bot_started", **overrides
) -> BotProcess:
    """A new bot process gets every photo one caption answer, and no second one comes; its
    journal is empty after. Returns the process, stopped (its log lines kept)."""

    def all_answered() -> bool:
        return all(replies_to(emu, chat, mid, "Baseline decoder: ") for chat, mid in sent)

    bot = await start_until(env(emu, tmp, **overrides), tmp, ready)
    try:
        await wait_until(all_answered, 90, f"not every photo answered:\n{bot.output[-3000:]}")
        await asyncio.sleep(1.5)  # time for a duplicate to show
        for chat, mid in sent:
            assert len(replies_to(emu, chat, mid, "Baseline decoder: ")) == 1, (chat, mid)
        assert pending_in_journal(tmp) == 0
    finally:
        await bot.stop()
        dump_output(bot)
    return bot


async def test_photos_confirmed_but_not_answered_are_answered_after_a_sigkill(emu, tmp_path):
    first = await start(env(emu, tmp_path, **{HOLD_JOBS_ENV: 1}), tmp_path)
    try:
        sent = send_photos(emu, range(9301, 9304), per_chat=2)
        await first.wait_for_event("test_holding_jobs", timeout=30)
        # The bot's next getUpdates confirmed all six to Telegram: it will not send them again.
        await wait_until(lambda: not emu.pending_updates, 30, "updates not confirmed")
    finally:
        await kill(first)
    assert not any(replies_to(emu, chat, mid, "") for chat, mid in sent)
    assert pending_in_journal(tmp_path) == len(sent)

    second = await restart_answers_once_each(emu, tmp_path, sent)
    replayed = second.events("update_replayed")
    assert len(replayed) == len(sent) and {r["starts"] for r in replayed} == {1}


async def test_photos_journaled_before_confirming_are_answered_once_though_sent_again(
    emu, tmp_path
):
    hooks = {HOLD_JOBS_ENV: 1, HOLD_CONFIRM_ENV: 1}
    first = await start(env(emu, tmp_path, **hooks), tmp_path)
    try:
        sent = send_photos(emu, range(9311, 9313), per_chat=2)
        await first.wait_for_event("test_holding_confirm", timeout=30)
        await first.wait_for_event("test_holding_jobs", timeout=30)
    finally:
        await kill(first)
    assert len(emu.pending_updates) == len(sent)  # Telegram will hand them over again
    assert pending_in_journal(tmp_path) == len(sent)

    second = await restart_answers_once_each(emu, tmp_path, sent)
    known = {i for e in second.events("updates_already_journaled") for i in e["update_ids"]}
    assert len(known) == len(sent)  # the copies Telegram sent again were not handled


async def test_a_photo_pending_at_the_last_delivery_gets_an_apology(emu, tmp_path):
    first = await start(env(emu, tmp_path, **{HOLD_JOBS_ENV: 1}), tmp_path)
    try:
        [(chat, mid)] = send_photos(emu, range(9321, 9322), per_chat=1)
        await first.wait_for_event("test_holding_jobs", timeout=30)
        await wait_until(lambda: not emu.pending_updates, 30, "update not confirmed")
    finally:
        await kill(first)

    second = await start(env(emu, tmp_path, JOB_MAX_DELIVERIES=1), tmp_path)
    try:
        await wait_until(lambda: replies_to(emu, chat, mid, texts.JOB_GAVE_UP), 30, "no apology")
        await asyncio.sleep(1.0)
        assert not replies_to(emu, chat, mid, "Baseline decoder: ")
        assert second.events("update_gave_up")[0]["starts"] == 1
        assert pending_in_journal(tmp_path) == 0
    finally:
        await second.stop()
        dump_output(second)


async def test_photos_a_graceful_stop_could_not_answer_are_answered_by_the_next_start(
    emu, tmp_path
):
    first = await start(env(emu, tmp_path, SHUTDOWN_TIMEOUT_S=0.5, **{HOLD_JOBS_ENV: 1}), tmp_path)
    sent = send_photos(emu, range(9331, 9333), per_chat=2)
    try:
        await first.wait_for_event("test_holding_jobs", timeout=30)
        await wait_until(lambda: not emu.pending_updates, 30, "updates not confirmed")
        first.signal()  # SIGTERM: the held jobs miss the deadline
        assert await first.wait_exit(timeout=60) == 0, first.output[-3000:]
    finally:
        await kill(first)
    assert not any(replies_to(emu, chat, mid, "") for chat, mid in sent)  # nobody told to resend
    assert len(first.events("update_left_for_next_start")) == len(sent)
    assert pending_in_journal(tmp_path) == len(sent)

    await restart_answers_once_each(emu, tmp_path, sent)


async def test_in_webhook_mode_photos_given_their_200_are_answered_after_a_sigkill(tmp_path):
    port = free_port()
    hook = dict(
        MODE="webhook",
        WEBHOOK_URL="https://bot.example.org/hook",
        WEBHOOK_SECRET="s3cret",
        WEBHOOK_HOST="127.0.0.1",
        WEBHOOK_PORT=port,
    )
    async with BotAPIEmulator(bot_token=TOKEN) as emu:  # its own: this one gets a webhook set
        first = await start_until(
            env(emu, tmp_path, **hook, **{HOLD_JOBS_ENV: 1}), tmp_path, "webhook_listening"
        )
        sent = []
        try:
            secret = {"X-Telegram-Bot-Api-Secret-Token": "s3cret"}
            async with aiohttp.ClientSession(headers=secret) as http:
                for update_id, chat in enumerate(range(9341, 9344), 1):
                    message = emu.user_sends_photo(chat, image_bytes(color=(chat % 256, 7, 7)))
                    update = {"update_id": update_id, "message": message}
                    async with http.post(f"http://127.0.0.1:{port}/hook", json=update) as posted:
                        assert posted.status == 200  # confirmed: Telegram would not send it again
                    sent.append((chat, message["message_id"]))
            await first.wait_for_event("test_holding_jobs", timeout=30)
        finally:
            await kill(first)
        assert pending_in_journal(tmp_path) == len(sent)
        second = await restart_answers_once_each(
            emu, tmp_path, sent, ready="webhook_listening", **hook
        )
        assert len(second.events("update_replayed")) == len(sent)

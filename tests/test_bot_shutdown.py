"""Graceful shutdown: SIGTERM with jobs queued; every accepted photo is answered, exit 0."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from bot_helpers import TOKEN, dump_output, image_bytes, start_bot

from bot import texts
from bot.emulator import BotAPIEmulator

pytestmark = [pytest.mark.timeout(120)]


async def accepted_photos(emu: BotAPIEmulator, chats) -> dict[int, dict]:
    """A 900 px photo from each chat, once the bot has fetched them all (accepted them)."""
    photo = image_bytes("JPEG", (900, 900), quality=95)
    sent = {chat: emu.user_sends_photo(chat, photo) for chat in chats}
    for _ in sent:
        await emu.wait_for_call("getFile", timeout=30)
    return sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_finishes_the_accepted_jobs_and_replies_before_exit(tmp_path, sig):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        # One job per batch, so the queue is still full of work when the signal comes.
        bot = await start_bot(emu, tmp_path, BATCH_MAX=1, QUEUE_MAX=50, SHUTDOWN_TIMEOUT_S=60)
        chats = list(range(4001, 4011))
        sent = await accepted_photos(emu, chats)
        bot.signal(sig)
        code = await bot.wait_exit(timeout=90)
        dump_output(bot)
        assert code == 0, bot.output[-3000:]

        shutting_down = bot.events("shutting_down")
        assert shutting_down, bot.output[-2000:]
        # The test means something only if work was still pending at the signal.
        assert shutting_down[0]["updates_in_flight"] >= 2, shutting_down
        for chat in chats:
            reply = await emu.next_bot_message(chat, timeout=1)
            assert "Baseline decoder:" in reply["text"]
            assert reply["reply_to_message"]["message_id"] == sent[chat]["message_id"]
        assert bot.events("stopped")
        assert not [line for line in bot.lines if "Traceback" in line]


async def test_updates_sent_during_the_drain_are_left_for_the_next_run(tmp_path):
    """Stopping means no new updates are taken, even while accepted photos are still being
    answered: Telegram keeps them for the next start."""
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        bot = await start_bot(emu, tmp_path, BATCH_MAX=1, SHUTDOWN_TIMEOUT_S=60)
        await accepted_photos(emu, range(4101, 4109))
        bot.signal(signal.SIGTERM)
        await bot.wait_for_event("shutting_down", timeout=30)
        emu.user_sends_text(4100, "/help")
        sent_before = len(emu.calls)
        assert await bot.wait_exit(timeout=60) == 0
        replies_after = [
            p["chat_id"] for name, p in emu.calls[sent_before:] if name == "sendMessage"
        ]
        assert replies_after, "the drain was over before /help arrived: the test proved nothing"
        assert 4100 not in replies_after
        assert [u["message"]["text"] for u in emu.pending_updates] == ["/help"]


async def test_replies_retried_during_an_outage_do_not_outlast_the_shutdown_timeout(tmp_path):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        bot = await start_bot(emu, tmp_path, SHUTDOWN_TIMEOUT_S=4, SEND_RETRY_TIMEOUT_S=60)
        emu.inject_fault("sendMessage", status=502, times=100_000)  # Telegram is down
        emu.user_sends_photo(4150, image_bytes())
        await bot.wait_for_event("telegram_retry", timeout=60)
        started = time.monotonic()
        bot.signal(signal.SIGTERM)
        code = await bot.wait_exit(timeout=90)
        took = time.monotonic() - started
        dump_output(bot)
        assert code == 0, bot.output[-3000:]
        assert [e["method"] for e in bot.events("telegram_gave_up")] == ["sendMessage"]
        assert took < 4 + 3, f"exited {took:.1f} s after SIGTERM with SHUTDOWN_TIMEOUT_S=4"


async def test_without_a_journal_photos_not_captioned_by_the_timeout_are_told_to_resend(tmp_path):
    """With the journal (the default) they wait for the next start instead: test_journal_e2e."""
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        # 48 photos one at a time take far longer than 0.05 s (each 10-20 ms on a fast machine,
        # more under load), so the timeout strikes with photos still queued. With 20 photos and
        # 0.3 s a fast machine once answered them all in time.
        bot = await start_bot(
            emu, tmp_path, BATCH_MAX=1, QUEUE_MAX=50, SHUTDOWN_TIMEOUT_S=0.05, JOURNAL_FILE="off"
        )
        chats = list(range(4161, 4209))
        await accepted_photos(emu, chats)
        bot.signal(signal.SIGTERM)
        assert await bot.wait_exit(timeout=60) == 0, bot.output[-3000:]
        replies = [await emu.next_bot_message(chat, timeout=1) for chat in chats]
        restarting = [r for r in replies if r["text"] == texts.RESTARTING]
        assert restarting, [r["text"][:40] for r in replies]
        assert all(
            r["text"] == texts.RESTARTING or "Baseline decoder:" in r["text"] for r in replies
        )
        assert any(e["outcome"] == "stopped" for e in bot.events("job"))


async def test_sigterm_while_the_model_is_still_loading_exits_cleanly(tmp_path):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        from bot_helpers import BotProcess, bot_env

        bot = BotProcess(bot_env(emu.base_url, tmp_path), cwd=tmp_path)
        await bot.start()
        await bot.wait_for_event("starting", timeout=30)
        await asyncio.sleep(0.2)  # importing torch and loading the model take seconds
        assert not bot.events("bot_started")
        bot.signal(signal.SIGTERM)
        assert await bot.wait_exit(timeout=60) == 0
        assert not [name for name, _ in emu.calls if name == "getUpdates"]


async def test_buttons_keep_working_after_a_restart(tmp_path):
    """The new process knows nothing of the photo: the button's message (a reply to the
    photo) is enough to find, download and encode it again."""
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        chat = 4200
        first = await start_bot(emu, tmp_path)
        emu.user_sends_photo(chat, image_bytes())
        caption_reply = await emu.next_bot_message(chat, timeout=30)
        assert await first.stop() == 0

        second = await start_bot(emu, tmp_path)
        try:
            more = caption_reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
            downloads = len([1 for name, _ in emu.calls if name == "getFile"])
            emu.user_presses_button(chat, caption_reply["message_id"], more)
            samples = await emu.next_bot_message(chat, timeout=30)
            assert samples["text"].count("\n1. ") == 1 and "\n3. " in samples["text"]
            assert len([1 for name, _ in emu.calls if name == "getFile"]) == downloads + 1
        finally:
            assert await second.stop() == 0

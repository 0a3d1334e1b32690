"""How `python -m bot` starts: webhook mode, the playground, and clear start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import aiohttp
import pytest
from bot_helpers import (
    TOKEN,
    BotProcess,
    bot_env,
    dump_output,
    free_port,
    image_bytes,
    without_torch,
)

from bot.emulator import BotAPIEmulator

pytestmark = [pytest.mark.timeout(120)]

SECRET_PART = TOKEN.split(":", 1)[1]


def run_bot_sync(
    env: dict[str, str], cwd, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


async def test_webhook_mode_checks_the_secret_and_answers_updates(tmp_path):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        port = free_port()
        secret = "hook-secret_123"
        env = bot_env(
            emu.base_url,
            tmp_path,
            MODE="webhook",
            WEBHOOK_URL="https://bot.example.org/tg/hook",
            WEBHOOK_SECRET=secret,
            WEBHOOK_HOST="127.0.0.1",
            WEBHOOK_PORT=port,
        )
        bot = BotProcess(env, cwd=tmp_path)
        await bot.start()
        try:
            await bot.wait_for_event("webhook_listening", timeout=120)
            hook = await emu.wait_for_call("setWebhook", timeout=10)
            assert hook["url"] == "https://bot.example.org/tg/hook"
            assert hook["secret_token"] == secret

            chat = 5001
            message = emu.user_sends_text(chat, "/help")
            update = {"update_id": 1, "message": message}
            url = f"http://127.0.0.1:{port}/tg/hook"
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"}
                ) as forged:
                    assert forged.status == 401
                with pytest.raises(TimeoutError):
                    await emu.next_bot_message(chat, timeout=1)
                async with http.post(
                    url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret}
                ) as genuine:
                    assert genuine.status == 200
                reply = await emu.next_bot_message(chat, timeout=30)
                assert "/sample" in reply["text"]
                async with http.get(f"http://127.0.0.1:{port}/healthz") as health:
                    assert health.status == 200 and (await health.json())["ok"] is True
            health_check = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "bot.health"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                timeout=30,
            )
            assert health_check.returncode == 0
        finally:
            code = await bot.stop()
            dump_output(bot)
        assert code == 0, bot.output[-3000:]
        assert SECRET_PART not in bot.output and secret not in bot.output
        # Stopped: the heartbeat file is gone, so the health check fails.
        after = subprocess.run(
            [sys.executable, "-m", "bot.health"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=30,
        )
        assert after.returncode == 1


async def test_sigterm_in_webhook_mode_answers_the_accepted_photos_before_exit(tmp_path):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        port = free_port()
        env = bot_env(
            emu.base_url,
            tmp_path,
            MODE="webhook",
            WEBHOOK_URL="https://bot.example.org/hook",
            WEBHOOK_SECRET="s3cret",
            WEBHOOK_HOST="127.0.0.1",
            WEBHOOK_PORT=port,
            BATCH_MAX=1,
            SHUTDOWN_TIMEOUT_S=60,
        )
        bot = BotProcess(env, cwd=tmp_path)
        await bot.start()
        chats = list(range(5101, 5107))
        try:
            await bot.wait_for_event("webhook_listening", timeout=120)
            photo = image_bytes("JPEG", (900, 900), quality=95)
            async with aiohttp.ClientSession(
                headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret"}
            ) as http:
                for update_id, chat in enumerate(chats, 1):
                    message = emu.user_sends_photo(chat, photo)
                    async with http.post(
                        f"http://127.0.0.1:{port}/hook",
                        json={"update_id": update_id, "message": message},
                    ) as posted:
                        assert posted.status == 200
            for _ in chats:  # all fetched: accepted
                await emu.wait_for_call("getFile", timeout=30)
        finally:
            code = await bot.stop(timeout=90)
            dump_output(bot)
        assert code == 0, bot.output[-3000:]
        assert bot.events("shutting_down")[0]["updates_in_flight"] >= 2, bot.output[-2000:]
        for chat in chats:
            assert "Baseline decoder:" in (await emu.next_bot_message(chat, timeout=1))["text"]
        assert bot.events("stopped")


@pytest.mark.parametrize("with_token", [False, True])
async def test_playground_runs_the_bot_against_the_built_in_emulator(tmp_path, with_token):
    env = bot_env("http://127.0.0.1:9", tmp_path, PLAYGROUND_PORT=0, LOG_FORMAT="console")
    args: tuple[str, ...] = ("--playground",) if with_token else ()
    if not with_token:
        del env["TELEGRAM_BOT_TOKEN"], env["TELEGRAM_API_BASE"]
    bot = BotProcess(env, cwd=tmp_path, args=args)
    await bot.start()
    try:
        line = await bot.wait_for_line(
            lambda text: text.startswith("Playground: open "), timeout=60
        )
        page = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        await bot.wait_for_line(lambda text: "bot_started" in text, timeout=120)
        chat = 77
        async with aiohttp.ClientSession() as http:
            async with http.get(page) as index:
                assert index.status == 200
                token = re.search(
                    r'name="playground-token" content="([^"]+)"', await index.text()
                ).group(1)
            async with http.post(
                f"{page}api/chats/{chat}/messages",
                json={"text": "/help"},
                headers={"X-Playground-Token": token},
            ) as posted:
                assert posted.status == 200
            bot_texts: list[str] = []
            after = 0
            for _ in range(10):  # bounded: 10 polls of at most 5 s
                async with http.get(
                    f"{page}api/chats/{chat}/events", params={"after": after, "timeout": 5}
                ) as polled:
                    events = (await polled.json())["events"]
                for event in events:
                    after = max(after, event["seq"])
                    message = event.get("message") or {}
                    if event["type"] == "message" and message.get("from", {}).get("is_bot"):
                        bot_texts.append(message.get("text", ""))
                if bot_texts:
                    break
            assert bot_texts and "/sample" in bot_texts[0]
    finally:
        code = await bot.stop()
        dump_output(bot)
    assert code == 0, bot.output[-3000:]
    assert SECRET_PART not in bot.output


def test_webhook_mode_without_a_token_says_what_is_missing(tmp_path):
    env = bot_env("http://127.0.0.1:9", tmp_path, MODE="webhook")
    del env["TELEGRAM_BOT_TOKEN"]
    result = run_bot_sync(env, tmp_path)
    assert result.returncode == 2
    assert "TELEGRAM_BOT_TOKEN" in result.stderr and "@BotFather" in result.stderr
    assert "WEBHOOK_URL" in result.stderr and "WEBHOOK_SECRET" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_settings_are_all_reported_and_the_token_is_not_echoed(tmp_path):
    broken_token = TOKEN + " oops"
    env = bot_env(
        "not-a-url",
        tmp_path,
        TELEGRAM_BOT_TOKEN=broken_token,
        QUEUE_MAX="lots",
        BATCH_WAIT_MS="-5",
        DEVICE="tpu",
    )
    result = run_bot_sync(env, tmp_path)
    assert result.returncode == 2
    for name in ("TELEGRAM_BOT_TOKEN", "TELEGRAM_API_BASE", "QUEUE_MAX", "BATCH_WAIT_MS", "DEVICE"):
        assert name in result.stderr
    assert SECRET_PART not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_settings_come_from_a_dotenv_file_in_the_working_directory(tmp_path):
    env = bot_env("http://127.0.0.1:9", tmp_path)
    del env["TELEGRAM_BOT_TOKEN"]
    env["MODE"] = "webhook"
    (tmp_path / ".env").write_text("QUEUE_MAX=zero\n")
    result = run_bot_sync(env, tmp_path)
    assert result.returncode == 2 and "QUEUE_MAX" in result.stderr


def start_up_error(result: subprocess.CompletedProcess) -> dict:
    """The `cannot_start` log record of a bot that exited 2 at start, its token never shown."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert SECRET_PART not in result.stdout + result.stderr
    return next(
        json.loads(line)
        for line in result.stdout.splitlines()
        if line.startswith("{") and "cannot_start" in line
    )


def test_missing_weights_are_a_clear_start_up_error(tmp_path):
    env = bot_env(
        "http://127.0.0.1:9", tmp_path, CAPTIONER="bundled", WEIGHTS_DIR=tmp_path / "nowhere"
    )
    record = start_up_error(run_bot_sync(env, tmp_path))
    assert "WEIGHTS_DIR" in record["reason"] and "CAPTIONER=untrained" in record["reason"]


def test_partial_or_corrupt_weights_are_a_clear_start_up_error(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "vocab.json").write_text("not json")
    (weights / "encoder.json").write_text("{}")
    env = bot_env("http://127.0.0.1:9", tmp_path, CAPTIONER="bundled", WEIGHTS_DIR=weights)
    result = run_bot_sync(env, tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "cannot_start" in result.stdout and "WEIGHTS_DIR" in result.stdout


def test_weights_without_a_bundle_where_torch_is_missing_are_a_clear_start_up_error(tmp_path):
    """As in the Docker image (no torch) with other weights mounted: no bundle can be built."""
    env = bot_env("http://127.0.0.1:9", tmp_path, CAPTIONER="bundled")
    env["PYTHONPATH"] = os.pathsep.join([without_torch(tmp_path), env["PYTHONPATH"]])
    env["CAPTION_CACHE_DIR"] = str(tmp_path / "empty-cache")
    record = start_up_error(run_bot_sync(env, tmp_path))
    assert "needs torch" in record["reason"] and "rebuild the image" in record["reason"]


async def test_an_unreachable_api_is_retried_then_reported_without_the_token(tmp_path):
    port = free_port()  # nothing listens there
    bot = BotProcess(
        bot_env(f"http://127.0.0.1:{port}", tmp_path, SEND_RETRY_TIMEOUT_S=2), cwd=tmp_path
    )
    await bot.start()
    try:
        code = await bot.wait_exit(timeout=90)
    finally:
        if bot.proc and bot.proc.returncode is None:
            bot.proc.kill()
    dump_output(bot)
    # Retried within the budget, then gave up with an exit code for the supervisor
    # (Docker's restart policy) to act on.
    assert code == 1, bot.output[-2000:]
    assert bot.events("telegram_retry") and bot.events("telegram_gave_up")
    assert bot.events("crashed")
    assert SECRET_PART not in bot.output

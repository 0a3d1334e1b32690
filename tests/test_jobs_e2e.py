"""End to end with QUEUE_URL: real bot processes (`python -m bot --role ...`) against the
Bot API emulator and a real redis-server.

- One frontend and one worker answer photos, commands and buttons as the one-process bot does.
- The crash test: one frontend and three workers, 100 photos from 30 chats; one worker is
  SIGKILLed while it holds a batch (a test hook makes it hold its first batch), and the
  frontend is SIGKILLed once mid-run, after it enqueued updates but before it confirmed
  them (another hook), and restarted: Telegram hands it those updates again. Every photo
  still gets exactly one caption answer, nothing stays pending, and the reclaimed jobs
  were delivered twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from bot_helpers import (  # noqa: F401 (emu: fixture)
    TOKEN,
    BotProcess,
    bot_env,
    dump_output,
    emu,
    image_bytes,
    numbered_lines,
    replies_to,
    start_until,
    wait_until,
)
from redis_helpers import redis_server  # noqa: F401 (fixture)

from bot.jobs.consumer import HOLD_BATCH_ENV
from bot.middlewares import HOLD_CONFIRM_ENV

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

PREFIX = "captionbot:" + TOKEN.split(":")[0]  # keys are per bot


def queue_env(emu, redis_server, tmp: Path, **overrides) -> dict[str, str]:
    settings = dict(
        QUEUE_URL=redis_server.url,
        CAPTIONER="untrained",
        RATE_LIMIT_PER_MIN=0,
        QUEUE_MAX=1000,
        DEFAULT_SAMPLES=2,
        OMP_NUM_THREADS=1,
        INFERENCE_THREADS=1,
    )
    return bot_env(emu.base_url, tmp, **{**settings, **overrides})


async def start_role(role: str, env: dict[str, str], tmp: Path, ready: str) -> BotProcess:
    return await start_until(env, tmp, ready, args=("--role", role))


def kill(process: BotProcess) -> None:
    if process.proc is not None and process.proc.returncode is None:
        process.proc.send_signal(signal.SIGKILL)


def caption_answers(emu, chat: int, photo_message_id: int) -> list[dict]:
    return replies_to(emu, chat, photo_message_id, "Baseline decoder: ")


@pytest_asyncio.fixture(loop_scope="module")
async def redis(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


async def test_a_frontend_and_a_worker_answer_photos_commands_and_buttons(
    emu, redis_server, redis, tmp_path
):
    env = queue_env(emu, redis_server, tmp_path)
    worker = await start_role("worker", env, tmp_path, "worker_started")
    frontend = await start_role(
        "frontend", {**env, "HEALTH_FILE": str(tmp_path / "fh")}, tmp_path, "bot_started"
    )
    try:
        chat = 9101
        sent = emu.user_sends_photo(chat, image_bytes())
        reply = await emu.next_bot_message(chat, timeout=30)
        assert reply["reply_to_message"]["message_id"] == sent["message_id"]
        assert len(numbered_lines(reply["text"])) == 2
        emu.user_sends_text(chat, "/sample 4 0.5", reply_to_message_id=reply["message_id"])
        samples = await emu.next_bot_message(chat, timeout=30)
        assert len(numbered_lines(samples["text"])) == 4
        button = reply["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
        emu.user_presses_button(chat, reply["message_id"], button)
        figure = await emu.next_bot_message(chat, timeout=30)
        assert figure.get("photo_bytes") or figure.get("document_bytes")
        emu.user_sends_text(chat, "/help")
        assert "/sample" in (await emu.next_bot_message(chat, timeout=30))["text"]
        # Each role keeps its own heartbeat for `python -m bot.health`.
        await wait_until(
            lambda: (tmp_path / "health").exists() and (tmp_path / "fh").exists(),
            10,
            "no heartbeat files",
        )
        await worker.wait_for_event("job_done", timeout=10, count=3)  # acked after replying
        assert (await redis.xpending(f"{PREFIX}:jobs", "workers"))["pending"] == 0
        assert len(frontend.events("job_enqueued")) == 3
    finally:
        codes = [await frontend.stop(), await worker.stop()]
        dump_output(frontend)
        dump_output(worker)
    assert codes == [0, 0], frontend.output[-2000:] + worker.output[-2000:]


@pytest.mark.slow
async def test_sigkilled_worker_and_frontend_lose_no_photo_and_answer_each_once(
    emu, redis_server, redis, tmp_path
):
    env = queue_env(emu, redis_server, tmp_path, JOB_CLAIM_IDLE_MS=2000, BATCH_MAX=8)
    chats = [9200 + i for i in range(30)]
    # The first worker holds the first batch it reads until it is killed. It starts (and
    # blocks on XREADGROUP) before the others, so it is first in line for the first photo.
    held = await start_role(
        "worker",
        {**env, HOLD_BATCH_ENV: "1", "HEALTH_FILE": str(tmp_path / "h1")},
        tmp_path,
        "worker_started",
    )
    workers = [held] + list(
        await asyncio.gather(
            *(
                start_role(
                    "worker",
                    {**env, "HEALTH_FILE": str(tmp_path / f"h{i}")},
                    tmp_path,
                    "worker_started",
                )
                for i in (2, 3)
            )
        )
    )
    frontend = await start_role(
        "frontend",
        {**env, "HEALTH_FILE": str(tmp_path / "fh"), HOLD_CONFIRM_ENV: "1"},
        tmp_path,
        "bot_started",
    )
    processes = [*workers, frontend]
    photos: list[tuple[int, int]] = []  # (chat, photo message id)

    def send(count: int) -> None:
        for _ in range(count):
            chat = chats[len(photos) % len(chats)]
            photos.append((chat, emu.user_sends_photo(chat, image_bytes())["message_id"]))

    def answered() -> int:
        return sum(1 for chat, mid in photos if caption_answers(emu, chat, mid))

    try:
        send(40)
        # The frontend enqueued what its first getUpdates returned, and holds the next one.
        await frontend.wait_for_event("test_holding_confirm", timeout=30)
        first = len(frontend.events("job_enqueued"))
        [holding] = await held.wait_for_event("test_holding_batch", timeout=30)
        kill(held)
        await wait_until(
            lambda: answered() >= min(first - len(holding["update_ids"]), 10),
            60,
            "no progress after the worker died",
        )
        send(30)
        kill(frontend)
        await frontend.wait_exit(10)
        send(30)  # while no frontend runs: they wait, unconfirmed, in the Bot API
        frontend = await start_role(
            "frontend", {**env, "HEALTH_FILE": str(tmp_path / "fh")}, tmp_path, "bot_started"
        )
        processes.append(frontend)
        await wait_until(lambda: answered() == len(photos), 120, "some photos were never answered")
        # A job is acknowledged just after its answer is sent.
        await wait_until(
            lambda: len({e["update_id"] for p in workers for e in p.events("job_done")}) == 100,
            30,
            "some jobs were never acknowledged",
        )
        await asyncio.sleep(1.0)  # time for a late duplicate to show up
        counts = [len(caption_answers(emu, chat, mid)) for chat, mid in photos]
        assert len(photos) == 100 and counts == [1] * 100
        assert (await redis.xpending(f"{PREFIX}:jobs", "workers"))["pending"] == 0
        # The restarted frontend got the enqueued-but-unconfirmed updates again: no new jobs.
        assert len(frontend.events("job_duplicate")) == first
        assert len(frontend.events("job_enqueued")) == 100 - first
        # The held batch was reclaimed: its jobs were delivered (at least) twice.
        for update_id in holding["update_ids"]:
            record = json.loads(await redis.get(f"{PREFIX}:reply:{update_id}"))
            assert record["deliveries"] >= 2 and record["by"] != holding["consumer"], record
        done = [e for p in workers[1:] for e in p.events("job_done")]
        assert {e["update_id"] for e in done if e["deliveries"] > 1} >= set(holding["update_ids"])
        assert len({e["update_id"] for e in done}) == len(done)  # each job finished once
    finally:
        codes = []
        for process in processes:
            if process.proc.returncode is None:
                codes.append(await process.stop())
            dump_output(process)
    assert codes == [0, 0, 0], "\n".join(p.output[-1500:] for p in processes)

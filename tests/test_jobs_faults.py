"""Faults with QUEUE_URL, end to end: real bot processes against the Bot API emulator and a
real redis-server of the test's own (untrained captioner: only the flow matters here).

- A webhook frontend answers 200 only once the job is in the stream (while Redis is
  frozen, the request waits), and the same update delivered twice makes one job.
- A worker whose Redis goes away mid-run retries with backoff, never exits, and answers
  again once Redis is back on the same port (empty: it makes its consumer group again).
- SIGTERM to a worker holding jobs releases them (SHUTDOWN_TIMEOUT_S is short, the
  downloads stall): another worker answers them at once, each once, nothing pending.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from bot_helpers import TOKEN, dump_output, emu, image_bytes  # noqa: F401 (emu: fixture)
from redis_helpers import REDIS_SERVER, RedisServer, free_port
from test_jobs_e2e import PREFIX, caption_answers, queue_env, start_role, wait_until

from bot.emulator import BotAPIEmulator

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

if REDIS_SERVER is None:
    pytest.skip(
        "redis-server is not installed (make test installs it with apt-get as root)",
        allow_module_level=True,
    )

SECRET = "hook-secret_1"


@pytest_asyncio.fixture(loop_scope="module")
async def server(tmp_path):
    """A redis-server for this test alone (it may be frozen or restarted)."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    yield redis_server
    if redis_server.proc is not None and redis_server.proc.poll() is None:
        redis_server.proc.send_signal(signal.SIGCONT)
    redis_server.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def redis(server):
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def stop_all(*processes) -> list[int]:
    codes = []
    for process in processes:
        codes.append(await process.stop())
        dump_output(process)
    return codes


async def test_a_webhook_frontend_answers_200_only_after_the_enqueue_and_once_per_update(
    server, redis, tmp_path
):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:  # its own: a webhook stops getUpdates
        await webhook_frontend(emu, server, redis, tmp_path)


async def webhook_frontend(emu, server, redis, tmp_path) -> None:
    port = free_port()
    env = queue_env(
        emu,
        server,
        tmp_path,
        MODE="webhook",
        WEBHOOK_URL="https://bot.example.org/hook",
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_HOST="127.0.0.1",
        WEBHOOK_PORT=port,
    )
    frontend = await start_role("frontend", env, tmp_path, "webhook_listening")
    stream = f"{PREFIX}:jobs"
    try:
        update = {"update_id": 424242, "message": emu.user_sends_photo(9401, image_bytes())}
        async with aiohttp.ClientSession(
            headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}
        ) as http:

            async def deliver() -> int:
                async with http.post(f"http://127.0.0.1:{port}/hook", json=update) as response:
                    return response.status

            server.proc.send_signal(signal.SIGSTOP)  # Redis frozen: the enqueue cannot finish
            try:
                first = asyncio.create_task(deliver())
                await asyncio.sleep(1.5)
                assert not first.done(), "answered 200 before the job was in the stream"
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert await asyncio.wait_for(first, 30) == 200
            assert await redis.xlen(stream) == 1  # no worker runs: the job waits there
            assert await deliver() == 200  # Telegram delivers it again (or to another frontend)
        assert await redis.xlen(stream) == 1
        assert len(frontend.events("job_enqueued")) == 1
        assert len(frontend.events("job_duplicate")) == 1
    finally:
        codes = await stop_all(frontend)
    assert codes == [0], frontend.output[-2000:]


async def test_a_worker_rides_out_a_redis_restart_with_backoff(emu, server, redis, tmp_path):
    env = queue_env(emu, server, tmp_path)
    worker = await start_role("worker", env, tmp_path, "worker_started")
    frontend = await start_role(
        "frontend", {**env, "HEALTH_FILE": str(tmp_path / "fh")}, tmp_path, "bot_started"
    )
    chat = 9402
    try:
        sent = emu.user_sends_photo(chat, image_bytes())
        await wait_until(
            lambda: caption_answers(emu, chat, sent["message_id"]),
            30,
            "no answer before the restart",
        )
        server.stop()  # Redis goes away (and comes back empty: no persistence)
        lost = await worker.wait_for_event("redis_unavailable", timeout=20, count=4)
        delays = [event["retry_in_s"] for event in lost[:4]]
        assert [event["attempt"] for event in lost[:4]] == [1, 2, 3, 4]
        assert delays[3] > delays[0] * 3, delays  # backing off (0.25 s, 0.5 s, 1 s, ...)
        later = emu.user_sends_photo(chat, image_bytes(color=(40, 200, 40)))
        server.start()  # the same port
        await wait_until(
            lambda: caption_answers(emu, chat, later["message_id"]),
            60,
            "no answer after Redis came back",
        )
        assert worker.proc.returncode is None and worker.events("redis_back")
        assert worker.events("consumer_group_missing")
        await worker.wait_for_event("job_done", timeout=10, count=2)  # acked after replying
        assert (await redis.xpending(f"{PREFIX}:jobs", "workers"))["pending"] == 0
        assert [len(caption_answers(emu, chat, m["message_id"])) for m in (sent, later)] == [1, 1]
    finally:
        codes = await stop_all(frontend, worker)
    assert codes == [0, 0], frontend.output[-1500:] + worker.output[-1500:]


async def test_sigterm_releases_a_workers_jobs_and_another_worker_answers_them_at_once(
    emu, server, redis, tmp_path
):
    env = queue_env(emu, server, tmp_path, JOB_CLAIM_IDLE_MS=6000, SHUTDOWN_TIMEOUT_S=1)
    first = await start_role(
        "worker", {**env, "HEALTH_FILE": str(tmp_path / "h1")}, tmp_path, "worker_started"
    )
    frontend = await start_role(
        "frontend", {**env, "HEALTH_FILE": str(tmp_path / "fh")}, tmp_path, "bot_started"
    )
    second = None
    chats = [9410, 9411]
    try:
        emu.inject_fault(
            "getFile", delay=60, times=len(chats)
        )  # the first worker's downloads stall
        photos = [(chat, emu.user_sends_photo(chat, image_bytes())["message_id"]) for chat in chats]
        for _ in chats:
            await emu.wait_for_call("getFile", timeout=30)
        second = await start_role(
            "worker", {**env, "HEALTH_FILE": str(tmp_path / "h2")}, tmp_path, "worker_started"
        )
        stopped = time.monotonic()
        assert await first.stop() == 0
        [summary] = first.events("consumer_stopped")
        assert summary["released"] == len(chats), summary
        await wait_until(
            lambda: all(caption_answers(emu, c, m) for c, m in photos),
            30,
            "the released jobs were not answered",
        )
        # Released, not left for dead: taken within a reclaim round, not JOB_CLAIM_IDLE_MS.
        assert time.monotonic() - stopped < 6.0
        await second.wait_for_event("job_done", timeout=10, count=len(chats))  # acked
        await asyncio.sleep(1.0)  # time for a duplicate to show up
        assert [len(caption_answers(emu, c, m)) for c, m in photos] == [1, 1]
        assert (await redis.xpending(f"{PREFIX}:jobs", "workers"))["pending"] == 0
        done = second.events("job_done")
        assert len(done) == len(chats) and all(e["deliveries"] == 2 for e in done), done
    finally:
        codes = await stop_all(frontend, *([second] if second else []))
        dump_output(first)
    assert codes == [0, 0], frontend.output[-1500:]

"""End to end with QUEUE_URL and the bundled weights: one frontend and two workers
(`python -m bot --role ...`) against the Bot API emulator and a real redis-server, where
the answers' content matters.

- The photo book is shared: `/sample` replying to the bot's caption of the first of two
  photos (a worker sent that caption; the frontend never saw it) samples the first photo,
  not the chat's latest.
- The "Caption anyway" button on the honest reply to a photo outside the training domain
  reaches a worker as a job with `anyway` set, and gets the photo captioned.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from bot_helpers import (  # noqa: F401 (emu: fixture)
    HAVE_WEIGHTS,
    assert_caption_reply,
    assert_honest_reply,
    buttons,
    colours_named,
    dump_output,
    emu,
    numbered_lines,
    reply_id,
    scene_png,
)
from redis_helpers import redis_server  # noqa: F401 (fixture)
from test_bot_domain import chelsea_jpeg, send_photo
from test_jobs_e2e import queue_env, start_role

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

if not HAVE_WEIGHTS:
    pytest.skip(
        "needs the bundled weights in weights/ to tell colours apart", allow_module_level=True
    )

REPLY_TIMEOUT = 60


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def roles(emu, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roles")
    env = queue_env(
        emu, redis_server, tmp, CAPTIONER="bundled", DEFAULT_SAMPLES=3, HEALTH_FILE="off"
    )
    workers = list(
        await asyncio.gather(*(start_role("worker", env, tmp, "worker_started") for _ in range(2)))
    )
    frontend = await start_role("frontend", env, tmp, "bot_started")
    processes = [frontend, *workers]
    yield processes
    codes = [await process.stop() for process in processes]
    for process in processes:
        dump_output(process)
    assert codes == [0, 0, 0], "\n".join(p.output[-1500:] for p in processes)


async def test_sample_replying_to_the_first_photos_caption_samples_that_photo(emu, roles):
    chat = 9301
    first_colours, first = scene_png(set(), 50_000_000)
    latest_colours, latest = scene_png(first_colours, 50_000_100)
    _, first_caption = await send_photo(emu, chat, first)
    assert_caption_reply(first_caption)
    await send_photo(emu, chat, latest)  # now the chat's latest photo
    command = emu.user_sends_text(
        chat, "/sample 5 0.5", reply_to_message_id=first_caption["message_id"]
    )
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == command["message_id"]
    samples = numbered_lines(reply["text"])
    assert len(samples) == 5
    named = [colours_named(line) for line in samples]
    # The first photo's colour in (nearly) every sample; the latest photo's in (nearly) none.
    assert sum(bool(colours & first_colours) for colours in named) >= 4, (first_colours, samples)
    assert sum(bool(colours & latest_colours) for colours in named) <= 1, (latest_colours, samples)


async def test_caption_anyway_is_a_job_with_anyway_set(emu, roles):
    frontend, *workers = roles
    chat = 9302
    photo, honest = await send_photo(emu, chat, chelsea_jpeg())
    assert_honest_reply(honest)
    data = next(b["callback_data"] for b in buttons(honest) if b["text"] == "Caption anyway")
    emu.user_presses_button(chat, honest["message_id"], data)
    captions = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(captions) == photo["message_id"]  # answered like the photo itself
    assert "Baseline decoder: " in captions["text"] and captions["text"].count("\n1. ") == 1
    assert any(e.get("kind") == "caption" for e in frontend.events("job_enqueued"))

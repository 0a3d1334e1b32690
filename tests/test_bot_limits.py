"""Overload and access limits, end to end: queue full, per-user rate limit, allowlist."""

from __future__ import annotations

import asyncio
import io

import pytest
import pytest_asyncio
from bot_helpers import dump_output, emu, image_bytes, start_bot  # noqa: F401 (emu: fixture)
from PIL import Image

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

ALLOWED = list(range(3001, 3041))
STRANGER = 6666
RATE = 3
MAX_BYTES = 300_000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(emu, tmp_path_factory):
    process = await start_bot(
        emu,
        tmp_path_factory.mktemp("bot"),
        QUEUE_MAX=1,
        BATCH_MAX=1,
        RATE_LIMIT_PER_MIN=RATE,
        MAX_IMAGE_BYTES=MAX_BYTES,
        ALLOWED_USER_IDS=",".join(map(str, ALLOWED)),
        ALLOWLIST_IGNORE_S=600,
    )
    yield process
    code = await process.stop()
    dump_output(process)
    assert code == 0, process.output[-3000:]


async def test_a_full_queue_tells_users_to_retry_and_every_photo_gets_an_answer(emu, bot):
    chats = ALLOWED[:20]
    photo = image_bytes("JPEG", (900, 900), quality=95)
    sent = {chat: emu.user_sends_photo(chat, photo) for chat in chats}
    replies = await asyncio.gather(*(emu.next_bot_message(chat, timeout=60) for chat in chats))

    busy = [r for r in replies if "busy" in r.get("text", "")]
    captioned = [r for r in replies if "Baseline decoder:" in r.get("text", "")]
    assert busy, "QUEUE_MAX=1 with 20 photos at once must overflow"
    assert captioned
    assert len(busy) + len(captioned) == len(chats)  # each photo: a caption or a retry notice
    for chat, reply in zip(chats, replies):
        assert reply["reply_to_message"]["message_id"] == sent[chat]["message_id"]
    # Exactly one answer each: nothing more arrives.
    for chat in chats:
        with pytest.raises(TimeoutError):
            await emu.next_bot_message(chat, timeout=0.2)
    assert any(e.get("chat_id") in chats for e in bot.events("queue_full"))


async def test_the_rate_limit_answers_politely_once_then_ignores_the_flood(emu, bot):
    chat = ALLOWED[25]
    for _ in range(RATE):
        emu.user_sends_photo(chat, image_bytes())
        reply = await emu.next_bot_message(chat, timeout=30)
        assert "Baseline decoder:" in reply["text"]
    over = emu.user_sends_photo(chat, image_bytes())
    notice = await emu.next_bot_message(chat, timeout=30)
    assert notice["reply_to_message"]["message_id"] == over["message_id"]
    assert f"{RATE} a minute" in notice["text"] and "try again in" in notice["text"]
    emu.user_sends_text(chat, "/sample 2")
    emu.user_sends_photo(chat, image_bytes())
    with pytest.raises(TimeoutError):
        await emu.next_bot_message(chat, timeout=1.5)
    # Cheap commands are not rate limited.
    emu.user_sends_text(chat, "/help")
    assert "/sample" in (await emu.next_bot_message(chat, timeout=30))["text"]


async def test_users_outside_the_allowlist_get_one_refusal_then_silence(emu, bot):
    emu.user_sends_text(STRANGER, "/start")
    refusal = await emu.next_bot_message(STRANGER, timeout=30)
    assert "private" in refusal["text"]
    emu.user_sends_photo(STRANGER, image_bytes())
    emu.user_sends_text(STRANGER, "/help")
    # An allowed user is served meanwhile...
    friend = ALLOWED[30]
    emu.user_sends_text(friend, "/help")
    assert "/sample" in (await emu.next_bot_message(friend, timeout=30))["text"]
    # ...while the stranger hears nothing more and nothing was downloaded for them.
    with pytest.raises(TimeoutError):
        await emu.next_bot_message(STRANGER, timeout=1.5)
    assert not [
        p for name, p in emu.calls if name == "sendChatAction" and p.get("chat_id") == STRANGER
    ]


async def test_a_file_bigger_than_it_claims_is_cut_off_while_downloading(emu, bot):
    chat = ALLOWED[35]
    noisy = Image.effect_noise((800, 800), 120).convert("RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG")
    data = buffer.getvalue()
    assert len(data) > MAX_BYTES
    # The document claims 1 kB; the bot stops reading at MAX_IMAGE_BYTES all the same.
    sent = emu.user_sends_document(chat, data, "noise.png", "image/png", declared_size=1000)
    reply = await emu.next_bot_message(chat, timeout=30)
    assert reply["reply_to_message"]["message_id"] == sent["message_id"]
    assert (
        reply["text"]
        == "That file is too large (the limit is 0.3 MB). Please send a smaller image."
    )
    # An honest declaration over the limit is refused before any download.
    downloads = len([1 for name, _ in emu.calls if name == "getFile"])
    emu.user_sends_document(chat, data, "noise.png", "image/png")
    reply = await emu.next_bot_message(chat, timeout=30)
    assert reply["text"].startswith(
        f"That file is too large ({len(data) / 1e6:.1f} MB, the limit is 0.3 MB)"
    )
    assert len([1 for name, _ in emu.calls if name == "getFile"]) == downloads


async def test_buttons_and_attention_count_against_the_rate_limit(emu, bot):
    chat = ALLOWED[36]
    photo = emu.user_sends_photo(chat, image_bytes())  # 1
    caption = await emu.next_bot_message(chat, timeout=30)
    assert caption["reply_to_message"]["message_id"] == photo["message_id"]
    more, attention = [
        b["callback_data"] for row in caption["reply_markup"]["inline_keyboard"] for b in row
    ]
    emu.user_presses_button(chat, caption["message_id"], more)  # 2
    assert (await emu.next_bot_message(chat, timeout=30))["text"].count("\n") >= 2
    emu.user_presses_button(chat, caption["message_id"], attention)  # 3
    assert "photo_bytes" in await emu.next_bot_message(chat, timeout=30)
    command = emu.user_sends_text(chat, "/attention")  # 4: over
    notice = await emu.next_bot_message(chat, timeout=30)
    assert notice["reply_to_message"]["message_id"] == command["message_id"]
    assert f"{RATE} a minute" in notice["text"]
    # A button press over the limit is still answered (no endless spinner), with the notice.
    query = emu.user_presses_button(chat, caption["message_id"], attention)  # 5: over
    answer = await emu.wait_for_call(
        "answerCallbackQuery", lambda p: p.get("callback_query_id") == query, timeout=30
    )
    assert f"{RATE} a minute" in answer["text"] and answer.get("show_alert")
    with pytest.raises(TimeoutError):
        await emu.next_bot_message(chat, timeout=1.5)

"""End to end: a photo that isn't a shape scene, with the bundled weights' real domain check.

The real bot process (bundled decoders, `weights/domain.pt`, the encoder's ImageNet head)
polls the Bot API emulator. A real photo (scikit-image's `chelsea`, a cat) gets an honest
reply with what the ImageNet classifier sees, a "Caption anyway" button and the attention
map; /sample and /attention on it say it is outside the domain; a rendered scene is
captioned as before. The bot keeps one encoded photo (ENCODED_CACHE_SIZE=1), so the
buttons are also pressed after the photo has left the cache. With DOMAIN_CHECK=off the
photo is captioned like any other image.
"""

from __future__ import annotations

import io
import itertools

import pytest
import pytest_asyncio
from bot_helpers import (  # noqa: F401 (emu: fixture)
    HAVE_WEIGHTS,
    TOKEN,
    WEIGHTS,
    assert_caption_reply,
    assert_honest_reply,
    buttons,
    dump_output,
    emu,
    numbered_lines,
    reply_id,
    start_bot,
)
from PIL import Image

from bot.emulator import BotAPIEmulator
from bot.texts import OUTSIDE_DOMAIN

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

if not HAVE_WEIGHTS:
    pytest.skip("needs the bundled weights in weights/", allow_module_level=True)

REPLY_TIMEOUT = 60
# ImageNet's cat classes (and the big cats a tabby is sometimes taken for).
CATS = ("cat", "tabby", "lynx", "tiger", "leopard", "cougar")
_chats = itertools.count(4001)


def chelsea_jpeg() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def scene_png(seed: int = 3) -> bytes:
    from model.data.scenes import render_scene

    buffer = io.BytesIO()
    render_scene(seed)[1].save(buffer, "PNG")
    return buffer.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(emu, tmp_path_factory):
    assert (WEIGHTS / "domain.pt").exists(), "the bundled weights have no domain check"
    process = await start_bot(
        emu,
        tmp_path_factory.mktemp("bot"),
        RATE_LIMIT_PER_MIN=10_000,
        DEFAULT_SAMPLES=3,
        ENCODED_CACHE_SIZE=1,
    )
    yield process
    code = await process.stop()
    dump_output(process)
    assert code == 0, process.output[-3000:]


def calls(emu: BotAPIEmulator, method: str) -> int:
    return sum(1 for name, _ in emu.calls if name == method)


def press(emu: BotAPIEmulator, chat: int, message: dict, label: str) -> str:
    data = next(b["callback_data"] for b in buttons(message) if b["text"] == label)
    return emu.user_presses_button(chat, message["message_id"], data)


async def send_photo(emu: BotAPIEmulator, chat: int, data: bytes) -> tuple[dict, dict]:
    sent = emu.user_sends_photo(chat, data)
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    return sent, reply


def assert_marked(text: str) -> str:
    """The out-of-domain line first; returns the rest."""
    first, _, rest = text.partition("\n\n")
    assert first == OUTSIDE_DOMAIN, text
    return rest


async def test_a_real_photo_gets_an_honest_reply_and_captions_only_when_asked(emu, bot):
    chat = next(_chats)
    photo, reply = await send_photo(emu, chat, chelsea_jpeg())
    print("honest reply:", reply["text"])
    seen = assert_honest_reply(reply)
    assert any(cat in seen.lower() for cat in CATS) and "%" in seen, seen

    press(emu, chat, reply, "Caption anyway")
    captions = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(captions) == photo["message_id"]  # answered like the photo itself
    rest = assert_marked(captions["text"])
    assert_caption_reply({**captions, "text": rest})

    press(emu, chat, reply, "Attention map")
    figure = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert Image.open(io.BytesIO(figure["photo_bytes"])).format == "JPEG"
    assert assert_marked(figure["caption"]).strip()


async def test_sample_and_attention_on_the_photo_say_it_is_outside_the_domain(emu, bot):
    chat = next(_chats)
    photo, _ = await send_photo(emu, chat, chelsea_jpeg())
    emu.user_sends_text(chat, "/sample 2", reply_to_message_id=photo["message_id"])
    samples = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert len(numbered_lines(assert_marked(samples["text"]))) == 2

    emu.user_sends_text(chat, "/attention", reply_to_message_id=photo["message_id"])
    figure = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert assert_marked(figure["caption"]).strip()


async def test_a_rendered_scene_is_captioned_as_before(emu, bot):
    chat = next(_chats)
    _, reply = await send_photo(emu, chat, scene_png())
    assert OUTSIDE_DOMAIN not in reply["text"]
    assert_caption_reply(reply)


async def test_the_buttons_work_after_the_photo_has_left_the_cache(emu, bot):
    chat = next(_chats)
    photo, reply = await send_photo(emu, chat, chelsea_jpeg())
    await send_photo(emu, chat, scene_png(5))  # the cache keeps one photo: the cat is gone
    downloads = calls(emu, "getFile")

    press(emu, chat, reply, "Caption anyway")
    captions = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(captions) == photo["message_id"]
    assert_caption_reply({**captions, "text": assert_marked(captions["text"])})
    assert calls(emu, "getFile") > downloads  # downloaded and encoded again


async def test_with_the_domain_check_off_the_photo_is_captioned(tmp_path):
    emulator = BotAPIEmulator(bot_token=TOKEN)
    await emulator.start(host="127.0.0.1", port=0)
    try:
        process = await start_bot(emulator, tmp_path, DOMAIN_CHECK="off", DEFAULT_SAMPLES=3)
        try:
            _, reply = await send_photo(emulator, 4999, chelsea_jpeg())
            assert OUTSIDE_DOMAIN not in reply["text"]
            assert_caption_reply(reply)
        finally:
            assert await process.stop() == 0, process.output[-3000:]
    finally:
        await emulator.stop()

"""End to end: the real bot process, polling the Bot API emulator over HTTP.

One bot for the whole module (loading the model takes seconds); every test talks in its
own chat so they don't see each other's messages. Assertions are about structure
(reply ids, numbering, counts, figure sizes), so they hold for any captioner.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
import pytest_asyncio
from bot_helpers import (  # noqa: F401 (emu: fixture)
    HAVE_WEIGHTS,
    REPO,
    TOKEN,
    WEIGHTS,
    assert_caption_reply,
    assert_image_answered,
    colours_named,
    dump_output,
    emu,
    image_bytes,
    numbered_lines,
    reply_id,
    scene_png,
    start_bot,
)
from PIL import Image

from bot.emulator import BotAPIEmulator
from bot.texts import COMMANDS, EMPTY_CAPTION
from model.data.scenes import render_scene
from model.figure import figure_size

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MAX_PIXELS = 4_000_000
REPLY_TIMEOUT = 30
# "typing..." shows for replies slower than this (CHAT_ACTION_DELAY_MS); long enough that a photo
# alone is always answered before it, even on a loaded machine.
CHAT_ACTION_DELAY_S = 2
_chats = itertools.count(2001)


def new_chat() -> int:
    return next(_chats)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot(emu, tmp_path_factory):
    process = await start_bot(
        emu,
        tmp_path_factory.mktemp("bot"),
        RATE_LIMIT_PER_MIN=10_000,
        MAX_IMAGE_PIXELS=MAX_PIXELS,
        DEFAULT_SAMPLES=3,
        MAX_SAMPLES=10,
        CHAT_ACTION_DELAY_MS=CHAT_ACTION_DELAY_S * 1000,
    )
    yield process
    code = await process.stop()
    dump_output(process)
    assert code == 0, process.output[-3000:]
    secret = TOKEN.split(":", 1)[1]
    assert secret not in process.output


def calls(emu: BotAPIEmulator, method: str, chat_id: int | None = None) -> list[dict]:
    return [
        p
        for name, p in emu.calls
        if name == method and (chat_id is None or p.get("chat_id") == chat_id)
    ]


async def send_photo_and_caption(emu, chat: int, data: bytes | None = None) -> tuple[dict, dict]:
    sent = emu.user_sends_photo(chat, data or image_bytes())
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_caption_reply(reply)
    return sent, reply


async def assert_silent(emu, chat: int, seconds: float = 1.0) -> None:
    with pytest.raises(TimeoutError):
        extra = await emu.next_bot_message(chat, timeout=seconds)
        print("unexpected message:", extra.get("text") or extra.get("caption"))


# ---- /start, /help, commands -------------------------------------------------------------


async def test_start_and_help_say_what_the_bot_does(emu, bot):
    chat = new_chat()
    for command in ("/start", "/help"):
        emu.user_sends_text(chat, command)
        text = (await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT))["text"]
        assert "/sample" in text and "/attention" in text
        assert "shapes" in text and "COCO" in text and "README" in text
    assert {c["command"] for c in emu.commands()} == set(COMMANDS)


async def test_plain_text_gets_a_hint_to_send_a_photo(emu, bot):
    chat = new_chat()
    sent = emu.user_sends_text(chat, "hello there")
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert "photo" in reply["text"] and reply_id(reply) == sent["message_id"]


# ---- photos ----------------------------------------------------------------------------------


async def test_a_photo_is_answered_as_a_reply_with_captions_and_buttons(emu, bot):
    chat = new_chat()
    # A slow download makes a slow reply, during which "typing..." shows.
    emu.inject_fault("getFile", delay=CHAT_ACTION_DELAY_S + 0.5)
    sent = emu.user_sends_photo(chat, image_bytes("JPEG", (640, 480)))
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_caption_reply(reply)
    await emu.wait_for_call(
        "sendChatAction",
        lambda p: p.get("chat_id") == chat and p.get("action") == "typing",
        timeout=5,
    )
    # One log line per job, with the fields operators need.
    jobs = await bot.wait_for_event("job", timeout=5)
    mine = [j for j in jobs if j.get("chat_id") == chat]
    assert mine and mine[0]["message_id"] == sent["message_id"]
    for field in ("queue_wait_ms", "inference_ms", "batch_size", "outcome"):
        assert field in mine[0]
    assert mine[0]["outcome"] == "ok"


async def test_a_fast_reply_shows_no_typing(emu, bot):
    chat = new_chat()
    started = time.monotonic()
    emu.user_sends_photo(chat, image_bytes("JPEG", (640, 480)))
    assert_caption_reply(await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT))
    assert time.monotonic() - started < CHAT_ACTION_DELAY_S  # else this machine is too slow
    await asyncio.sleep(CHAT_ACTION_DELAY_S)  # an action sent late would have come by now
    assert [e for e in emu.chat_events(chat) if e["type"] == "chat_action"] == []


@pytest.mark.parametrize(
    "fmt,name,mime,extra",
    [
        ("JPEG", "photo.jpg", "image/jpeg", {}),
        ("PNG", "scene.png", "image/png", {}),
        ("WEBP", "scene.webp", "image/webp", {}),
        ("BMP", "scene.bmp", "image/bmp", {}),
        ("AVIF", "scene.avif", "image/avif", {"quality": 90}),
        ("TIFF", "scan.tiff", "image/tiff", {}),
        ("PNG", "no-mime.png", "application/octet-stream", {}),
    ],
)
async def test_an_image_sent_as_a_document_is_captioned(emu, bot, fmt, name, mime, extra):
    chat = new_chat()
    sent = emu.user_sends_document(chat, image_bytes(fmt, **extra), name, mime)
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_image_answered(reply)


@pytest.mark.parametrize("mime", ["image/heic", "application/octet-stream"])
async def test_an_iphone_heic_sent_as_a_file_is_captioned(emu, bot, mime):
    chat = new_chat()
    heic = image_bytes("HEIF", (1008, 756), quality=90)  # an iPhone's 4:3, scaled down
    sent = emu.user_sends_document(chat, heic, "IMG_0042.HEIC", mime)
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_caption_reply(reply)


async def test_an_animated_gif_is_captioned_from_its_first_frame(emu, bot):
    chat = new_chat()
    frames = [Image.new("RGB", (200, 200), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sent = emu.user_sends_document(chat, buffer.getvalue(), "anim.gif", "image/gif")
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_image_answered(reply)


def _exif_rotated_jpeg() -> bytes:
    image = Image.open(io.BytesIO(image_bytes("JPEG", (320, 200))))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "label,make",
    [
        ("cmyk-jpeg", lambda: _encoded(Image.new("CMYK", (200, 200), (0, 200, 200, 0)), "JPEG")),
        ("16-bit-png", lambda: _encoded(Image.new("I;16", (200, 200), 40000), "PNG")),
        ("palette-png", lambda: _encoded(Image.new("RGB", (200, 200), "red").convert("P"), "PNG")),
        ("rgba-png", lambda: _encoded(Image.new("RGBA", (200, 200), (255, 0, 0, 90)), "PNG")),
        ("grey-alpha-png", lambda: _encoded(Image.new("LA", (200, 200), (90, 128)), "PNG")),
        ("exif-rotated-jpeg", _exif_rotated_jpeg),
    ],
)
async def test_odd_image_modes_are_normalised_and_captioned(emu, bot, label, make):
    chat = new_chat()
    sent = emu.user_sends_document(
        chat, make(), f"{label}.bin", "image/png" if "png" in label else "image/jpeg"
    )
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_image_answered(reply)


# ---- /sample -----------------------------------------------------------------------------


async def test_sample_replying_to_a_photo_reuses_the_cached_encoding(emu, bot):
    chat = new_chat()
    photo, _ = await send_photo_and_caption(emu, chat)
    downloads = len(calls(emu, "getFile"))
    command = emu.user_sends_text(chat, "/sample 4", reply_to_message_id=photo["message_id"])
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == command["message_id"]
    assert len(numbered_lines(reply["text"])) == 4
    assert len(calls(emu, "getFile")) == downloads  # encoded once, served from the cache


async def test_sample_as_the_photos_own_caption(emu, bot):
    chat = new_chat()
    sent = emu.user_sends_photo(chat, image_bytes(), caption="/sample 2 0.5")
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert len(numbered_lines(reply["text"])) == 2
    assert "temperature 0.5" in reply["text"]
    await assert_silent(emu, chat)  # the command replaces the usual caption reply


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the trained weights to tell colours apart")
async def test_sample_without_a_reply_uses_the_chats_latest_photo(emu, bot):
    chat = new_chat()
    first_colours, first = scene_png(set(), 50_000_000)
    latest_colours, latest = scene_png(first_colours, 50_000_100)
    await send_photo_and_caption(emu, chat, first)
    await send_photo_and_caption(emu, chat, latest)
    keys_before = len(calls(emu, "getFile"))
    emu.user_sends_text(chat, "/sample 5 0.5")
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    samples = numbered_lines(reply["text"])
    assert len(samples) == 5
    assert len(calls(emu, "getFile")) == keys_before
    named = [colours_named(line) for line in samples]
    # The latest photo's colour in (nearly) every sample; the earlier photo's in (nearly) none.
    assert sum(bool(colours & latest_colours) for colours in named) >= 4, (latest_colours, samples)
    assert sum(bool(colours & first_colours) for colours in named) <= 1, (first_colours, samples)


async def test_sample_replying_to_the_bots_caption_message(emu, bot):
    chat = new_chat()
    _, caption_reply = await send_photo_and_caption(emu, chat)
    command = emu.user_sends_text(
        chat, "/sample 3 1.5", reply_to_message_id=caption_reply["message_id"]
    )
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == command["message_id"]
    assert len(numbered_lines(reply["text"])) == 3


async def test_bad_sample_arguments_get_a_usage_message(emu, bot):
    chat = new_chat()
    await send_photo_and_caption(emu, chat)
    for text in (
        "/sample",
        "/sample 0",
        "/sample 11",
        "/sample x",
        "/sample 3 0",
        "/sample 3 2.5",
        "/sample 3 -1",
        "/sample 3 abc",
        "/sample 1 2 3",
        "/sample 2 nan",
    ):
        sent = emu.user_sends_text(chat, text)
        reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
        assert reply["text"].startswith("Usage: /sample N [T]"), (text, reply["text"])
        assert reply_id(reply) == sent["message_id"]
    # ...and the bot is fine afterwards.
    emu.user_sends_text(chat, "/sample 10 2")
    assert (
        len(numbered_lines((await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT))["text"])) == 10
    )


async def test_commands_without_any_photo_ask_for_one(emu, bot):
    chat = new_chat()
    for text in ("/sample 3", "/attention"):
        emu.user_sends_text(chat, text)
        reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
        assert "Send me a photo" in reply["text"]


# ---- /attention and the buttons ----------------------------------------------------------


def assert_attention_figure(message: dict, headline: str) -> None:
    if headline == EMPTY_CAPTION:  # the decoder said nothing: a figure of the photo alone
        headline = ""
    assert message.get("caption", "") == headline
    figure = Image.open(io.BytesIO(message["photo_bytes"]))
    assert figure.format == "JPEG"
    # A grid of the photo and one tile per word, readable on a phone.
    assert figure.size == figure_size(len(headline.split()))
    assert 0.5 <= figure.width / figure.height <= 2


async def test_attention_sends_a_jpeg_with_one_tile_per_word(emu, bot):
    chat = new_chat()
    _, caption_reply = await send_photo_and_caption(emu, chat)
    headline = caption_reply["text"].splitlines()[0]
    emu.inject_fault("sendPhoto", delay=CHAT_ACTION_DELAY_S + 0.5)  # slow: "sending a photo..."
    command = emu.user_sends_text(chat, "/attention")
    figure = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(figure) == command["message_id"]
    assert_attention_figure(figure, headline)
    await emu.wait_for_call(
        "sendChatAction",
        lambda p: p.get("chat_id") == chat and p.get("action") == "upload_photo",
        timeout=5,
    )


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="the command line needs the trained weights")
async def test_attention_as_a_photo_caption(emu, bot, tmp_path):
    chat = new_chat()
    _, image = render_scene(50_000_200, 224)
    data = _encoded(image, "PNG")
    sent = emu.user_sends_photo(chat, data, caption="/attention")
    figure = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(figure) == sent["message_id"]
    # The expectation comes from elsewhere: the command line's caption of the same file.
    (tmp_path / "scene.png").write_bytes(data)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "model",
            "caption",
            str(tmp_path / "scene.png"),
            "--json",
            "--samples",
            "0",
            "--decoder",
            "attention",
            "--weights",
            str(WEIGHTS),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)[0]["attention"]["greedy"]
    assert expected
    assert_attention_figure(figure, expected)


async def test_both_inline_buttons_do_what_the_commands_do(emu, bot):
    chat = new_chat()
    _, caption_reply = await send_photo_and_caption(emu, chat)
    headline = caption_reply["text"].splitlines()[0]
    more, attention = [
        b["callback_data"] for row in caption_reply["reply_markup"]["inline_keyboard"] for b in row
    ]

    query = emu.user_presses_button(chat, caption_reply["message_id"], more)
    samples = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert len(numbered_lines(samples["text"])) == 3
    await emu.wait_for_call(
        "answerCallbackQuery", lambda p: p.get("callback_query_id") == query, timeout=5
    )

    query = emu.user_presses_button(chat, caption_reply["message_id"], attention)
    figure = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert_attention_figure(figure, headline)
    await emu.wait_for_call(
        "answerCallbackQuery", lambda p: p.get("callback_query_id") == query, timeout=5
    )


async def test_a_button_for_a_photo_the_bot_no_longer_knows_is_answered(emu, bot):
    chat = new_chat()
    _, caption_reply = await send_photo_and_caption(emu, chat)
    query = emu.user_presses_button(chat, caption_reply["message_id"], "p:more:unknown-photo")
    answer = await emu.wait_for_call(
        "answerCallbackQuery", lambda p: p.get("callback_query_id") == query, timeout=10
    )
    assert "send it again" in answer.get("text", "")


# ---- bad input -------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


async def test_bad_input_gets_a_specific_reply_and_nothing_else_breaks(emu, bot):
    chat = new_chat()
    jpeg = image_bytes("JPEG", (800, 600), quality=90)
    cases = [
        (
            lambda: emu.user_sends_document(chat, b"just some notes\n", "notes.txt", "text/plain"),
            "isn't an image",
        ),
        (
            lambda: emu.user_sends_document(chat, b"\x00\x01garbage" * 50, "fake.png", "image/png"),
            "can't use this image",
        ),
        (  # a format Pillow reads but the bot does not offer, named and typed as a JPEG
            lambda: emu.user_sends_document(
                chat, _encoded(Image.new("RGB", (64, 48), 9), "PCX"), "scan.jpg", "image/jpeg"
            ),
            "not an image I can read",
        ),
        (
            lambda: emu.user_sends_document(chat, jpeg[: len(jpeg) // 2], "cut.jpg", "image/jpeg"),
            "corrupt or truncated",
        ),
        (
            lambda: emu.user_sends_document(
                chat, image_bytes(), "huge.png", "image/png", declared_size=25 * 1024 * 1024
            ),
            "too large",
        ),
        (
            lambda: emu.user_sends_document(
                chat, _encoded(Image.new("L", (2500, 2000), 9), "PNG"), "big.png", "image/png"
            ),
            "too large",
        ),
        (
            lambda: emu.user_sends_document(
                chat, _png_claiming(100_000, 100_000), "bomb.png", "image/png"
            ),
            "too large",
        ),
    ]
    for send, expected in cases:
        downloads = len(calls(emu, "getFile"))
        sent = send()
        reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
        assert expected in reply["text"], reply["text"]
        assert reply_id(reply) == sent["message_id"]
        assert "reply_markup" not in reply
        if expected == "too large" and "huge" in sent["document"].get("file_name", ""):
            assert len(calls(emu, "getFile")) == downloads  # refused before downloading
    # The same chat and bot keep working.
    await send_photo_and_caption(emu, chat)


# ---- Telegram trouble ------------------------------------------------------------------------


async def test_server_errors_on_send_are_retried(emu, bot):
    chat = new_chat()
    emu.inject_fault("sendMessage", status=500, times=2)
    emu.user_sends_text(chat, "/help")
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert "/sample" in reply["text"]
    assert len(calls(emu, "sendMessage", chat)) == 3


async def test_429_retry_after_is_honoured(emu, bot):
    chat = new_chat()
    emu.inject_fault("sendMessage", status=429, retry_after=2)
    started = time.monotonic()
    emu.user_sends_text(chat, "/help")
    await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert time.monotonic() - started >= 1.9
    assert len(calls(emu, "sendMessage", chat)) == 2


async def test_a_slow_reply_does_not_hold_up_other_chats(emu, bot):
    slow_chat, quick_chat = new_chat(), new_chat()
    emu.inject_fault("sendMessage", delay=4)  # the next sendMessage is held for 4 s
    emu.user_sends_text(slow_chat, "/help")
    await emu.wait_for_call("sendMessage", lambda p: p.get("chat_id") == slow_chat, timeout=10)
    started = time.monotonic()
    emu.user_sends_text(quick_chat, "/help")
    await emu.next_bot_message(quick_chat, timeout=3)
    assert time.monotonic() - started < 3
    await emu.next_bot_message(slow_chat, timeout=15)


async def test_slow_and_failing_file_api_still_gets_the_photo_captioned(emu, bot):
    chat = new_chat()
    emu.inject_fault("getFile", delay=1.5)
    emu.inject_fault("download", status=502, times=2)
    sent = emu.user_sends_photo(chat, image_bytes(color=(1, 2, 3)))
    reply = await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    assert reply_id(reply) == sent["message_id"]
    assert_caption_reply(reply)


async def test_polling_survives_getupdates_errors(emu, bot):
    chat = new_chat()
    emu.inject_fault("getUpdates", status=500, times=2)
    emu.inject_fault("getUpdates", status=429, retry_after=1)
    await emu.wait_for_call("getUpdates", timeout=10)
    emu.user_sends_text(chat, "/help")
    reply = await emu.next_bot_message(chat, timeout=60)
    assert "/sample" in reply["text"]


async def test_the_bot_gives_up_on_a_dead_send_after_a_bounded_time_and_carries_on(emu, bot):
    chat = new_chat()
    emu.inject_fault("sendMessage", status=500, times=1000)
    try:
        emu.user_sends_text(chat, "/help")
        gave_up = await bot.wait_for_event("telegram_gave_up", timeout=30)
        assert gave_up[-1]["method"] == "sendMessage"
    finally:
        emu.clear_faults()
    # SEND_RETRY_TIMEOUT_S=8 in the tests: the attempts stopped within that budget.
    attempts = calls(emu, "sendMessage", chat)
    assert 2 <= len(attempts) < 20
    emu.user_sends_text(chat, "/help")
    assert "/sample" in (await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT))["text"]


async def test_the_encoding_cache_is_keyed_by_file_unique_id(emu, bot):
    """Telegram gives the same file the same file_unique_id under a new file_id each time
    it is sent: the second photo is not downloaded, and /sample on either uses the cache."""
    chat = new_chat()
    emu.files.unique_ids_by_content = True
    try:
        first, _ = await send_photo_and_caption(emu, chat, image_bytes(color=(10, 120, 30)))
        downloads = len(calls(emu, "getFile"))
        again, _ = await send_photo_and_caption(emu, chat, image_bytes(color=(10, 120, 30)))
        other, _ = await send_photo_and_caption(emu, chat, image_bytes(color=(120, 10, 30)))
    finally:
        emu.files.unique_ids_by_content = False
    assert again["photo"][-1]["file_id"] != first["photo"][-1]["file_id"]
    assert again["photo"][-1]["file_unique_id"] == first["photo"][-1]["file_unique_id"]
    assert len(calls(emu, "getFile")) == downloads + 1  # only the other picture
    jobs = {
        e["message_id"]: e for e in await bot.wait_for_event("job", 10) if e.get("chat_id") == chat
    }
    assert not jobs[first["message_id"]]["cached"]
    assert jobs[again["message_id"]]["cached"] and not jobs[other["message_id"]]["cached"]


async def test_every_line_logged_while_handling_an_update_names_it(emu, bot):
    chat = new_chat()
    _, caption_reply = await send_photo_and_caption(emu, chat)
    more = caption_reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    emu.user_presses_button(chat, caption_reply["message_id"], more)
    await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    emu.inject_fault("sendMessage", status=500)  # a telegram_retry line, too
    emu.user_sends_text(chat, "/sample 2")
    await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    emu.user_sends_document(chat, b"not an image at all", "x.png", "image/png")
    await emu.next_bot_message(chat, timeout=REPLY_TIMEOUT)
    await bot.wait_for_event("job", 10)
    lines = [
        json.loads(line)
        for line in bot.lines
        if line.startswith("{") and f'"chat_id": {chat}' in line
    ]
    assert {"job", "telegram_retry"} <= {line["event"] for line in lines}, lines
    assert len([line for line in lines if line["event"] == "job"]) >= 3
    for line in lines:
        assert line.get("update_id") is not None and line.get("user_id") == chat, line

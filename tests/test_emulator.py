"""The Bot API emulator, driven by a real aiogram Bot as the bot side."""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp
import pytest
from aiogram import Bot, Dispatcher, F
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import (
    BotCommand,
    BufferedInputFile,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    ReplyParameters,
)
from PIL import Image

from bot.emulator import BotAPIEmulator

TOKEN = "123456:TEST"
CHAT = 1001

pytestmark = pytest.mark.timeout(60)


def png_bytes(size: tuple[int, int] = (400, 300), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def emu():
    emulator = BotAPIEmulator(bot_token=TOKEN)
    await emulator.start(host="127.0.0.1", port=0)
    yield emulator
    await emulator.stop()


def make_bot(emu: BotAPIEmulator, token: str = TOKEN, **defaults) -> Bot:
    session = AiohttpSession(api=TelegramAPIServer.from_base(emu.base_url))
    return Bot(token, session=session, default=DefaultBotProperties(**defaults))


@pytest.fixture
async def bot(emu):
    client = make_bot(emu)
    yield client
    await client.session.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


# --- protocol basics --------------------------------------------------------------------


async def test_get_me_describes_the_bot(emu, bot):
    me = await bot.get_me()
    assert me.id == 123456 and me.is_bot and me.username


async def test_wrong_token_is_unauthorized(emu):
    other = make_bot(emu, token="123456:WRONG")
    try:
        with pytest.raises(TelegramUnauthorizedError):
            await other.get_me()
    finally:
        await other.session.close()


async def test_unknown_method_answers_like_telegram(emu, http):
    async with http.post(f"{emu.base_url}/bot{TOKEN}/sendHologram", json={"chat_id": 1}) as resp:
        assert resp.status == 404
        assert await resp.json() == {"ok": False, "error_code": 404, "description": "Not Found"}
    assert emu.calls[-1][0] == "sendHologram"


async def test_methods_are_case_insensitive_and_accept_every_encoding(emu, http):
    emu.user_sends_text(CHAT, "hi")
    url = f"{emu.base_url}/bot{TOKEN}"
    async with http.get(f"{url}/getme") as resp:
        assert (await resp.json())["result"]["id"] == 123456
    async with http.post(f"{url}/sendMessage", json={"chat_id": CHAT, "text": "json"}) as resp:
        assert (await resp.json())["result"]["text"] == "json"
    form = {
        "chat_id": str(CHAT),
        "text": "form",
        "reply_markup": '{"inline_keyboard":[[{"text":"a","callback_data":"x"}]]}',
    }
    async with http.post(f"{url}/sendMessage", data=form) as resp:
        result = (await resp.json())["result"]
        assert result["text"] == "form"
        assert result["reply_markup"]["inline_keyboard"][0][0]["callback_data"] == "x"
    async with http.get(f"{url}/sendMessage", params={"chat_id": CHAT, "text": "query"}) as resp:
        assert (await resp.json())["result"]["text"] == "query"
    assert [name for name, _ in emu.calls] == ["getMe", "sendMessage", "sendMessage", "sendMessage"]
    assert emu.calls[2][1]["chat_id"] == CHAT  # form strings are normalised


# --- updates ------------------------------------------------------------------------------


async def test_text_update_round_trip_with_command_entities(emu, bot):
    sent = emu.user_sends_text(CHAT, "/sample 5")
    assert sent["entities"] == [{"type": "bot_command", "offset": 0, "length": 7}]
    updates = await bot.get_updates(timeout=0)
    assert len(updates) == 1
    message = updates[0].message
    assert message.text == "/sample 5" and message.chat.id == CHAT and message.from_user.id == CHAT
    assert message.message_id == sent["message_id"]
    # Not confirmed yet: delivered again; confirmed with offset: gone.
    assert len(await bot.get_updates(timeout=0)) == 1
    assert await bot.get_updates(offset=updates[0].update_id + 1, timeout=0) == []


async def test_get_updates_long_poll_wakes_on_new_update(emu, bot):
    async def send_later():
        await asyncio.sleep(0.3)
        emu.user_sends_text(CHAT, "late")

    sender = asyncio.create_task(send_later())
    started = time.monotonic()
    updates = await bot.get_updates(timeout=10)
    await sender
    assert [u.message.text for u in updates] == ["late"]
    assert time.monotonic() - started < 5


async def test_get_updates_honours_limit_and_allowed_updates(emu, bot):
    for n in range(3):
        emu.user_sends_text(CHAT, f"m{n}")
    message = emu.user_sends_text(CHAT, "with button")
    emu.user_presses_button(CHAT, message["message_id"], "cb")
    assert [u.message.text for u in await bot.get_updates(limit=2, timeout=0)] == ["m0", "m1"]
    only_callbacks = await bot.get_updates(allowed_updates=["callback_query"], timeout=0)
    assert [u.callback_query.data for u in only_callbacks] == ["cb"]


async def test_second_poller_terminates_the_first(emu, bot):
    first = asyncio.create_task(bot.get_updates(timeout=10))
    await emu.wait_for_call("getUpdates", timeout=5)
    second_bot = make_bot(emu)
    try:
        second = asyncio.create_task(second_bot.get_updates(timeout=1))
        with pytest.raises(TelegramConflictError):
            await asyncio.wait_for(first, 5)
        assert await asyncio.wait_for(second, 5) == []
    finally:
        await second_bot.session.close()


async def test_webhook_blocks_get_updates_until_deleted(emu, bot):
    await bot.set_webhook("https://example.invalid/hook")
    with pytest.raises(TelegramConflictError):
        await bot.get_updates(timeout=0)
    emu.user_sends_text(CHAT, "queued")
    assert (await bot.get_webhook_info()).pending_update_count == 1
    assert await bot.delete_webhook(drop_pending_updates=True)
    assert await bot.get_updates(timeout=0) == []


# --- sending -------------------------------------------------------------------------------


async def test_send_message_with_html_reply_and_keyboard(emu, bot):
    question = emu.user_sends_text(CHAT, "hello")
    keyboard = InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text="More samples", callback_data="more:1")]]
    )
    sent = await bot.send_message(
        CHAT,
        "<b>Caption:</b> a red circle &amp; 😀 <i>x</i>",
        parse_mode="HTML",
        reply_to_message_id=question["message_id"],
        reply_markup=keyboard,
    )
    assert sent.text == "Caption: a red circle & 😀 x"
    assert [(e.type, e.offset, e.length) for e in sent.entities] == [
        ("bold", 0, 8),
        ("italic", 27, 1),
    ]
    assert sent.reply_to_message.message_id == question["message_id"]
    assert sent.message_id == question["message_id"] + 1
    got = await emu.next_bot_message(CHAT, timeout=5)
    assert got["text"] == sent.text
    assert got["reply_markup"]["inline_keyboard"][0][0]["text"] == "More samples"
    assert got["reply_to_message"]["text"] == "hello"
    assert emu.calls[-1][1]["reply_to_message_id"] == question["message_id"]
    # message.reply() and explicit ReplyParameters arrive as a JSON reply_parameters field
    again = await bot.send_message(
        CHAT, "again", reply_parameters=ReplyParameters(message_id=question["message_id"])
    )
    assert again.reply_to_message.text == "hello"
    assert emu.calls[-1][1]["reply_parameters"] == {"message_id": question["message_id"]}


async def test_send_message_errors(emu, bot):
    with pytest.raises(TelegramBadRequest, match="chat not found"):
        await bot.send_message(999, "nobody here")
    emu.user_sends_text(CHAT, "hi")
    with pytest.raises(TelegramBadRequest, match="can't parse entities"):
        await bot.send_message(CHAT, "<b>unclosed", parse_mode="HTML")
    with pytest.raises(TelegramBadRequest, match="Unsupported start tag"):
        await bot.send_message(CHAT, "<div>x</div>", parse_mode="HTML")
    with pytest.raises(TelegramBadRequest, match="message is too long"):
        await bot.send_message(CHAT, "x" * 4097)
    with pytest.raises(TelegramBadRequest, match="message to be replied not found"):
        await bot.send_message(CHAT, "x", reply_to_message_id=999)
    with pytest.raises(TelegramBadRequest, match="BUTTON_DATA_INVALID"):
        markup = InlineKeyboardMarkup(
            inline_keyboard=[[InlineKeyboardButton(text="b", callback_data="x" * 65)]]
        )
        await bot.send_message(CHAT, "x", reply_markup=markup)
    with pytest.raises(TelegramBadRequest, match="reserved"):
        await bot.send_message(CHAT, "Done.", parse_mode="MarkdownV2")
    ok = await bot.send_message(CHAT, r"*bold* and `code`\.", parse_mode="MarkdownV2")
    assert ok.text == "bold and code." and [e.type for e in ok.entities] == ["bold", "code"]


async def test_message_ids_increment_per_chat(emu, bot):
    a = emu.user_sends_text(1, "a")
    b = emu.user_sends_text(2, "b")
    assert a["message_id"] == b["message_id"] == 1
    assert (await bot.send_message(1, "reply")).message_id == 2


# --- files -----------------------------------------------------------------------------------


async def test_user_photo_download_round_trip(emu, bot):
    original = png_bytes((800, 600))
    sent = emu.user_sends_photo(CHAT, original, caption="/attention")
    sizes = sent["photo"]
    assert [(s["width"], s["height"]) for s in sizes] == [(90, 68), (320, 240), (800, 600)]
    assert sizes[-1]["file_size"] == len(original)
    assert sent["caption_entities"][0]["type"] == "bot_command"
    message = (await bot.get_updates(timeout=0))[0].message
    file = await bot.get_file(message.photo[-1].file_id)
    assert file.file_path and file.file_size == len(original)
    downloaded = await bot.download_file(file.file_path)
    assert downloaded.read() == original
    thumb = await bot.download(message.photo[0].file_id)
    assert Image.open(thumb).size == (90, 68)


async def test_a_heic_photo_reaches_the_bot_as_jpeg(emu, bot):
    """Telegram's clients send an iPhone's HEIC photo as JPEG, and the emulator stores it so."""
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (30, 160, 40)).save(buffer, "HEIF", quality=90)
    sent = emu.user_sends_photo(CHAT, buffer.getvalue())
    assert [(s["width"], s["height"]) for s in sent["photo"]][-1] == (400, 300)
    message = (await bot.get_updates(timeout=0))[0].message
    downloaded = Image.open(await bot.download(message.photo[-1].file_id))
    assert downloaded.format == "JPEG" and downloaded.size == (400, 300)
    r, g, b = downloaded.convert("RGB").getpixel((200, 150))
    assert g > 140 and r < 60 and b < 60


async def test_non_image_photo_is_rejected_on_the_user_side(emu):
    with pytest.raises(ValueError):
        emu.user_sends_photo(CHAT, b"not an image")


async def test_document_too_big_for_get_file(emu, bot):
    emu.user_sends_document(
        CHAT, b"%PDF-1.4", "doc.pdf", "application/pdf", declared_size=25 * 1024 * 1024
    )
    document = (await bot.get_updates(timeout=0))[0].message.document
    assert document.file_size == 25 * 1024 * 1024
    assert document.file_name == "doc.pdf" and document.mime_type == "application/pdf"
    with pytest.raises(TelegramBadRequest, match="file is too big"):
        await bot.get_file(document.file_id)
    with pytest.raises(TelegramBadRequest, match="wrong file_id"):
        await bot.get_file("nonsense")


async def test_send_photo_multipart_and_reuse_by_file_id(emu, bot):
    emu.user_sends_text(CHAT, "/attention")
    figure = png_bytes((640, 480), "blue")
    sent = await bot.send_photo(
        CHAT,
        BufferedInputFile(figure, "attention.png"),
        caption="<b>a</b> blue square",
        parse_mode="HTML",
    )
    assert sent.caption == "a blue square" and sent.caption_entities[0].type == "bold"
    got = await emu.next_bot_message(CHAT, timeout=5)
    assert got["photo_bytes"] == figure
    assert got["photo"][-1]["width"] == 640
    again = await bot.send_photo(CHAT, sent.photo[-1].file_id)
    assert again.photo[-1].file_id == sent.photo[-1].file_id
    with pytest.raises(TelegramBadRequest, match="IMAGE_PROCESS_FAILED"):
        await bot.send_photo(CHAT, BufferedInputFile(b"junk", "x.png"))
    with pytest.raises(TelegramBadRequest, match="wrong file identifier"):
        await bot.send_photo(CHAT, "https://example.invalid/x.png")


async def test_send_document(emu, bot):
    emu.user_sends_text(CHAT, "hi")
    await bot.send_document(CHAT, BufferedInputFile(b"a,b\n1,2\n", "table.csv"), caption="data")
    got = await emu.next_bot_message(CHAT, timeout=5)
    assert got["document"]["file_name"] == "table.csv"
    assert got["document_bytes"] == b"a,b\n1,2\n"
    assert got["caption"] == "data"


async def test_file_store_is_bounded(emu, bot):
    small = BotAPIEmulator(bot_token=TOKEN, max_files=3)
    first = small.user_sends_document(CHAT, b"1", "1.txt", "text/plain")
    for n in range(3):
        small.user_sends_document(CHAT, b"x", f"{n}.txt", "text/plain")
    assert len(small.files) == 3
    assert small.files.get(first["document"]["file_id"]) is None
    by_bytes = BotAPIEmulator(bot_token=TOKEN, max_file_bytes=10)
    for n in range(4):
        by_bytes.user_sends_document(CHAT, b"12345", f"{n}.txt", "text/plain")
    assert by_bytes.files.total_bytes <= 10


# --- edits, buttons, actions, commands ---------------------------------------------------------


async def test_edits(emu, bot):
    emu.user_sends_text(CHAT, "hi")
    keyboard = InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text="b", callback_data="d")]]
    )
    sent = await bot.send_message(CHAT, "first", reply_markup=keyboard)
    edited = await bot.edit_message_text(
        "second", chat_id=CHAT, message_id=sent.message_id, reply_markup=keyboard
    )
    assert edited.text == "second" and edited.edit_date and edited.reply_markup
    with pytest.raises(TelegramBadRequest, match="message is not modified"):
        await bot.edit_message_text(
            "second", chat_id=CHAT, message_id=sent.message_id, reply_markup=keyboard
        )
    bare = await bot.edit_message_reply_markup(chat_id=CHAT, message_id=sent.message_id)
    assert bare.reply_markup is None
    with pytest.raises(TelegramBadRequest, match="there is no caption"):
        await bot.edit_message_caption(chat_id=CHAT, message_id=sent.message_id, caption="c")
    photo = await bot.send_photo(CHAT, BufferedInputFile(png_bytes(), "p.png"), caption="old")
    recaptioned = await bot.edit_message_caption(
        chat_id=CHAT, message_id=photo.message_id, caption="new"
    )
    assert recaptioned.caption == "new"
    with pytest.raises(TelegramBadRequest, match="message to edit not found"):
        await bot.edit_message_text("x", chat_id=CHAT, message_id=999)
    kinds = [e["type"] for e in emu.chat_events(CHAT)]
    assert kinds.count("edited_message") == 3
    assert emu.chat_history(CHAT)[1]["text"] == "second"


async def test_button_press_and_callback_answer(emu, bot):
    emu.user_sends_text(CHAT, "hi")
    keyboard = InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text="Attention map", callback_data="att")]]
    )
    sent = await bot.send_message(CHAT, "caption", reply_markup=keyboard)
    query_id = emu.user_presses_button(CHAT, sent.message_id, "att")
    updates = await bot.get_updates(timeout=0)
    query = updates[-1].callback_query
    assert (
        query.id == query_id and query.data == "att" and query.message.message_id == sent.message_id
    )
    assert await bot.answer_callback_query(query.id, text="Drawing…")
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query.id)
    answer = [e for e in emu.chat_events(CHAT) if e["type"] == "callback_answer"]
    assert answer[0]["text"] == "Drawing…"


async def test_chat_action(emu, bot):
    emu.user_sends_text(CHAT, "hi")
    assert await bot.send_chat_action(CHAT, "typing")
    assert emu.chat_events(CHAT)[-1]["action"] == "typing"
    with pytest.raises(TelegramBadRequest, match="wrong parameter action"):
        await bot.send_chat_action(CHAT, "dancing")


async def test_commands(emu, bot):
    assert await bot.set_my_commands(
        [
            BotCommand(command="start", description="Start"),
            BotCommand(command="sample", description="Sample captions"),
        ]
    )
    assert [c.command for c in await bot.get_my_commands()] == ["start", "sample"]
    assert [c["command"] for c in emu.commands()] == ["start", "sample"]
    with pytest.raises(TelegramBadRequest, match="BOT_COMMAND_INVALID"):
        await bot.set_my_commands([BotCommand(command="Bad Command", description="x")])
    assert await bot.delete_my_commands()
    assert await bot.get_my_commands() == []


# --- faults -------------------------------------------------------------------------------------


async def test_fault_500_then_normal(emu, bot):
    emu.inject_fault("getMe", status=500, times=2)
    for _ in range(2):
        with pytest.raises(TelegramServerError):
            await bot.get_me()
    assert (await bot.get_me()).id == 123456
    assert [name for name, _ in emu.calls] == ["getMe"] * 3


async def test_fault_429_carries_retry_after(emu, bot):
    emu.user_sends_text(CHAT, "hi")
    emu.inject_fault("sendMessage", status=429, retry_after=3)
    with pytest.raises(TelegramRetryAfter) as caught:
        await bot.send_message(CHAT, "x")
    assert caught.value.retry_after == 3
    assert "retry after 3" in caught.value.message
    assert (await bot.send_message(CHAT, "x")).text == "x"


async def test_fault_delay_then_answer(emu, bot):
    emu.inject_fault("getMe", delay=0.5)
    started = time.monotonic()
    assert (await bot.get_me()).id == 123456
    assert time.monotonic() - started >= 0.5


async def test_fault_on_download(emu, bot):
    sent = emu.user_sends_photo(CHAT, png_bytes())
    file = await bot.get_file(sent["photo"][-1]["file_id"])
    emu.inject_fault("download", status=502)
    with pytest.raises(aiohttp.ClientResponseError):
        await bot.download_file(file.file_path)
    assert len((await bot.download_file(file.file_path)).read()) == sent["photo"][-1]["file_size"]


async def test_upload_too_large_is_413(emu, bot):
    emu.user_sends_text(CHAT, "hi")
    with pytest.raises(TelegramEntityTooLarge):
        await bot.send_photo(CHAT, BufferedInputFile(b"\0" * (10 * 1024 * 1024 + 1), "big.png"))


# --- waiting helpers ----------------------------------------------------------------------------


async def test_wait_helpers_time_out_with_context(emu, bot):
    await bot.get_me()
    with pytest.raises(TimeoutError, match="getMe"):
        await emu.next_bot_message(CHAT, timeout=0.2)
    assert (await emu.wait_for_call("getme", timeout=1)) == {}
    with pytest.raises(TimeoutError):  # each call is returned once
        await emu.wait_for_call("getMe", timeout=0.2)


async def test_stop_releases_long_poll(bot):
    emulator = BotAPIEmulator(bot_token=TOKEN)
    await emulator.start()
    poll_bot = make_bot(emulator)
    try:
        poll = asyncio.create_task(poll_bot.get_updates(timeout=30))
        await emulator.wait_for_call("getUpdates", timeout=5)
        started = time.monotonic()
        await emulator.stop()
        assert await asyncio.wait_for(poll, 5) == []
        assert time.monotonic() - started < 4
    finally:
        await poll_bot.session.close()


# --- end to end with a polling dispatcher --------------------------------------------------------


async def test_dispatcher_end_to_end_survives_get_updates_fault(emu):
    dispatcher = Dispatcher()

    @dispatcher.message(F.photo)
    async def on_photo(message: Message, bot: Bot) -> None:
        await bot.send_chat_action(message.chat.id, "typing")
        data = await bot.download(message.photo[-1].file_id)
        width, height = Image.open(data).size
        await message.reply(f"<b>{width}x{height}</b>", parse_mode="HTML")

    @dispatcher.message(F.text)
    async def on_text(message: Message) -> None:
        await message.answer(message.text.upper())

    polling_bot = make_bot(emu)
    emu.inject_fault("getUpdates", status=502)  # aiogram backs off and polls again
    polling = asyncio.create_task(
        dispatcher.start_polling(polling_bot, handle_signals=False, polling_timeout=1)
    )
    try:
        photo = emu.user_sends_photo(CHAT, png_bytes((123, 45)))
        reply = await emu.next_bot_message(CHAT, timeout=15)
        assert reply["text"] == "123x45" and reply["entities"][0]["type"] == "bold"
        assert reply["reply_to_message"]["message_id"] == photo["message_id"]
        assert await emu.wait_for_call("sendChatAction", timeout=1) == {
            "chat_id": CHAT,
            "action": "typing",
        }
        emu.user_sends_text(CHAT, "shout")
        assert (await emu.next_bot_message(CHAT, timeout=10))["text"] == "SHOUT"
    finally:
        await dispatcher.stop_polling()
        await asyncio.wait_for(polling, 10)
        await polling_bot.session.close()

"""The playground's page and page API (HTTP level; the browser test drives the page itself)."""

from __future__ import annotations

import asyncio
import io
import re
import threading

import aiohttp
import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.types import BufferedInputFile, InlineKeyboardButton, InlineKeyboardMarkup
from PIL import Image

from bot.emulator import files as emulator_files
from bot.emulator.playground import start_playground

pytestmark = pytest.mark.timeout(60)
CHAT = 424242


def png_bytes(size=(300, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def emu():
    emulator = await start_playground(host="127.0.0.1", port=0)
    yield emulator
    await emulator.stop()


def page_token(page: str) -> str:
    """The per-page token the chat page is served with (its script sends it on every call)."""
    return re.search(r'<meta name="playground-token" content="([^"]+)">', page).group(1)


@pytest.fixture
async def http(emu):
    """A client that behaves like the page: it read the page's token first."""
    async with aiohttp.ClientSession(base_url=emu.base_url) as first, first.get("/") as resp:
        token = page_token(await resp.text())
    async with aiohttp.ClientSession(
        base_url=emu.base_url,
        timeout=aiohttp.ClientTimeout(total=20),
        headers={"X-Playground-Token": token},
    ) as session:
        yield session


@pytest.fixture
async def bot(emu):
    client = Bot(
        emu.bot_token, session=AiohttpSession(api=TelegramAPIServer.from_base(emu.base_url))
    )
    yield client
    await client.session.close()


async def test_start_playground_serves_page_and_bot_api_on_one_port(emu, http, bot):
    assert emu.page_url == f"{emu.base_url}/"
    assert (await bot.get_me()).id == emu.bot_user["id"]
    async with http.get("/") as resp:
        assert resp.status == 200
        assert "Content-Security-Policy" in resp.headers
        assert 'src="/static/app.js"' in await resp.text()
    for name in ("app.js", "style.css"):
        async with http.get(f"/static/{name}") as resp:
            assert resp.status == 200, name
    async with http.get("/api/info") as resp:
        info = await resp.json()
    assert info["bot"]["first_name"] and info["commands"] == []


async def test_text_from_page_reaches_the_bot_and_replies_come_back_as_events(emu, http, bot):
    async with http.post(f"/api/chats/{CHAT}/messages", json={"text": "/start"}) as resp:
        sent = (await resp.json())["message"]
    update = (await bot.get_updates(timeout=0))[0]
    assert update.message.text == "/start" and update.message.chat.id == CHAT
    last = (await (await http.get(f"/api/chats/{CHAT}/events")).json())["events"][-1]["seq"]

    async def bot_replies_later():
        await asyncio.sleep(0.3)
        await bot.send_chat_action(CHAT, "typing")
        keyboard = InlineKeyboardMarkup(
            inline_keyboard=[[InlineKeyboardButton(text="Go", callback_data="go")]]
        )
        await bot.send_message(
            CHAT,
            "<b>Hi</b>",
            parse_mode="HTML",
            reply_to_message_id=sent["message_id"],
            reply_markup=keyboard,
        )

    replying = asyncio.create_task(bot_replies_later())
    async with http.get(f"/api/chats/{CHAT}/events", params={"after": last, "timeout": 10}) as resp:
        events = (await resp.json())["events"]
    await replying
    events += (
        await (
            await http.get(f"/api/chats/{CHAT}/events", params={"after": events[-1]["seq"]})
        ).json()
    )["events"]
    assert [e["type"] for e in events] == ["chat_action", "message"]
    reply = events[1]["message"]
    assert reply["text"] == "Hi" and reply["entities"][0]["type"] == "bold"
    assert reply["reply_to_message"]["text"] == "/start"

    async with http.post(
        f"/api/chats/{CHAT}/buttons",
        json={"message_id": reply["message_id"], "callback_data": "go"},
    ) as resp:
        query_id = (await resp.json())["callback_query_id"]
    query = (await bot.get_updates(offset=update.update_id + 1, timeout=0))[0].callback_query
    assert query.id == query_id and query.data == "go"
    await bot.answer_callback_query(query.id, text="Done", show_alert=True)
    answer = emu.chat_events(CHAT)[-1]
    assert answer["type"] == "callback_answer" and answer["text"] == "Done" and answer["show_alert"]


async def test_upload_image_becomes_photo_and_other_files_documents(emu, http, bot):
    form = aiohttp.FormData()
    form.add_field("file", png_bytes(), filename="scene.png", content_type="image/png")
    form.add_field("caption", "/attention")
    async with http.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
        photo_message = (await resp.json())["message"]
    assert photo_message["photo"][-1]["width"] == 300
    assert photo_message["caption_entities"][0]["type"] == "bot_command"

    form = aiohttp.FormData()
    form.add_field(
        "file", b"<script>alert(1)</script>", filename="evil.html", content_type="text/html"
    )
    form.add_field("reply_to_message_id", str(photo_message["message_id"]))
    async with http.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
        document_message = (await resp.json())["message"]
    assert document_message["document"]["file_name"] == "evil.html"
    assert document_message["reply_to_message"]["message_id"] == photo_message["message_id"]

    async with http.get(f"/api/files/{photo_message['photo'][-1]['file_id']}") as resp:
        assert resp.content_type == "image/png"
        assert await resp.read() == png_bytes()
    async with http.get(f"/api/files/{document_message['document']['file_id']}") as resp:
        # never rendered as a page of this origin
        assert resp.content_type == "application/octet-stream"
        assert resp.headers["Content-Disposition"].startswith("attachment")
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get("/api/files/missing") as resp:
        assert resp.status == 404 and "error" in await resp.json()

    messages = [u.message for u in await bot.get_updates(timeout=0)]
    assert messages[0].photo and messages[1].document


async def test_bot_photo_is_served_to_the_page(emu, http, bot):
    await http.post(f"/api/chats/{CHAT}/messages", json={"text": "/attention"})
    await bot.send_photo(
        CHAT, BufferedInputFile(png_bytes((64, 64)), "figure.png"), caption="figure"
    )
    message = emu.chat_events(CHAT)[-1]["message"]
    async with http.get(f"/api/files/{message['photo'][-1]['file_id']}") as resp:
        assert resp.status == 200 and resp.content_type == "image/png"


async def test_page_api_refuses_bad_input(emu, http):
    async def status(method, path, **kwargs):
        async with http.request(method, path, **kwargs) as resp:
            return resp.status, await resp.json()

    assert (await status("POST", f"/api/chats/{CHAT}/messages", json={"text": "  "}))[0] == 400
    assert (await status("POST", "/api/chats/abc/messages", json={"text": "x"}))[0] == 400
    assert (await status("POST", "/api/chats/0/messages", json={"text": "x"}))[0] == 400
    code, body = await status(
        "POST", f"/api/chats/{CHAT}/messages", json={"text": "x", "reply_to_message_id": 99}
    )
    assert code == 400 and "no message 99" in body["error"]
    code, body = await status("POST", f"/api/chats/{CHAT}/buttons", json={"message_id": 1})
    assert code == 400
    code, body = await status(
        "POST",
        f"/api/chats/{CHAT}/messages",
        json={"text": "x"},
        headers={"Origin": "http://evil.example"},
    )
    assert code == 403 and "cross-origin" in body["error"]
    code, body = await status("GET", "/api/info", headers={"Host": "evil.example"})
    assert code == 403


async def test_an_iphone_heic_dropped_on_the_page_is_a_photo_the_page_can_show(emu, http):
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 90, 200)).save(buffer, "HEIF")
    form = aiohttp.FormData()
    form.add_field("file", buffer.getvalue(), filename="IMG_0007.HEIC", content_type="image/heic")
    async with http.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
        message = (await resp.json())["message"]
    largest = message["photo"][-1]
    assert (largest["width"], largest["height"]) == (640, 480)
    async with http.get(f"/api/files/{largest['file_id']}") as resp:
        assert resp.content_type == "image/jpeg"  # what a browser shows (and Telegram keeps)
        assert Image.open(io.BytesIO(await resp.read())).size == (640, 480)


async def test_upload_over_the_limit_is_refused(emu, http, monkeypatch):
    monkeypatch.setattr("bot.emulator.playground.MAX_PAGE_UPLOAD_BYTES", 1000)
    form = aiohttp.FormData()
    form.add_field("file", b"x" * 5000, filename="big.bin", content_type="application/octet-stream")
    async with http.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
        assert resp.status == 413
        assert "larger than" in (await resp.json())["error"]


async def test_events_long_poll_is_bounded_and_released_on_stop():
    emulator = await start_playground(host="127.0.0.1", port=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        poll = asyncio.create_task(
            http.get(f"{emulator.base_url}/api/chats/{CHAT}/events?timeout=999")
        )
        await asyncio.sleep(0.3)
        await emulator.stop()
        resp = await asyncio.wait_for(poll, 5)
        assert (await resp.json())["events"] == []


async def test_forged_cross_site_requests_are_refused(emu, http):
    """What another web site open in the same browser can send: each is refused, and no
    message, upload or button press reaches a chat."""
    token = http.headers["X-Playground-Token"]
    sent = emu.user_sends_text(CHAT, "hello")
    forgeries = {
        # A sandboxed iframe (or a file:// page) sends `Origin: null`, even with the token.
        "null origin": dict(json={"text": "/start"}, headers={"Origin": "null"}),
        "other origin": dict(json={"text": "/start"}, headers={"Origin": "http://evil.example"}),
        # A text/plain body needs no CORS preflight; aiohttp would parse it as JSON all the same.
        "text/plain body": dict(data='{"text": "/start"}', headers={"Content-Type": "text/plain"}),
        # A simple cross-site request carries no custom header: no page token.
        "no token": dict(json={"text": "/start"}, headers={"X-Playground-Token": ""}),
        "wrong token": dict(
            json={"text": "/start"}, headers={"X-Playground-Token": token[:-1] + "x"}
        ),
    }
    async with aiohttp.ClientSession(base_url=emu.base_url) as stranger:  # no token by default
        for label, request in forgeries.items():
            client = http if label in ("null origin", "text/plain body") else stranger
            async with client.post(f"/api/chats/{CHAT}/messages", **request) as resp:
                assert resp.status in (403, 415), (label, resp.status)
        async with stranger.post(
            f"/api/chats/{CHAT}/buttons",
            json={"message_id": sent["message_id"], "callback_data": "go"},
        ) as resp:
            assert resp.status == 403
        form = aiohttp.FormData()
        form.add_field("file", png_bytes(), filename="x.png", content_type="image/png")
        async with stranger.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
            assert resp.status == 403
    assert [update["message"]["text"] for update in emu.pending_updates] == ["hello"]
    # The page itself, with its token and a JSON body, still gets through.
    async with http.post(f"/api/chats/{CHAT}/messages", json={"text": "/start"}) as resp:
        assert resp.status == 200
    # Every page load gets a token; the same playground keeps one for its life.
    async with http.get("/") as resp:
        assert page_token(await resp.text()) == token


def png_claiming_many_pixels(side: int = 7000) -> bytes:
    """A genuine 1-bit PNG (a few kB) of side x side pixels: 49 MP, 147 MB once in RGB."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_uploads_are_checked_from_the_header_and_decoded_off_the_event_loop(
    emu, http, monkeypatch
):
    decoded_in: list[str] = []
    thumbnail = emulator_files._thumbnail

    def spy(data, side):
        decoded_in.append(threading.current_thread().name)
        return thumbnail(data, side)

    monkeypatch.setattr("bot.emulator.files._thumbnail", spy)
    form = aiohttp.FormData()
    form.add_field("file", png_bytes((400, 300)), filename="scene.png", content_type="image/png")
    async with http.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
        assert "photo" in (await resp.json())["message"]
    assert decoded_in and threading.main_thread().name not in decoded_in

    # Over the bot's MAX_IMAGE_PIXELS default: refused from its header, never decoded, so
    # it arrives as a document (which the bot then refuses as too large).
    decoded_in.clear()
    bomb = png_claiming_many_pixels()
    assert len(bomb) < 100_000
    form = aiohttp.FormData()
    form.add_field("file", bomb, filename="bomb.png", content_type="image/png")
    async with http.post(f"/api/chats/{CHAT}/uploads", data=form) as resp:
        message = (await resp.json())["message"]
    assert "document" in message and "photo" not in message
    assert decoded_in == []
    with pytest.raises(ValueError, match="megapixels"):
        emu.user_sends_photo(CHAT, bomb)

"""The playground in a real browser: headless Chromium.

The first test chats with the real bot. It starts `python -m bot --playground` exactly
as a newcomer would (no token, no network), opens the chat page, and uses it the way a
person does: picks a scene image and waits for its caption, picks a real photo (a cat) and
gets the honest reply with what the encoder sees, sends /sample 3 and /attention (a grid
figure), presses the inline buttons (Caption anyway, More samples), replies to a photo,
drops a second image, and checks a second tab is a separate chat. Screenshots go to
artifacts/ (playground.png, the scene caption and the honest reply, is the one the README
shows as docs/playground.png).

The second test plays the bot itself against an in-process playground, to check the
page renders every kind of formatting without interpreting markup, the typing
indicator, edits, callback alerts, documents, deletions and a reload.

Needs Debian's `chromium` (apt-get install -y chromium chromium-driver) and the
playwright Python package; without /usr/bin/chromium the test is skipped, saying why.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from bot_helpers import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
WEIGHT_FILES = ("vocab.json", "encoder.json", "attention.pt")
STARTUP_TIMEOUT_S = 120
# Captioning runs on a shared CPU in CI; generous, but every wait is bounded.
REPLY_TIMEOUT_MS = 90_000

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(540)]


def scene_png(seed: int) -> bytes:
    """A scene of the kind the bundled model was trained on, as PNG bytes."""
    try:
        from model.data.scenes import render_scene

        _, image = render_scene(seed)
    except ImportError:  # the scene renderer is optional for this test
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (224, 224), "white")
        ImageDraw.Draw(image).ellipse((60, 60, 164, 164), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_jpeg() -> bytes:
    """A real photo, not a scene: scikit-image's chelsea (a cat)."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        return json.loads(response.read())


class PlaygroundProcess:
    """`python -m bot --playground` in a subprocess, its output kept for diagnosis."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"
        self.output: list[str] = []
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("TELEGRAM_BOT_TOKEN", "TELEGRAM_API_BASE")
        }
        env["PLAYGROUND_PORT"] = str(port)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "2")  # shared CPUs: keep torch from oversubscribing
        env["CHAT_ACTION_DELAY_MS"] = "0"  # "typing..." at once: the page's indicator is checked
        have_weights = all((REPO / "weights" / name).exists() for name in WEIGHT_FILES)
        if "CAPTIONER" not in env and not have_weights:
            # A checkout without trained weights still shows the whole conversation.
            env["CAPTIONER"] = "untrained"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", "--playground"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))

    def wait_until_ready(self) -> None:
        """Until the page is served and the bot has polled and set its command menu."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the playground exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if get_json(f"{self.url}api/info")["commands"]:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the playground was not ready in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def printed_page_url(self) -> bool:
        return any(re.search(rf"http://127\.0\.0\.1:{self.port}/", line) for line in self.output)

    def log(self) -> str:
        return "\n".join(self.output[-60:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # Ctrl+C: the bot's graceful shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "playground-bot.log").write_text("\n".join(self.output) + "\n")


def require_chromium() -> None:
    if not CHROMIUM.exists():
        reason = (
            f"{CHROMIUM} not found: install Debian's chromium "
            "(apt-get install -y chromium chromium-driver) to run the browser test"
        )
        print(f"SKIPPED browser test: {reason}")
        pytest.skip(reason)
    pytest.importorskip("playwright", reason="the playwright Python package is not installed")


@pytest.fixture
def playground():
    require_chromium()
    process = PlaygroundProcess(free_port())
    try:
        process.wait_until_ready()
        yield process
    finally:
        process.stop()


def test_chat_with_the_real_bot_in_chromium(playground):
    from playwright.sync_api import expect, sync_playwright

    assert playground.printed_page_url(), playground.log()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            context = browser.new_context(viewport={"width": 860, "height": 1000})
            page = context.new_page()
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            try:
                converse(page, expect, playground.url)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "playground-failure.png"))
                raise
            assert page_errors == []
            check_second_tab_is_another_chat(context, page, expect, playground.url)
        finally:
            browser.close()
    assert "Traceback" not in playground.log(), playground.log()


def converse(page, expect, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#bot-name")).to_have_text(re.compile(r"\S"))
    expect(page.locator("#start-button")).to_be_visible()

    bot_messages = page.locator('.message[data-from="bot"]')
    user_messages = page.locator('.message[data-from="user"]')

    # 1. A scene image through the file picker: the caption comes back as a reply to it,
    #    with the inline keyboard, after a chat action ("typing…" / "sending a photo…").
    page.set_input_files(
        "#file-input",
        files=[{"name": "scene.png", "mimeType": "image/png", "buffer": scene_png(3)}],
    )
    photo_message = user_messages.filter(has=page.locator("img.photo")).first
    expect(photo_message).to_be_visible()
    expect(page.locator("#start-button")).to_be_hidden()
    caption_reply = bot_messages.filter(has=page.locator(".keyboard")).first
    expect(caption_reply).to_be_visible(timeout=REPLY_TIMEOUT_MS)
    expect(caption_reply.locator(".quote")).to_contain_text("Photo")
    expect(caption_reply.locator(".text")).to_contain_text("Baseline decoder")
    expect(caption_reply.locator(".keyboard button")).to_have_text(
        ["More samples", "Attention map"]
    )
    expect(page.locator("body")).to_have_attribute(
        "data-last-chat-action", re.compile(r"typing|upload_photo")
    )
    assert photo_loaded(photo_message.locator("img.photo"))

    # 2. A real photo: not captioned, but said plainly, with what the ImageNet classifier
    #    sees (a cat) and the buttons Caption anyway and Attention map.
    page.set_input_files(
        "#file-input",
        files=[{"name": "chelsea.jpg", "mimeType": "image/jpeg", "buffer": photo_jpeg()}],
    )
    honest = bot_messages.filter(has_text="My ImageNet-trained encoder sees")
    expect(honest).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    expect(honest.locator(".text")).to_contain_text("coloured-shape scenes")
    expect(honest.locator(".text")).to_contain_text(re.compile(r"(cat|tabby) \(\d+%\)"))
    expect(honest.locator(".keyboard button")).to_have_text(["Caption anyway", "Attention map"])
    # The scene, its caption, the photo and its honest reply are what the README shows:
    # a taller window for the picture, so both photos fit whole.
    page.set_viewport_size({"width": 860, "height": 1160})
    page.mouse.move(0, 0)
    page.wait_for_timeout(300)  # let the last scroll settle
    page.screenshot(path=str(ARTIFACTS / "playground.png"))
    page.set_viewport_size({"width": 860, "height": 1000})

    # 3. /sample 3 on the photo: a numbered list of three captions, marked as made up.
    send_text(page, "/sample 3")
    expect(bot_messages.filter(has_text="3 sampled captions")).to_have_count(
        1, timeout=REPLY_TIMEOUT_MS
    )
    samples = bot_messages.filter(has_text="3 sampled captions").locator(".text").inner_text()
    assert re.search(r"^1\. .+\n2\. .+\n3\. .+$", samples, re.MULTILINE), samples
    assert samples.startswith("This image is outside my training domain"), samples

    # 4. /attention: a grid figure replying to the command; a click opens it full size.
    send_text(page, "/attention")
    figure = bot_messages.filter(has=page.locator("img.photo")).last
    expect(figure).to_be_visible(timeout=REPLY_TIMEOUT_MS)
    assert photo_loaded(figure.locator("img.photo"))
    expect(figure.locator(".quote")).to_contain_text("/attention")
    width, height = figure.locator("img.photo").evaluate(
        "img => [img.naturalWidth, img.naturalHeight]"
    )
    assert 0.5 <= width / height <= 2, (width, height)  # a grid of tiles, not a strip
    figure.locator("img.photo").click()
    expect(page.locator("#lightbox")).to_be_visible()
    assert photo_loaded(page.locator("#lightbox-image"))
    page.keyboard.press("Escape")
    expect(page.locator("#lightbox")).to_be_hidden()

    # 5. Caption anyway: the captions after all, marked as outside the training domain.
    honest.locator(".keyboard button", has_text="Caption anyway").click()
    expect(page.locator("#toast")).to_contain_text("Captioning")
    anyway = bot_messages.filter(has_text="outside my training domain").filter(
        has_text="Baseline decoder"
    )
    expect(anyway).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    expect(anyway.locator(".keyboard button")).to_have_text(["More samples", "Attention map"])

    # 6. The "More samples" button: the bot answers the callback (a toast) and replies.
    sampled_before = bot_messages.filter(has_text="sampled captions").count()
    caption_reply.locator(".keyboard button", has_text="More samples").click()
    expect(page.locator("#toast")).to_contain_text("Sampling")
    expect(bot_messages.filter(has_text="sampled captions")).to_have_count(
        sampled_before + 1, timeout=REPLY_TIMEOUT_MS
    )

    # 7. Reply to the scene with a command: the quote shows above both messages.
    photo_message.hover()
    photo_message.locator(".reply-action").click()
    expect(page.locator("#reply-bar")).to_be_visible()
    send_text(page, "/sample 2")
    expect(page.locator("#reply-bar")).to_be_hidden()
    expect(user_messages.last.locator(".quote")).to_contain_text("Photo")
    two = bot_messages.filter(has_text="2 sampled captions")
    expect(two).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    expect(two.locator(".quote")).to_contain_text("/sample 2")

    # 8. Drag and drop a second image onto the page.
    photos_before = user_messages.filter(has=page.locator("img.photo")).count()
    captions_before = bot_messages.filter(has=page.locator(".keyboard")).count()
    drop_file(page, "dropped.png", scene_png(11))
    expect(user_messages.filter(has=page.locator("img.photo"))).to_have_count(photos_before + 1)
    expect(bot_messages.filter(has=page.locator(".keyboard"))).to_have_count(
        captions_before + 1, timeout=REPLY_TIMEOUT_MS
    )
    page.screenshot(path=str(ARTIFACTS / "playground-end.png"))


def check_second_tab_is_another_chat(context, first_page, expect, url: str) -> None:
    """Tabs are users: a fresh tab (own sessionStorage) starts its own, empty chat."""
    second = context.new_page()
    second.goto(url, wait_until="domcontentloaded")
    expect(second.locator("#start-button")).to_be_visible()
    second.locator("#start-button").click()
    expect(second.locator('.message[data-from="bot"]')).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    expect(second.locator('.message[data-from="user"] img.photo')).to_have_count(0)
    first_chat = first_page.locator("body").get_attribute("data-chat-id")
    second_chat = second.locator("body").get_attribute("data-chat-id")
    assert first_chat and second_chat and first_chat != second_chat
    second.close()


def send_text(page, text: str) -> None:
    page.fill("#text-input", text)
    page.press("#text-input", "Enter")


def photo_loaded(image) -> bool:
    image.wait_for(state="visible")
    return image.evaluate("img => img.complete && img.naturalWidth > 0")


def drop_file(page, name: str, data: bytes) -> None:
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            for (const type of ["dragenter", "dragover", "drop"]) {
                document.body.dispatchEvent(new DragEvent(type,
                    {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }
        }""",
        [name, base64.b64encode(data).decode()],
    )


async def test_page_renders_what_the_bot_sends_safely():
    """Formatting, typing, edits, alerts and deletions, with this test playing the bot."""
    require_chromium()
    from aiogram import Bot
    from aiogram.client.session.aiohttp import AiohttpSession
    from aiogram.client.telegram import TelegramAPIServer
    from aiogram.types import BufferedInputFile, InlineKeyboardButton, InlineKeyboardMarkup
    from playwright.async_api import async_playwright, expect

    from bot.emulator.playground import start_playground

    chat = 5550001
    emu = await start_playground(host="127.0.0.1", port=0)
    bot = Bot(emu.bot_token, session=AiohttpSession(api=TelegramAPIServer.from_base(emu.base_url)))
    updates = HandPoller(bot)
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page(viewport={"width": 860, "height": 900})
                page_errors: list[str] = []
                dialogs: list[str] = []
                page.on("pageerror", lambda error: page_errors.append(str(error)))
                page.on("dialog", lambda dialog: dialogs.append(dialog.message))
                await page.goto(f"{emu.page_url}?chat={chat}")
                await page.click("#start-button")
                start = await updates.next("message")
                assert start.text == "/start" and start.chat.id == chat

                # a user's own markup is shown as typed
                await page.fill("#text-input", "<b>not bold</b><img src=x onerror=alert(1)>")
                await page.press("#text-input", "Enter")
                mine = page.locator('.message[data-from="user"] .text').last
                await expect(mine).to_have_text("<b>not bold</b><img src=x onerror=alert(1)>")
                assert (
                    await page.locator('.message[data-from="user"] .text b, .text img').count() == 0
                )

                await bot.send_chat_action(chat, "typing")
                await expect(page.locator("#typing-row")).to_be_visible()
                await expect(page.locator("#bot-status")).to_have_text("typing…")

                keyboard = InlineKeyboardMarkup(
                    inline_keyboard=[
                        [
                            InlineKeyboardButton(text="Alert me", callback_data="alert"),
                            InlineKeyboardButton(text="Docs", url="https://example.org/docs"),
                        ]
                    ]
                )
                sent = await bot.send_message(
                    chat,
                    '😀 <b>bold <i>both</i></b> <a href="https://example.org">link</a> '
                    '<a href="javascript:alert(1)">js</a> <code>&lt;img src=x '
                    "onerror=alert(1)&gt;</code> "
                    "<tg-spoiler>secret</tg-spoiler>\n<pre><code "
                    'class="language-python">print(1)</code></pre>'
                    "<u>end</u> /help",
                    parse_mode="HTML",
                    reply_to_message_id=start.message_id,
                    reply_markup=keyboard,
                )
                reply = page.locator(f'.message[data-message-id="{sent.message_id}"]')
                await expect(reply).to_be_visible()
                await expect(page.locator("#typing-row")).to_be_hidden()  # a message ends "typing"
                await expect(reply.locator(".quote")).to_contain_text("/start")
                text = reply.locator(".text")
                await expect(text.locator("b")).to_have_text("bold both")
                await expect(text.locator("b i")).to_have_text("both")
                await expect(text.locator('a[href="https://example.org"]')).to_have_text("link")
                assert await text.locator('a[href^="javascript"]').count() == 0
                await expect(text.locator("code").first).to_have_text(
                    "<img src=x onerror=alert(1)>"
                )
                assert await page.locator(".text img").count() == 0
                await expect(text.locator(".spoiler")).to_have_text("secret")
                await expect(text.locator('pre code[data-language="python"]')).to_have_text(
                    "print(1)"
                )
                await expect(text.locator("u")).to_have_text(
                    "end"
                )  # UTF-16 offsets after the emoji
                await expect(text.locator(".command")).to_have_text("/help")
                await expect(
                    reply.locator('.keyboard a[href="https://example.org/docs"]')
                ).to_be_visible()

                await bot.edit_message_text(
                    "edited <b>text</b>",
                    chat_id=chat,
                    message_id=sent.message_id,
                    parse_mode="HTML",
                )
                await expect(reply.locator(".text")).to_have_text("edited text")
                await expect(reply.locator(".meta")).to_contain_text("edited")
                await expect(reply.locator(".keyboard")).to_have_count(
                    0
                )  # an edit without markup drops it

                with_button = await bot.send_message(chat, "press", reply_markup=keyboard)
                await page.locator(
                    f'.message[data-message-id="{with_button.message_id}"] .keyboard button'
                ).click()
                query = await updates.next("callback_query")
                assert query.data == "alert" and query.message.message_id == with_button.message_id
                await bot.answer_callback_query(query.id, text="Careful!", show_alert=True)
                await expect(page.locator("#alert")).to_be_visible()
                await expect(page.locator("#alert-text")).to_have_text("Careful!")
                await page.click("#alert-ok")

                await bot.send_document(
                    chat, BufferedInputFile(b"a,b\n", "table.csv"), caption="data"
                )
                document = page.locator(".message .document").last
                await expect(document).to_contain_text("table.csv")
                await bot.delete_message(chat, with_button.message_id)
                await expect(
                    page.locator(f'.message[data-message-id="{with_button.message_id}"]')
                ).to_have_count(0)

                # a reload shows the same chat again, from the emulator's history
                await page.reload()
                await expect(
                    page.locator(f'.message[data-message-id="{sent.message_id}"] .text')
                ).to_have_text("edited text")
                await expect(page.locator("#start-button")).to_be_hidden()
                assert page_errors == [] and dialogs == []
            finally:
                await browser.close()
    finally:
        await bot.session.close()
        await emu.stop()


class HandPoller:
    """getUpdates by hand for a test that plays the bot itself, confirming as it goes."""

    def __init__(self, bot):
        self.bot = bot
        self.offset = 0

    async def next(self, kind: str, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for update in await self.bot.get_updates(offset=self.offset, timeout=1):
                self.offset = update.update_id + 1
                if getattr(update, kind) is not None:
                    return getattr(update, kind)
        raise AssertionError(f"no {kind} update within {timeout}s")

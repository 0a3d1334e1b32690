"""Markup to entities, as Telegram's server does it (no network, no bot)."""

from __future__ import annotations

import socket

import pytest

from bot.emulator import BotAPIEmulator, BotAPIError
from bot.emulator.formatting import (
    command_entities,
    parse_formatted,
    utf16_len,
    with_detected_entities,
)
from bot.emulator.playground import start_playground


def kinds(entities):
    return [(e["type"], e["offset"], e["length"]) for e in entities]


def test_offsets_are_utf16_code_units():
    assert utf16_len("a😀b") == 4
    text, entities = parse_formatted("😀 <b>bold</b>", "HTML")
    assert text == "😀 bold" and kinds(entities) == [("bold", 3, 4)]


def test_html_nested_links_pre_and_escapes():
    text, entities = parse_formatted(
        '<a href="https://example.org"><b>x</b>y</a> &lt;3 <pre><code '
        'class="language-python">p</code></pre>',
        "HTML",
    )
    assert text == "xy <3 p"
    assert kinds(entities) == [("text_link", 0, 2), ("bold", 0, 1), ("pre", 6, 1)]
    assert entities[0]["url"] == "https://example.org"
    assert entities[2]["language"] == "python"


@pytest.mark.parametrize(
    "markup, reason",
    [
        ("<b>x", "Can't find end tag"),
        ("<b>x</i>", "Unexpected end tag"),
        ("<script>x</script>", 'Unsupported start tag "script" at byte offset 0'),
        ("é\n<div>", 'Unsupported start tag "div" at byte offset 3'),
        ("a<br/>b", "Unsupported start tag"),
        ('<a href="">x</a>', "Can't parse URL"),
    ],
)
def test_html_errors_match_telegram(markup, reason):
    with pytest.raises(BotAPIError) as caught:
        parse_formatted(markup, "HTML")
    assert caught.value.error_code == 400
    assert caught.value.description.startswith("Bad Request: can't parse entities: ")
    assert reason in caught.value.description


def test_markdown_v2():
    text, entities = parse_formatted(
        r"*b* _i_ __u__ ~s~ ||sp|| `c` [l](https://x.org) 1\.5", "MarkdownV2"
    )
    assert text == "b i u s sp c l 1.5"
    assert [e["type"] for e in entities] == [
        "bold",
        "italic",
        "underline",
        "strikethrough",
        "spoiler",
        "code",
        "text_link",
    ]
    with pytest.raises(BotAPIError, match="Character '!' is reserved"):
        parse_formatted("Hi!", "MarkdownV2")
    with pytest.raises(BotAPIError, match="Can't find end"):
        parse_formatted("*open", "MarkdownV2")


def test_legacy_markdown_is_lenient_about_punctuation():
    text, entities = parse_formatted("*Done.* see `x`!", "Markdown")
    assert text == "Done. see x!" and [e["type"] for e in entities] == ["bold", "code"]


def test_plain_text_and_unknown_parse_mode():
    assert parse_formatted("<b>x</b>", None) == ("<b>x</b>", [])
    with pytest.raises(BotAPIError, match="unsupported parse_mode"):
        parse_formatted("x", "BBCode")


def test_detected_commands_and_urls():
    assert kinds(command_entities("/sample 5 and /help@captionbot, not a/b")) == [
        ("bot_command", 0, 7),
        ("bot_command", 14, 16),
    ]
    entities = with_detected_entities("see https://example.org/x. then /start", [])
    assert kinds(entities) == [("url", 4, 21), ("bot_command", 32, 6)]
    # nothing is detected inside code
    assert with_detected_entities("`/start`", [{"type": "code", "offset": 0, "length": 8}]) == [
        {"type": "code", "offset": 0, "length": 8}
    ]


async def test_calls_are_bounded_without_breaking_wait_for_call():
    emu = BotAPIEmulator(max_calls=10)
    await emu.start()
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            for n in range(25):
                async with http.post(f"{emu.base_url}/bot{emu.bot_token}/getMe", json={"n": n}):
                    pass
        assert len(emu.calls) <= 10
        assert (await emu.wait_for_call("getMe", timeout=1))["n"] >= 15
    finally:
        await emu.stop()


async def test_busy_port_gives_a_helpful_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="PLAYGROUND_PORT"):
            await start_playground(host="127.0.0.1", port=port)

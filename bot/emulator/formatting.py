"""Message formatting: turning parse_mode markup into plain text plus entities.

Telegram never stores markup: it parses HTML / MarkdownV2 / Markdown into the message
text and a list of MessageEntity objects (offsets and lengths in UTF-16 code units), and
rejects malformed markup with "can't parse entities". Doing the same here means a bot
that sends broken markup fails against the emulator exactly as it would in production,
and the chat page can render formatting from entities without ever interpreting HTML.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from .errors import BotAPIError, bad_request


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _entities_error(reason: str) -> BotAPIError:
    return bad_request(f"can't parse entities: {reason}")


def parse_formatted(text: str, parse_mode: str | None) -> tuple[str, list[dict[str, Any]]]:
    """Plain text and entities for `text` sent with `parse_mode` (None: text as is)."""
    if not parse_mode:
        return text, []
    mode = parse_mode.lower()
    if mode == "html":
        return _HTMLEntityParser().parse(text)
    if mode == "markdownv2":
        return _MarkdownParser(text, v2=True).parse()
    if mode == "markdown":
        return _MarkdownParser(text, v2=False).parse()
    raise bad_request("unsupported parse_mode")


_COMMAND = re.compile(r"(?<![^\s])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")


def command_entities(text: str) -> list[dict[str, Any]]:
    """The bot_command entities Telegram's clients attach to what a user types."""
    entities = []
    for match in _COMMAND.finditer(text):
        entities.append(
            {
                "type": "bot_command",
                "offset": utf16_len(text[: match.start()]),
                "length": utf16_len(match.group()),
            }
        )
    return entities


_URL = re.compile(r"(?<![\w@/])https?://[^\s<>\"']+[^\s<>\"'.,;:!?)\]]")
# Detected entities are not added inside these: "/start" in a code span stays code.
_OPAQUE_ENTITIES = {"code", "pre", "text_link", "url", "bot_command", "email", "mention"}


def with_detected_entities(text: str, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`entities` plus the commands and URLs Telegram's server detects in any message."""
    taken = [
        (e["offset"], e["offset"] + e["length"]) for e in entities if e["type"] in _OPAQUE_ENTITIES
    ]
    detected = command_entities(text)
    for match in _URL.finditer(text):
        detected.append(
            {
                "type": "url",
                "offset": utf16_len(text[: match.start()]),
                "length": utf16_len(match.group()),
            }
        )
    added = [
        e
        for e in detected
        if not any(start < e["offset"] + e["length"] and e["offset"] < end for start, end in taken)
    ]
    return _sorted([*entities, *added]) if added else entities


def _sorted(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept = [e for e in entities if e["length"] > 0]
    return sorted(kept, key=lambda e: (e["offset"], -e["length"]))


# --- HTML ---------------------------------------------------------------------------

_SIMPLE_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
}


class _HTMLEntityParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._text: list[str] = []
        self._length16 = 0
        # (tag, entity being built); None for a tag that adds no entity of its own
        self._open: list[tuple[str, dict[str, Any] | None]] = []
        self._entities: list[dict[str, Any]] = []

    def parse(self, markup: str) -> tuple[str, list[dict[str, Any]]]:
        self._markup = markup
        self.feed(markup)
        self.close()
        if self._open:
            tag = self._open[-1][0]  # the innermost tag left open
            raise _entities_error(f'Can\'t find end tag corresponding to start tag "{tag}"')
        return "".join(self._text), _sorted(self._entities)

    def _offset(self) -> int:
        """Byte offset (UTF-8, as Telegram reports it) of the tag being handled."""
        line, column = self.getpos()
        lines = self._markup.splitlines(keepends=True)
        before = "".join(lines[: line - 1]) + lines[line - 1][:column] if lines else ""
        return len(before.encode())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        entity: dict[str, Any]
        if tag == "a":
            href = attributes.get("href") or ""
            if not href:
                raise _entities_error(f"Can't parse URL at byte offset {self._offset()}")
            entity = {"type": "text_link", "url": href}
        elif tag == "span" and attributes.get("class") == "tg-spoiler":
            entity = {"type": "spoiler"}
        elif tag == "tg-emoji":
            entity = {"type": "custom_emoji", "custom_emoji_id": attributes.get("emoji-id", "")}
        elif tag == "blockquote" and "expandable" in attributes:
            entity = {"type": "expandable_blockquote"}
        elif tag == "code" and self._open and self._open[-1][0] == "pre":
            # <pre><code class="language-x"> is one pre entity, with a language
            language = (attributes.get("class") or "").removeprefix("language-")
            pre = self._open[-1][1]
            if language and pre is not None:
                pre["language"] = language
            self._open.append((tag, None))
            return
        elif tag in _SIMPLE_TAGS:
            entity = {"type": _SIMPLE_TAGS[tag]}
        else:
            raise _entities_error(f'Unsupported start tag "{tag}" at byte offset {self._offset()}')
        entity["offset"] = self._length16
        self._open.append((tag, entity))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        raise _entities_error(f'Unsupported start tag "{tag}" at byte offset {self._offset()}')

    def handle_endtag(self, tag: str) -> None:
        if not self._open or self._open[-1][0] != tag:
            raise _entities_error(f"Unexpected end tag at byte offset {self._offset()}")
        _, entity = self._open.pop()
        if entity is not None:
            entity["length"] = self._length16 - entity["offset"]
            self._entities.append(entity)

    def handle_data(self, data: str) -> None:
        self._text.append(data)
        self._length16 += utf16_len(data)


# --- Markdown -----------------------------------------------------------------------

_V2_RESERVED = set("_*[]()~`>#+-=|{}.!")
_V2_MARKERS = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough", "||": "spoiler"}
_V1_MARKERS = {"*": "bold", "_": "italic"}


class _MarkdownParser:
    """MarkdownV2 (strict: reserved characters must be escaped) and legacy Markdown."""

    def __init__(self, markup: str, v2: bool):
        self.markup = markup
        self.v2 = v2
        self.pos = 0
        self.out: list[str] = []
        self.length16 = 0
        self.entities: list[dict[str, Any]] = []
        self.open: dict[str, int] = {}  # marker -> offset where it opened

    def emit(self, text: str) -> None:
        self.out.append(text)
        self.length16 += utf16_len(text)

    def parse(self) -> tuple[str, list[dict[str, Any]]]:
        m = self.markup
        markers = _V2_MARKERS if self.v2 else _V1_MARKERS
        while self.pos < len(m):
            ch = m[self.pos]
            two = m[self.pos : self.pos + 2]
            if ch == "\\" and self.pos + 1 < len(m) and (self.v2 or m[self.pos + 1] in "_*`["):
                self.emit(m[self.pos + 1])
                self.pos += 2
            elif m.startswith("```", self.pos):
                self._code_block()
            elif ch == "`":
                self._inline_code()
            elif ch == "[":
                self._link()
            elif self.v2 and two in markers:
                self._toggle(two)
                self.pos += 2
            elif ch in markers:
                self._toggle(ch)
                self.pos += 1
            elif self.v2 and ch in _V2_RESERVED:
                raise _entities_error(
                    f"Character '{ch}' is reserved and must be escaped with the preceding '\\'"
                )
            else:
                self.emit(ch)
                self.pos += 1
        if self.open:
            marker, offset = next(iter(self.open.items()))
            raise _entities_error(f"Can't find end of the entity starting at byte offset {offset}")
        return "".join(self.out), _sorted(self.entities)

    def _toggle(self, marker: str) -> None:
        kind = (_V2_MARKERS if self.v2 else _V1_MARKERS)[marker]
        if marker in self.open:
            start = self.open.pop(marker)
            self.entities.append({"type": kind, "offset": start, "length": self.length16 - start})
        else:
            self.open[marker] = self.length16

    def _until(self, terminator: str, start: int) -> tuple[str, int]:
        """Raw text up to `terminator` (backslash escapes honoured), and the index after it."""
        m, i, chunk = self.markup, start, []
        while i < len(m):
            if self.v2 and m[i] == "\\" and i + 1 < len(m):
                chunk.append(m[i + 1])
                i += 2
            elif m.startswith(terminator, i):
                return "".join(chunk), i + len(terminator)
            else:
                chunk.append(m[i])
                i += 1
        raise _entities_error(f"Can't find end of the entity starting at byte offset {start - 1}")

    def _code_block(self) -> None:
        body, self.pos = self._until("```", self.pos + 3)
        language, newline, rest = body.partition("\n")
        entity: dict[str, Any] = {"type": "pre"}
        if newline and language and " " not in language:
            entity["language"] = language
            body = rest
        entity["offset"] = self.length16
        self.emit(body)
        entity["length"] = self.length16 - entity["offset"]
        self.entities.append(entity)

    def _inline_code(self) -> None:
        body, self.pos = self._until("`", self.pos + 1)
        start = self.length16
        self.emit(body)
        self.entities.append({"type": "code", "offset": start, "length": self.length16 - start})

    def _link(self) -> None:
        label, after = self._until("]", self.pos + 1)
        if not self.markup.startswith("(", after):
            if self.v2:
                raise _entities_error(
                    "Character '[' is reserved and must be escaped with the preceding '\\'"
                )
            self.emit("[")
            self.pos += 1
            return
        url, self.pos = self._until(")", after + 1)
        start = self.length16
        self.emit(label)
        self.entities.append(
            {"type": "text_link", "offset": start, "length": self.length16 - start, "url": url}
        )

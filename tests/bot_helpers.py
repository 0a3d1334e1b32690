"""Running the real bot (`python -m bot` in a subprocess) against the Bot API emulator.

The bot polls the emulator over real HTTP on 127.0.0.1. Its stdout/stderr are kept in
memory so tests can look for log lines, and check the token never shows up in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_asyncio
from PIL import Image

from bot.emulator import BotAPIEmulator

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights"
TOKEN = "123456789:AAH-bot_token_SECRET_part_0123456789"

# End-to-end tests only check structure (numbering, counts, reply ids, figure sizes), so
# they hold for any captioner; the trained weights are used once they exist.
HAVE_WEIGHTS = all(
    (WEIGHTS / name).exists()
    for name in ("vocab.json", "encoder.json", "attention.pt", "baseline.pt")
)


def without_torch(tmp: Path) -> str:
    """A PYTHONPATH where `import torch` fails as where torch is not installed (the Docker
    image): first on it, a package named torch that raises what a missing one raises."""
    fake = tmp / "no-torch" / "torch"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    return os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bot_env(base_url: str, tmp: Path, **overrides: Any) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    }
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_BASE": base_url,
            "WEIGHTS_DIR": str(WEIGHTS),
            "CAPTIONER": "bundled" if HAVE_WEIGHTS else "untrained",
            "DEVICE": "cpu",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "HEALTH_FILE": str(tmp / "health"),
            "SEND_RETRY_TIMEOUT_S": "8",
            "SHUTDOWN_TIMEOUT_S": "20",
            # Two cores shared with everything else: keep torch from oversubscribing.
            "OMP_NUM_THREADS": "2",
        }
    )
    env.update({key: str(value) for key, value in overrides.items()})
    return env


class BotProcess:
    def __init__(self, env: dict[str, str], cwd: Path, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.cwd = cwd
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._readers: list[asyncio.Task[None]] = []
        self._new_line = asyncio.Event()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._readers = [
            asyncio.create_task(self._read(stream))
            for stream in (self.proc.stdout, self.proc.stderr)
        ]

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new_line.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Parsed JSON log lines whose event is `name`."""
        found = []
        for line in self.lines:
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == name:
                    found.append(record)
        return found

    async def wait_for_line(self, predicate: Callable[[str], bool], timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.proc and self.proc.returncode is not None):
                raise TimeoutError(f"no matching line; output so far:\n{self.output[-3000:]}")
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), min(remaining, 0.5))

    async def wait_for_event(
        self, name: str, timeout: float, count: int = 1
    ) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(found := self.events(name)) < count:
            if loop.time() > deadline or (self.proc and self.proc.returncode is not None):
                raise TimeoutError(f"{count} x {name!r} not logged; output:\n{self.output[-3000:]}")
            await asyncio.sleep(0.05)
        return found

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time (then the test fails)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise


async def start_bot(
    emu: BotAPIEmulator, tmp: Path, ready_timeout: float = 120, **overrides: Any
) -> BotProcess:
    """Start the bot and wait until it polls (model loaded and warmed up)."""
    process = BotProcess(bot_env(emu.base_url, tmp, **overrides), cwd=tmp)
    await process.start()
    try:
        await process.wait_for_event("bot_started", timeout=ready_timeout)
        await emu.wait_for_call("getUpdates", timeout=30)
    except BaseException:
        if process.proc and process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()
        raise
    return process


async def start_until(
    env: dict[str, str], tmp: Path, ready: str, args: tuple[str, ...] = ()
) -> BotProcess:
    """`python -m bot *args`, once it has logged `ready`; killed if it does not in 120 s."""
    process = BotProcess(env, cwd=tmp, args=args)
    await process.start()
    try:
        await process.wait_for_event(ready, timeout=120)
    except BaseException:
        if process.proc is not None and process.proc.returncode is None:
            process.proc.kill()
        raise
    return process


async def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Polls `condition` every 0.1 s; TimeoutError(what) after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


def replies_to(emu: BotAPIEmulator, chat: int, message_id: int, containing: str) -> list[dict]:
    """The bot's messages in `chat` that reply to `message_id` and contain `containing`."""
    return [
        m
        for m in emu.chat_history(chat)
        if m["from"]["is_bot"]
        and (m.get("reply_to_message") or {}).get("message_id") == message_id
        and containing in m.get("text", "")
    ]


def dump_output(process: BotProcess) -> None:
    """With BOT_LOG_DUMP=<file>, keep the bot's output for a look after the run."""
    target = os.environ.get("BOT_LOG_DUMP")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(process.output + "\n")


# ---- images ------------------------------------------------------------------------


# Where image_bytes' scenes start (the model's training and held-out renders use other seeds).
SCENE_SEED = 70_000_000


def image_bytes(
    fmt: str = "PNG",
    size: tuple[int, int] = (224, 224),
    mode: str = "RGB",
    color: Any = (200, 40, 40),
    **save: Any,
) -> bytes:
    """An image file. RGB ones are a rendered scene of the kind the bundled decoders know (the
    domain check passes it; a shape drawn by hand need not), one scene per `color`, stretched
    to `size` (the encoder squashes it back to a square); other modes are plain `color`."""
    if mode == "RGB":
        from model.data.scenes import render_scene

        seed = SCENE_SEED + sum(int(c) << (8 * i) for i, c in enumerate(color))
        image = render_scene(seed)[1].resize(size, Image.BICUBIC)
    else:
        image = Image.new(mode, size, color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def scene_png(colours_to_avoid: set[str], first_seed: int) -> tuple[set[str], bytes]:
    """A one-colour scene (easy to caption) whose colour is none of `colours_to_avoid`."""
    import itertools

    from model.data.scenes import render_scene

    for seed in itertools.count(first_seed):
        scene, image = render_scene(seed, 224)
        colours = {o.colour for o in scene.objects}
        if len(colours) == 1 and not colours & colours_to_avoid:
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            return colours, buffer.getvalue()
    raise AssertionError("unreachable")


def colours_named(text: str) -> set[str]:
    """The colours a caption names."""
    from model.data.semantics import parse, words

    return {mention.colour for mention in parse(words(text))[0] if mention.colour}


def numbered_lines(text: str) -> list[str]:
    """The "1. ...", "2. ..." lines of a reply, checked to be numbered 1..n in order."""
    lines = [line for line in text.splitlines() if line[:1].isdigit() and ". " in line]
    for index, line in enumerate(lines, 1):
        assert line.startswith(f"{index}. "), text
        assert line[len(f"{index}. ") :].strip(), text
    return lines


# ---- replies -----------------------------------------------------------------------


def reply_id(message: dict) -> int | None:
    return (message.get("reply_to_message") or {}).get("message_id")


def buttons(message: dict) -> list[dict]:
    """The inline buttons of a bot message, checked to fit Telegram's 64-byte payload."""
    found = [b for row in message["reply_markup"]["inline_keyboard"] for b in row]
    assert all(len(b["callback_data"].encode()) <= 64 for b in found)
    return found


def assert_caption_reply(reply: dict, samples: int = 3) -> str:
    """The photo reply: headline, baseline caption, numbered samples, two buttons."""
    text = reply["text"]
    lines = text.splitlines()
    headline = lines[0]
    assert headline.strip() and not headline.startswith(("Baseline", "1. "))
    assert any(line.startswith("Baseline decoder: ") for line in lines)
    assert len(numbered_lines(text)) == samples
    assert [b["text"] for b in buttons(reply)] == ["More samples", "Attention map"]
    return headline


def assert_honest_reply(reply: dict) -> str:
    """The reply to an image unlike the training scenes: no captions, what the captioner
    knows, the Caption anyway and Attention map buttons. Returns what the encoder sees."""
    text = reply["text"]
    assert "coloured-shape scenes" in text and "made up" in text
    assert "Baseline decoder" not in text and not numbered_lines(text)
    assert [b["text"] for b in buttons(reply)] == ["Caption anyway", "Attention map"]
    return text.split("My ImageNet-trained encoder sees: ", 1)[1].split("\n", 1)[0]


def assert_image_answered(reply: dict) -> None:
    """An image read and answered: captioned, or (a plain colour, say) the honest reply."""
    if "Baseline decoder: " in reply["text"]:
        assert_caption_reply(reply)
    else:
        assert_honest_reply(reply)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emu():
    """One emulator per test module (import it into the module to use it)."""
    emulator = BotAPIEmulator(bot_token=TOKEN)
    await emulator.start(host="127.0.0.1", port=0)
    yield emulator
    await emulator.stop()

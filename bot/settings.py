"""Typed settings read from the environment and an optional `.env` file.

Every setting has a default except `TELEGRAM_BOT_TOKEN`, which is only required when
the bot talks to a real Bot API server (see `Settings.require_token`). Bad values are
collected and reported together, each naming the variable and what it accepts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values


class SettingsError(ValueError):
    """One or more settings are missing or invalid; str() lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


class Secret:
    """A string that never shows itself in repr/str (so settings can be logged safely)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# Bot API tokens look like "123456789:AA...". Checked loosely: the exact alphabet is
# Telegram's business, but a token with spaces or quotes is certainly a paste error.
_TOKEN_RE = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{1,200}$")
# Telegram allows 1-256 characters A-Z, a-z, 0-9, _ and - in a webhook secret token.
_WEBHOOK_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")

BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    telegram_bot_token: Secret | None = None
    telegram_api_base: str | None = None
    mode: str = "polling"
    webhook_url: str | None = None
    webhook_secret: Secret | None = None
    webhook_host: str = "0.0.0.0"
    webhook_port: int = 8080
    weights_dir: Path = Path("weights")
    device: str = "auto"
    captioner: str = "bundled"
    default_samples: int = 3
    max_samples: int = 10
    max_image_bytes: int = BOT_API_DOWNLOAD_LIMIT
    max_image_pixels: int = 40_000_000
    queue_max: int = 100
    batch_max: int = 8
    batch_wait_ms: int = 10
    inference_threads: int = 0  # 0: every CPU core this process may use
    encoded_cache_size: int = 128
    rate_limit_per_min: int = 20
    allowed_user_ids: frozenset[int] = field(default_factory=frozenset)
    allowlist_ignore_s: int = 600
    shutdown_timeout_s: float = 30.0
    send_retry_timeout_s: float = 60.0
    log_format: str = "console"
    log_level: str = "INFO"
    health_file: Path | None = Path("/tmp/captionbot.health")
    playground_port: int = 8080
    playground_host: str = "127.0.0.1"  # 0.0.0.0 in a container with a published port
    playground: str = "auto"
    readme_url: str | None = None

    @property
    def token(self) -> str | None:
        return self.telegram_bot_token.get() if self.telegram_bot_token else None

    def require_token(self) -> str:
        if self.telegram_bot_token is None:
            raise SettingsError(
                [
                    "TELEGRAM_BOT_TOKEN is not set: create a bot with @BotFather, then put "
                    "TELEGRAM_BOT_TOKEN=<token> in .env (see .env.example) or the environment"
                ]
            )
        return self.telegram_bot_token.get()

    @property
    def webhook_path(self) -> str:
        return urlsplit(self.webhook_url or "").path or "/webhook"

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        dotenv_path: str | Path | None = ".env",
    ) -> Settings:
        """Read settings; the process environment wins over the `.env` file."""
        values: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return _parse(values)


class _Reader:
    """Parses one variable at a time, remembering every problem instead of stopping."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def string(self, name: str, default: str | None, choices: tuple[str, ...] | None = None):
        value = self.raw(name)
        if value is None:
            return default
        if choices is not None:
            value = value.lower()
            if value not in choices:
                self.problems.append(f"{name}={value!r}: must be one of {', '.join(choices)}")
                return default
        return value

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value.replace("_", ""))
        except ValueError:
            self.problems.append(f"{name}={value!r}: must be a whole number")
            return default
        if number < low or (high is not None and number > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            self.problems.append(f"{name}={number}: must be {bounds}")
            return default
        return number

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            self.problems.append(f"{name}={value!r}: must be a number")
            return default
        if not low < number <= high:
            self.problems.append(f"{name}={number:g}: must be > {low:g} and <= {high:g}")
            return default
        return number

    def url(self, name: str) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problems.append(f"{name}={value!r}: must be an http:// or https:// URL")
            return None
        return value.rstrip("/")


def _parse(values: Mapping[str, str]) -> Settings:
    r = _Reader(values)

    token = r.raw("TELEGRAM_BOT_TOKEN")
    if token is not None and not _TOKEN_RE.match(token):
        # Never echo the value: it may be a real token with a stray character.
        r.problems.append(
            "TELEGRAM_BOT_TOKEN: does not look like a Bot API token (digits, a colon, "
            "then letters, digits, '_' or '-'); copy it again from @BotFather"
        )
        token = None

    mode = r.string("MODE", "polling", ("polling", "webhook"))
    webhook_url = r.url("WEBHOOK_URL")
    webhook_secret = r.raw("WEBHOOK_SECRET")
    if webhook_secret is not None and not _WEBHOOK_SECRET_RE.match(webhook_secret):
        r.problems.append(
            "WEBHOOK_SECRET: must be 1-256 characters of A-Z, a-z, 0-9, '_' and '-'"
        )
        webhook_secret = None
    if mode == "webhook":
        # Only report what is missing; a present-but-bad value was reported above.
        if r.raw("WEBHOOK_URL") is None:
            r.problems.append("WEBHOOK_URL: required when MODE=webhook (the public https URL)")
        if r.raw("WEBHOOK_SECRET") is None:
            r.problems.append(
                "WEBHOOK_SECRET: required when MODE=webhook (Telegram sends it back with "
                "every update so the bot can reject forged ones)"
            )
        if r.raw("TELEGRAM_BOT_TOKEN") is None:
            r.problems.append(
                "TELEGRAM_BOT_TOKEN: required when MODE=webhook; create a bot with @BotFather "
                "and put TELEGRAM_BOT_TOKEN=<token> in .env"
            )

    max_samples = r.integer("MAX_SAMPLES", 10, 1, 50)
    default_samples = r.integer("DEFAULT_SAMPLES", 3, 0, 50)
    if default_samples > max_samples:
        r.problems.append(
            f"DEFAULT_SAMPLES={default_samples}: must not exceed MAX_SAMPLES={max_samples}"
        )
        default_samples = min(3, max_samples)

    allowed: set[int] = set()
    for item in (r.raw("ALLOWED_USER_IDS") or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            allowed.add(int(item))
        except ValueError:
            r.problems.append(
                f"ALLOWED_USER_IDS: {item!r} is not a numeric Telegram user id "
                "(comma-separated ids; empty allows everyone)"
            )

    health = r.raw("HEALTH_FILE")
    settings = Settings(
        telegram_bot_token=Secret(token) if token else None,
        telegram_api_base=r.url("TELEGRAM_API_BASE"),
        mode=mode,
        webhook_url=webhook_url,
        webhook_secret=Secret(webhook_secret) if webhook_secret else None,
        webhook_host=r.string("WEBHOOK_HOST", "0.0.0.0"),
        webhook_port=r.integer("WEBHOOK_PORT", 8080, 1, 65535),
        weights_dir=Path(r.string("WEIGHTS_DIR", "weights")),
        device=r.string("DEVICE", "auto", ("auto", "cpu", "cuda")),
        captioner=r.string("CAPTIONER", "bundled", ("bundled", "untrained")),
        default_samples=default_samples,
        max_samples=max_samples,
        max_image_bytes=r.integer("MAX_IMAGE_BYTES", BOT_API_DOWNLOAD_LIMIT, 1024),
        max_image_pixels=r.integer("MAX_IMAGE_PIXELS", 40_000_000, 1024),
        queue_max=r.integer("QUEUE_MAX", 100, 1),
        batch_max=r.integer("BATCH_MAX", 8, 1, 256),
        batch_wait_ms=r.integer("BATCH_WAIT_MS", 10, 0, 10_000),
        inference_threads=r.integer("INFERENCE_THREADS", 0, 0, 256),
        encoded_cache_size=r.integer("ENCODED_CACHE_SIZE", 128, 0),
        rate_limit_per_min=r.integer("RATE_LIMIT_PER_MIN", 20, 0),
        allowed_user_ids=frozenset(allowed),
        allowlist_ignore_s=r.integer("ALLOWLIST_IGNORE_S", 600, 0),
        shutdown_timeout_s=r.number("SHUTDOWN_TIMEOUT_S", 30.0, 0, 3600),
        send_retry_timeout_s=r.number("SEND_RETRY_TIMEOUT_S", 60.0, 0, 3600),
        log_format=r.string("LOG_FORMAT", "console", ("console", "json")),
        log_level=r.string(
            "LOG_LEVEL", "INFO", ("debug", "info", "warning", "error")
        ).upper(),
        health_file=None if (health or "").lower() in ("off", "none") else Path(
            health or "/tmp/captionbot.health"
        ),
        playground_port=r.integer("PLAYGROUND_PORT", 8080, 0, 65535),
        playground_host=r.string("PLAYGROUND_HOST", "127.0.0.1"),
        playground=r.string("PLAYGROUND", "auto", ("auto", "off")),
        readme_url=r.url("README_URL"),
    )
    if r.problems:
        raise SettingsError(r.problems)
    return settings

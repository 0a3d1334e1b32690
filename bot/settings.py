"""Typed settings read from the environment and an optional `.env` file (pydantic-settings).

Each setting is one field of `Settings`: the variable is the field's name in capitals
(`queue_max` is QUEUE_MAX), unset or empty means the default, the constraints say what it
accepts and the description what it means. To add a setting, add a field (and a line in
`.env.example`). Every setting has a default except `TELEGRAM_BOT_TOKEN`, which is only
required when the bot talks to a real Bot API server (see `Settings.require_token`). Bad
values are collected and reported together by `Settings.from_env`, one line per variable,
each naming it and what it accepts; the token's value is never shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class SettingsError(ValueError):
    """One or more settings are missing or invalid; str() lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


# Bot API tokens look like "123456789:AA...". Checked loosely: the exact alphabet is
# Telegram's business, but a token with spaces or quotes is certainly a paste error.
_TOKEN_RE = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{1,200}$")
# Telegram allows 1-256 characters A-Z, a-z, 0-9, _ and - in a webhook secret token.
_WEBHOOK_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")

BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


# Choices are matched case-insensitively.
Mode = Annotated[Literal["polling", "webhook"], BeforeValidator(_lower)]
Device = Annotated[Literal["auto", "cpu", "cuda"], BeforeValidator(_lower)]
CaptionerKind = Annotated[Literal["bundled", "untrained"], BeforeValidator(_lower)]
LogFormat = Annotated[Literal["console", "json"], BeforeValidator(_lower)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
OnOff = Annotated[Literal["auto", "off"], BeforeValidator(_lower)]
Switch = Annotated[Literal["on", "off"], BeforeValidator(_lower)]
Seconds = Annotated[float, Field(gt=0, le=3600)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True
    )

    # --- Telegram
    telegram_bot_token: SecretStr | None = Field(None, description="From @BotFather")
    telegram_api_base: str | None = Field(None, description="A self-hosted Bot API server")
    mode: Mode = Field("polling", description="polling, or webhook (needs URL and secret)")
    webhook_url: str | None = Field(None, description="The public https URL; its path is served")
    webhook_secret: SecretStr | None = Field(None, description="Telegram echoes it per update")
    webhook_host: str = Field("0.0.0.0", description="Where the webhook server listens")
    webhook_port: int = Field(8080, ge=1, le=65535, description="The webhook server's port")
    # --- Model
    weights_dir: Path = Field(Path("weights"), description="The trained decoders")
    device: Device = Field("auto", description="Where the model runs")
    captioner: CaptionerKind = Field("bundled", description="untrained: random decoders")
    domain_check: Switch = Field("on", description="on: photos unlike the scenes get labels")
    # --- Replies
    default_samples: int = Field(3, ge=0, le=50, description="Sampled captions per reply")
    max_samples: int = Field(10, ge=1, le=50, description="Largest N for /sample N")
    readme_url: str | None = Field(None, description="Where /help points for retraining")
    chat_action_delay_ms: int = Field(
        500, ge=0, le=60_000, description="Show typing only for replies slower than this"
    )
    # --- Limits
    max_image_bytes: int = Field(BOT_API_DOWNLOAD_LIMIT, ge=1024, description="Largest file")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="Largest image, in pixels")
    queue_max: int = Field(100, ge=1, description="Jobs waiting for the model at most")
    # 16: 6 % more photos/s than 8 in the bot benchmark's bursts (two A/B runs of 6 paired
    # rounds), and 32 no more than 16
    batch_max: int = Field(16, ge=1, le=256, description="Jobs per model run (1: no batching)")
    batch_wait_ms: int = Field(
        10, ge=0, le=10_000, description="Wait for a batch to fill while photos queue"
    )
    inference_threads: int = Field(
        0, ge=0, le=256, description="CPU threads; 0: every core usable (affinity, cgroup quota)"
    )
    encoded_cache_size: int = Field(128, ge=0, description="Encoded photos kept")
    rate_limit_per_min: int = Field(20, ge=0, description="Requests per user a minute; 0: off")
    allowed_user_ids: Annotated[frozenset[int], NoDecode] = Field(
        frozenset(), description="Comma-separated user ids; empty: everyone"
    )
    allowlist_ignore_s: int = Field(600, ge=0, description="How long a refused user is ignored")
    # --- Operations
    shutdown_timeout_s: Seconds = Field(30.0, description="To answer accepted photos on exit")
    send_retry_timeout_s: Seconds = Field(60.0, description="Retrying one Telegram call")
    log_format: LogFormat = Field("console", description="json: one object per line")
    log_level: LogLevel = Field("INFO", description="debug, info, warning or error")
    health_file: Path | None = Field(
        Path("/tmp/captionbot.health"), description="Heartbeat file; off disables it"
    )
    journal_file: Path | None = Field(
        Path("state/journal.sqlite3"),
        description="One process: accepted updates kept here until answered; off disables it",
    )
    playground_port: int = Field(8080, ge=0, le=65535, description="The playground page's port")
    playground_host: str = Field(
        "127.0.0.1", description="The playground's address; 0.0.0.0 in a container"
    )
    playground: OnOff = Field("auto", description="off: a missing token is an error")
    # --- More than one process (bot/jobs/): unset QUEUE_URL keeps the in-process queue
    queue_url: str | None = Field(None, description="redis://host:port/db: jobs on Redis Streams")
    job_claim_idle_ms: int = Field(
        15_000, ge=100, le=3_600_000, description="A dead worker's jobs are reclaimed after this"
    )
    job_max_deliveries: int = Field(3, ge=1, le=100, description="Tries per job, then dead letter")
    redis_connect_timeout_s: Seconds = Field(10.0, description="Waiting for Redis at start")
    encoded_cache_ttl_s: int = Field(3600, ge=1, description="Encoded photos kept in Redis")

    # ---- reading ---------------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        dotenv_path: str | Path | None = ".env",
    ) -> Settings:
        """Read settings; the environment (`environ`, else the process's) wins over the
        `.env` file. Raises SettingsError listing every bad or missing value."""
        previous = _ENVIRON.set(environ)
        try:
            return cls(_env_file=dotenv_path)
        finally:
            _ENVIRON.reset(previous)

    def __init__(self, **values: Any) -> None:
        """`Settings()` reads the process environment and `.env`; keyword arguments win
        over both. Raises SettingsError, one line per bad variable."""
        try:
            super().__init__(**values)
            return
        except ValidationError as error:
            problems, bad = _problems(error), _fields(error)
        # A bad value stops the cross-checks (DEFAULT_SAMPLES <= MAX_SAMPLES, what
        # MODE=webhook needs): run them again with the bad settings at their defaults.
        if bad:
            defaults = {name: type(self).model_fields[name].get_default() for name in bad}
            problems += _more_problems(type(self), {**values, **defaults}, problems)
        raise SettingsError(problems) from None  # the error's inputs may hold the token

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env_file = getattr(dotenv_settings, "env_file", None)
        return init_settings, _Environment(settings_cls), _DotEnv(settings_cls, env_file=env_file)

    # ---- what a value must look like -------------------------------------------------

    @field_validator("telegram_bot_token", mode="before")
    @classmethod
    def _token_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and not _TOKEN_RE.match(value):
            # Never echo the value: it may be a real token with a stray character.
            raise SettingsError(
                [
                    "TELEGRAM_BOT_TOKEN: does not look like a Bot API token (digits, a colon, "
                    "then letters, digits, '_' or '-'); copy it again from @BotFather"
                ]
            )
        return value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _webhook_secret_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and not _WEBHOOK_SECRET_RE.match(value):
            raise SettingsError(
                ["WEBHOOK_SECRET: must be 1-256 characters of A-Z, a-z, 0-9, '_' and '-'"]
            )
        return value

    @field_validator("telegram_api_base", "webhook_url", "readme_url", mode="before")
    @classmethod
    def _http_url(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            name = str(info.field_name).upper()
            raise SettingsError([f"{name}={value!r}: must be an http:// or https:// URL"])
        return value.rstrip("/")

    @field_validator("queue_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> Any:
        if isinstance(value, str) and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(
                [
                    f"QUEUE_URL={value!r}: must be a redis://host:port/db, "
                    "rediss:// or unix:// URL (unset: the in-process queue)"
                ]
            )
        return value

    @field_validator("allowed_user_ids", mode="before")
    @classmethod
    def _user_ids(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        items = [item.strip() for item in value.replace(";", ",").split(",")]
        bad = [item for item in items if item and not _is_int(item)]
        if bad:
            raise SettingsError(
                [
                    f"ALLOWED_USER_IDS: {item!r} is not a numeric Telegram user id "
                    "(comma-separated ids; empty allows everyone)"
                    for item in bad
                ]
            )
        return frozenset(int(item) for item in items if item)

    @field_validator("health_file", "journal_file", mode="before")
    @classmethod
    def _off_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() in ("", "off", "none") else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = []
        if self.default_samples > self.max_samples:
            problems.append(
                f"DEFAULT_SAMPLES={self.default_samples}: must not exceed "
                f"MAX_SAMPLES={self.max_samples}"
            )
        if self.mode == "webhook":
            problems += self._webhook_problems()
        if problems:
            raise SettingsError(problems)
        return self

    def _webhook_problems(self) -> Iterator[str]:
        if self.webhook_url is None:
            yield "WEBHOOK_URL: required when MODE=webhook (the public https URL)"
        if self.webhook_secret is None:
            yield (
                "WEBHOOK_SECRET: required when MODE=webhook (Telegram sends it back with "
                "every update so the bot can reject forged ones)"
            )
        if self.telegram_bot_token is None:
            yield (
                "TELEGRAM_BOT_TOKEN: required when MODE=webhook; create a bot with "
                "@BotFather and put TELEGRAM_BOT_TOKEN=<token> in .env"
            )

    # ---- use -------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        return self.telegram_bot_token.get_secret_value() if self.telegram_bot_token else None

    def require_token(self) -> str:
        if self.telegram_bot_token is None:
            raise SettingsError(
                [
                    "TELEGRAM_BOT_TOKEN is not set: create a bot with @BotFather, then put "
                    "TELEGRAM_BOT_TOKEN=<token> in .env (see .env.example) or the environment"
                ]
            )
        return self.telegram_bot_token.get_secret_value()

    @property
    def webhook_secret_value(self) -> str | None:
        return self.webhook_secret.get_secret_value() if self.webhook_secret else None

    @property
    def webhook_path(self) -> str:
        return urlsplit(self.webhook_url or "").path or "/webhook"


# ---- the environment `from_env` reads ----------------------------------------------------

# The mapping `Settings.from_env` was given, in place of the process environment.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("settings_environ", default=None)


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, reading `from_env`'s mapping when given one."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        if environ is None:
            return _cleaned(super()._load_env_vars())
        return _cleaned({name.lower(): value for name, value in environ.items()})


class _DotEnv(DotEnvSettingsSource):
    def _load_env_vars(self) -> Mapping[str, str | None]:
        return _cleaned(super()._load_env_vars())


def _cleaned(variables: Mapping[str, str | None]) -> dict[str, str]:
    """Values without surrounding blanks; a blank value counts as unset."""
    return {name: value.strip() for name, value in variables.items() if value and value.strip()}


# ---- one line per problem -----------------------------------------------------------------


def _problems(error: ValidationError) -> list[str]:
    """Each validation error as the line the bot prints, naming the variable."""
    problems: list[str] = []
    for item in error.errors():
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, SettingsError):
            problems += cause.problems
        else:
            problems.append(_problem(str(item["loc"][0]), item["type"], item["input"]))
    return problems


def _fields(error: ValidationError) -> set[str]:
    return {str(item["loc"][0]) for item in error.errors() if item["loc"]}


def _more_problems(cls: type[Settings], values: dict[str, Any], reported: list[str]) -> list[str]:
    """The cross-checks' problems with `values`, less those about variables already
    reported (one line per bad variable)."""
    try:
        cls(**values)
    except SettingsError as error:
        named = {_variable(problem) for problem in reported}
        return [problem for problem in error.problems if _variable(problem) not in named]
    return []


def _variable(problem: str) -> str:
    return re.match(r"[A-Z_]*", problem).group()  # type: ignore[union-attr]


def _problem(field: str, kind: str, value: Any) -> str:
    name = field.upper()
    info = Settings.model_fields[field]
    if kind == "literal_error":
        choices = ", ".join(str(choice).lower() for choice in get_args(info.annotation))
        return f"{name}={_lower(value)!r}: must be one of {choices}"
    if kind.endswith("_parsing") or kind == "int_from_float":
        what = "a whole number" if info.annotation is int else "a number"
        return f"{name}={value!r}: must be {what}"
    bounds = {
        type(rule).__name__: getattr(rule, type(rule).__name__.lower()) for rule in info.metadata
    }
    if info.annotation is float:
        return f"{name}={float(value):g}: must be > {bounds['Gt']:g} and <= {bounds['Le']:g}"
    if "Le" in bounds:
        return f"{name}={int(value)}: must be between {bounds['Ge']} and {bounds['Le']}"
    return f"{name}={int(value)}: must be >= {bounds['Ge']}"


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

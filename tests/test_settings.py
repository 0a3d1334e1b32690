"""Settings: defaults, environment over .env, validation messages, secrets kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.service import parse_sample_args
from bot.settings import Settings, SettingsError

TOKEN = "42:AAbbCC_dd-EE"


def test_defaults_match_the_documented_limits():
    settings = Settings.from_env({"TELEGRAM_BOT_TOKEN": TOKEN}, dotenv_path=None)
    assert settings.token == TOKEN
    assert settings.mode == "polling" and settings.device == "auto"
    assert settings.default_samples == 3 and settings.max_samples == 10
    assert settings.max_image_bytes == 20 * 1024 * 1024
    assert settings.batch_max == 16 and settings.batch_wait_ms == 10
    assert settings.inference_threads == 0
    assert settings.rate_limit_per_min == 20 and settings.allowed_user_ids == frozenset()
    assert settings.shutdown_timeout_s == 30 and settings.playground_port == 8080
    assert settings.telegram_api_base is None and settings.weights_dir == Path("weights")


def readme_settings_table() -> dict[str, str]:
    """README's Settings table: {NAME: its Default cell}, a row naming two settings split."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Settings", 1)[1].split("\n\n### ", 1)[0]
    defaults = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            names = [name.strip(" `") for name in cells[0].split(",")]
            values = (
                [value.strip(" `") for value in cells[1].split(",")]
                if len(names) > 1
                else [cells[1].strip("`")]
            )
            defaults.update(zip(names, values * len(names) if len(values) == 1 else values))
    return defaults


def as_documented(value) -> str:
    """A setting's value as the README's table writes a default."""
    if value is None:
        return "(none)"
    if isinstance(value, frozenset):
        return "(everyone)" if not value else ",".join(map(str, sorted(value)))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_every_default_is_the_one_the_readme_documents():
    documented = readme_settings_table()
    settings = Settings.from_env({}, dotenv_path=None)
    fields = {name.upper() for name in Settings.model_fields}
    assert set(documented) == fields, set(documented) ^ fields
    shown = {
        "TELEGRAM_API_BASE": lambda value: "api.telegram.org" if value is None else value,
        "LOG_LEVEL": str.lower,
    }
    for name, default in documented.items():
        value = getattr(settings, name.lower())
        assert (
            shown.get(name, as_documented)(value if name != "HEALTH_FILE" else str(value))
            == default
        ), name
    # The limits spelled out, so a change to either side is a deliberate one.
    assert settings.max_image_pixels == 40_000_000 and settings.queue_max == 100
    assert settings.encoded_cache_size == 128 and settings.allowlist_ignore_s == 600
    assert settings.send_retry_timeout_s == 60 and settings.shutdown_timeout_s == 30


def test_no_token_is_fine_until_one_is_required():
    settings = Settings.from_env({}, dotenv_path=None)
    assert settings.token is None
    with pytest.raises(SettingsError, match="TELEGRAM_BOT_TOKEN is not set.*@BotFather"):
        settings.require_token()


def test_every_bad_value_is_reported_at_once_with_what_is_accepted():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "TELEGRAM_BOT_TOKEN": TOKEN,
                "QUEUE_MAX": "many",
                "BATCH_MAX": "0",
                "DEVICE": "tpu",
                "LOG_FORMAT": "xml",
                "SHUTDOWN_TIMEOUT_S": "-1",
                "TELEGRAM_API_BASE": "127.0.0.1:8081",
                "ALLOWED_USER_IDS": "12,abc",
                "DEFAULT_SAMPLES": "12",
                "MODE": "push",
                "INFERENCE_THREADS": "-2",
            },
            dotenv_path=None,
        )
    message = str(caught.value)
    for expected in (
        "QUEUE_MAX='many': must be a whole number",
        "BATCH_MAX=0: must be between 1 and 256",
        "DEVICE='tpu': must be one of auto, cpu, cuda",
        "LOG_FORMAT",
        "SHUTDOWN_TIMEOUT_S",
        "TELEGRAM_API_BASE='127.0.0.1:8081': must be an http:// or https:// URL",
        "'abc' is not a numeric Telegram user id",
        "DEFAULT_SAMPLES=12: must not exceed MAX_SAMPLES=10",
        "MODE='push'",
        "INFERENCE_THREADS=-2: must be between 0 and 256",
    ):
        assert expected in message
    assert len(caught.value.problems) == 10  # one line per bad variable


def test_a_malformed_token_is_rejected_without_echoing_it():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"TELEGRAM_BOT_TOKEN": "42:AAbbCC dd"}, dotenv_path=None)
    assert "TELEGRAM_BOT_TOKEN" in str(caught.value) and "AAbbCC" not in str(caught.value)


def test_webhook_mode_requires_url_secret_and_token():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"MODE": "webhook"}, dotenv_path=None)
    names = " ".join(caught.value.problems)
    assert "WEBHOOK_URL" in names and "WEBHOOK_SECRET" in names and "TELEGRAM_BOT_TOKEN" in names
    with pytest.raises(SettingsError, match="WEBHOOK_SECRET: must be 1-256 characters"):
        Settings.from_env(
            {
                "MODE": "webhook",
                "TELEGRAM_BOT_TOKEN": TOKEN,
                "WEBHOOK_URL": "https://x.org/hook",
                "WEBHOOK_SECRET": "has space",
            },
            dotenv_path=None,
        )
    ok = Settings.from_env(
        {
            "MODE": "webhook",
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "WEBHOOK_URL": "https://x.org/tg/hook",
            "WEBHOOK_SECRET": "s3cret",
            "WEBHOOK_PORT": "8443",
        },
        dotenv_path=None,
    )
    assert ok.webhook_path == "/tg/hook" and ok.webhook_port == 8443


def test_environment_wins_over_the_dotenv_file(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        f"TELEGRAM_BOT_TOKEN={TOKEN}\nQUEUE_MAX=7\nBATCH_MAX=4\n# comment\nALLOWED_USER_IDS=1, "
        "2,3\n"
    )
    settings = Settings.from_env({"BATCH_MAX": "2"}, dotenv_path=dotenv)
    assert settings.token == TOKEN and settings.queue_max == 7 and settings.batch_max == 2
    assert settings.allowed_user_ids == frozenset({1, 2, 3})


def test_secrets_do_not_show_in_repr():
    settings = Settings.from_env(
        {"TELEGRAM_BOT_TOKEN": TOKEN, "WEBHOOK_SECRET": "hooksecret"}, dotenv_path=None
    )
    shown = repr(settings) + str(settings)
    assert "AAbbCC" not in shown and "hooksecret" not in shown


@pytest.mark.parametrize(
    "args,expected",
    [
        ("3", (3, 1.0)),
        ("10 2", (10, 2.0)),
        ("1 0.05", (1, 0.05)),
        ("2 0,7", (2, 0.7)),
        (None, None),
        ("", None),
        ("0", None),
        ("11", None),
        ("-1", None),
        ("x", None),
        ("3 0", None),
        ("3 2.01", None),
        ("3 inf", None),
        ("3 nan", None),
        ("1 2 3", None),
        ("2.5", None),
    ],
)
def test_sample_arguments(args, expected):
    assert parse_sample_args(args, max_samples=10) == expected

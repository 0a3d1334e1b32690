"""Deployment files, checked without a Docker engine: they parse, name files that exist,
and the image's command with the image's settings really starts the bot."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from dotenv import dotenv_values

from bot.emulator import BotAPIEmulator
from bot.settings import Settings
from bot_helpers import HAVE_WEIGHTS, REPO, TOKEN, BotProcess, dump_output

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = DOCKERFILE.replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_base_user_healthcheck_and_command():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "torch" in runs and "torchvision" in runs
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    assert health and 'CMD ["python", "-m", "bot.health"]' in health[0]
    assert steps[-1] == ("CMD", '["python", "-m", "bot"]')
    assert image_env()["LOG_FORMAT"] == "json"


def test_dependencies_are_installed_before_the_code_is_copied():
    steps = instructions()
    order = [rest for keyword, rest in steps if keyword in ("COPY", "RUN")]
    first_code_copy = next(i for i, rest in enumerate(order) if rest.startswith(("model/", "bot/")))
    install = next(i for i, rest in enumerate(order) if "requirements" in rest)
    assert order.index("pyproject.toml ./") < install < first_code_copy


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_every_copy_source_exists_and_is_not_docker_ignored():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(source.rstrip("/"), patterns), source
    # Secrets and local clutter stay out of the build context.
    for private in (".env", ".git", ".venv", "tests"):
        assert _ignored(private, patterns), private
    assert not _ignored("bot/worker.py", patterns) and not _ignored("bot/emulator/server.py", patterns)


def test_compose_file_parses_and_sets_the_operational_limits():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"]["bot"]
    assert service["build"] == "." and (REPO / "Dockerfile").exists()
    env_files = service["env_file"] if isinstance(service["env_file"], list) else [service["env_file"]]
    assert env_files == [".env"]
    assert service["restart"] == "unless-stopped"
    assert service["read_only"] is True
    assert any(mount.split(":")[0] == "/tmp" for mount in service["tmpfs"])
    assert service["mem_limit"]
    assert service["logging"]["options"]["max-size"] and service["logging"]["options"]["max-file"]
    # Long enough for the bot's own shutdown deadline.
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > Settings().shutdown_timeout_s


def test_env_example_documents_every_setting_and_is_a_working_env_file(tmp_path):
    values = dotenv_values(REPO / ".env.example")
    settings_fields = {name.upper() for name in Settings.model_fields}
    assert settings_fields <= set(values), settings_fields - set(values)
    # A real .env made from it (plus a token) is accepted as is, with the defaults.
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    with open(tmp_path / ".env", "a") as handle:
        handle.write(f"\nTELEGRAM_BOT_TOKEN={TOKEN}\n")
    settings = Settings.from_env({}, dotenv_path=tmp_path / ".env")
    assert settings == Settings.from_env({"TELEGRAM_BOT_TOKEN": TOKEN, "LOG_LEVEL": "info"}, dotenv_path=None)


@pytest.mark.timeout(150)
async def test_the_image_command_with_the_image_settings_starts_the_bot(tmp_path):
    """What `docker run` would do: CMD with the Dockerfile's ENV (paths under /app mapped
    to the checkout), a token from the env file, and the HEALTHCHECK passing."""
    env = {key: value.replace("/app", str(REPO)) for key, value in image_env().items()}
    env["HEALTH_FILE"] = str(tmp_path / "health")
    env["HOME"] = env["XDG_CACHE_HOME"] = str(tmp_path)
    env["TORCH_HOME"] = str(tmp_path / "torch")
    env.update({"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)})
    if not HAVE_WEIGHTS:
        env["CAPTIONER"] = "untrained"  # until the trained weights are in weights/
    command = json.loads(instructions()[-1][1])
    assert command[:3] == ["python", "-m", "bot"]

    async with BotAPIEmulator(bot_token=TOKEN) as emu:
        (tmp_path / ".env").write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nTELEGRAM_API_BASE={emu.base_url}\n")
        bot = BotProcess(env, cwd=tmp_path, args=tuple(command[3:]))
        await bot.start()
        try:
            await bot.wait_for_event("bot_started", timeout=120)
            emu.user_sends_text(9001, "/help")
            assert "/sample" in (await emu.next_bot_message(9001, timeout=30))["text"]
            health = subprocess.run([sys.executable, "-m", "bot.health"], env=env, cwd=tmp_path, timeout=30)
            assert health.returncode == 0
        finally:
            bot.signal(signal.SIGTERM)
            code = await bot.wait_exit(timeout=60)
            dump_output(bot)
        assert code == 0
        assert all(line.startswith("{") for line in bot.lines if line.strip()), "LOG_FORMAT=json"


def test_the_image_refuses_to_start_without_a_token(tmp_path):
    env = {key: value.replace("/app", str(REPO)) for key, value in image_env().items()}
    env.update({"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "bot"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TELEGRAM_BOT_TOKEN is not set" in result.stderr and "@BotFather" in result.stderr
    assert "Playground" not in result.stdout

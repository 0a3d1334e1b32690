"""The Docker image for real: built from this checkout, then run the ways people run it.

Needs a Docker engine: `make docker-engine` (part of `make test`) installs one as root where
apt-get works and starts dockerd; this module also starts dockerd itself if none answers (and
stops it again). Without an engine every test here skips and says why. The compose tests need
Compose v2.20 or later (`make docker-engine` installs it: docker/compose-v2.sh), else they skip.
They run the real docker-compose.yml: plain `up` (one process, no Redis) on the host network,
and the scale profile (Redis built from docker/redis, the bot as the one frontend, three
workers) on compose's own network, with the emulator served on Docker's bridge gateway.

Where python:3.11-slim cannot be pulled, the base image is made locally (docker/base-image.sh,
debootstrap); where a CPU torch wheel of the pinned version lies in pip's find-links, the build
takes it and every other pinned wheel from a local folder in the build context and runs offline
(build arguments TORCH_INDEX_URL= PYPI_INDEX_URL=); otherwise it is the default online build.

Everything runs from a copy of the checkout in a temporary folder, so `cp .env.example .env`
there never touches a real `.env`. The module removes its containers, compose projects and
tagged image; it keeps the base image and Docker's layer cache (untagged intermediate images),
which is what makes a rerun take seconds instead of minutes (`make docker-clean` drops both).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_asyncio
import yaml
from bot_helpers import HAVE_WEIGHTS, REPO, TOKEN, BotProcess, emu, image_bytes  # noqa: F401 (emu: fixture)
from PIL import Image

from bot.emulator import BotAPIEmulator
from bot.worker import HOLD_JOBS_ENV

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]
module_loop = pytest.mark.asyncio(loop_scope="module")

RUN = str(os.getpid())
LABEL = f"captionbot.test={RUN}"
TAG = f"captionbot-test:{RUN}"
NO_TOKEN = "TELEGRAM_BOT_TOKEN is not set"
# The image serves without torch (the Dockerfile's `serving` stage); with torch it was 1.01 GB.
# numba and its LLVM (for the serving encoder's compiled colour statistics) add 0.21 GB to 0.50;
# LiteRT's interpreter (its wheel pruned to it) and the bundle's TFLite graph 0.03 GB to 0.77.
IMAGE_MAX_BYTES = 0.8e9
# docker-compose.yml needs Compose v2.20 or later (`depends_on: required`); v1 cannot read it.
COMPOSE = ("docker", "compose")
# Files of the checkout that never go into the copy the image is built from.
NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "runs",
    "artifacts",
    ".pytest_cache",
    "__pycache__",
    "*.h5",
    ".env",
    "*.whl",
    "node_modules",
)


def docker(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


async def adocker(
    *args: str,
    timeout: float = 120,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    program: tuple[str, ...] = ("docker",),
) -> subprocess.CompletedProcess:
    """Like docker(), without blocking the event loop (the emulator runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        *program,
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(
        [*program, *args],
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


def inspect(container: str) -> dict:
    result = docker("inspect", container)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]


def say(request: pytest.FixtureRequest, line: str) -> None:
    """A line on the terminal even when output is captured: the measured times."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[docker] {line}")


# ---- the engine, the base image, the build ---------------------------------------------


def _engine_answers() -> tuple[bool, str]:
    if shutil.which("docker") is None:
        return False, "no docker command"
    try:
        result = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    except subprocess.TimeoutExpired:
        return False, "`docker info` did not answer in 30 s"
    lines = (result.stderr or result.stdout).strip().splitlines()
    return result.returncode == 0, lines[-1] if lines else f"exit {result.returncode}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    ok, why = _engine_answers()
    started = None
    if not ok and shutil.which("dockerd") and os.geteuid() == 0:
        log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log_path, "wb") as log:
            started = subprocess.Popen(
                ["dockerd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not ok and time.monotonic() < deadline and started.poll() is None:
            time.sleep(1)
            ok, _ = _engine_answers()
        if not ok:
            started.terminate()
            started.wait(30)
            started = None
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            why = "dockerd did not start: " + " | ".join(tail)
    if not ok:
        reason = (
            f"no Docker engine can run here ({why}); `make docker-engine` installs and starts "
            "one as root where apt-get works"
        )
        print(reason)
        pytest.skip(reason)
    yield
    if started is not None:  # stop only the engine this module started
        started.terminate()
        try:
            started.wait(60)
        except subprocess.TimeoutExpired:
            started.kill()


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile: no ARG {name}="
    return match.group(1)


def local_cpu_torch_wheel(version: str) -> Path | None:
    """torch-<version>+cpu for CPython 3.11 in one of pip's find-links folders, if any."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    for key, value in re.findall(r"^(\S+)='(.*)'$", config, re.M):
        if key.endswith("find-links"):
            folders += value.split()
    for folder in folders:
        folder = folder.removeprefix("file://")
        if os.path.isdir(folder):
            for wheel in sorted(Path(folder).glob(f"torch-{version}+cpu-cp311-cp311-*x86_64.whl")):
                return wheel
    return None


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@pytest.fixture(scope="module")
def build(engine, tmp_path_factory, request):
    """The image, built from a copy of the checkout: SimpleNamespace(tag, context, seconds)."""
    started = time.monotonic()
    context = tmp_path_factory.mktemp("context")
    shutil.copytree(
        REPO, context, ignore=NOT_COPIED, copy_function=link_or_copy, dirs_exist_ok=True
    )
    build_args = []
    download = None
    torch_wheel = local_cpu_torch_wheel(dockerfile_arg("TORCH_VERSION"))
    if torch_wheel is not None:  # offline: every wheel in the context, fetched meanwhile
        wheels = context / dockerfile_arg("WHEELS")
        link_or_copy(str(torch_wheel), str(wheels / torch_wheel.name))
        download_log = tmp_path_factory.mktemp("pip") / "download.log"
        with open(download_log, "wb") as log:  # a file: a full pipe would stall pip meanwhile
            download = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary",
                    ":all:",
                    "-d",
                    str(wheels),
                    "-r",
                    str(REPO / "docker" / "requirements.txt"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        build_args += ["--build-arg", "TORCH_INDEX_URL=", "--build-arg", "PYPI_INDEX_URL="]
    try:
        base = subprocess.run(
            [str(REPO / "docker" / "base-image.sh")], capture_output=True, text=True, timeout=900
        )
    finally:
        if download is not None:
            download.wait(timeout=600)
    if base.returncode != 0:
        pytest.skip(
            f"no base image: python:3.11-slim cannot be pulled and none could be made "
            f"locally: {base.stderr.strip()[-500:]}"
        )
    if download is not None and download.returncode != 0:
        pytest.skip(f"the pinned wheels cannot be downloaded: {download_log.read_text()[-500:]}")
    base_image = base.stdout.strip().splitlines()[-1]
    build_args += ["--build-arg", f"BASE_IMAGE={base_image}"]
    prepared_s = time.monotonic() - started

    result = docker("build", *build_args, "-t", TAG, str(context), timeout=900)
    build_s = time.monotonic() - started - prepared_s
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    size = inspect(TAG)["Size"]
    say(
        request,
        f"{TAG} built in {build_s:.0f} s from {base_image} ({prepared_s:.0f} s for the "
        "base image and the "
        f"{'local wheels, offline build' if torch_wheel else 'context, online build'}); "
        f"{size / 1e9:.2f} GB",
    )
    yield SimpleNamespace(tag=TAG, context=context, size=size, base=base_image)

    # Containers first (a used image cannot go), then the tag; --no-prune keeps the layers,
    # which are the cache of the next run.
    leftovers = docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
    leftovers += docker("ps", "-aq", "--filter", f"ancestor={TAG}").stdout.split()
    if leftovers:
        docker("rm", "-f", *sorted(set(leftovers)))
    docker("rmi", "--no-prune", TAG)
    say(request, f"cleaned up; total {time.monotonic() - started:.0f} s")


# ---- the image, and no token -------------------------------------------------------------


def test_the_image_is_pinned_small_and_serves_without_torch(build):
    assert build.size <= IMAGE_MAX_BYTES, f"{build.size / 1e9:.2f} GB"
    probe = docker(
        "run",
        "--rm",
        "--label",
        LABEL,
        build.tag,
        "python",
        "-c",
        "import importlib.util as u, aiogram; from model.bundle import EncoderSide, load_bundle; "
        "bundle = load_bundle('weights', build=False); "
        "print(EncoderSide.from_bundle(bundle).encoder.runtime().split()[0], "
        "aiogram.__version__, u.find_spec('torch') is None, "
        "u.find_spec('torchvision') is None, sorted(bundle.manifest['artifacts']))",
    )
    assert probe.returncode == 0, probe.stderr
    runtime, aiogram_version, no_torch, no_torchvision, artifacts = probe.stdout.split(maxsplit=4)
    assert runtime == "LiteRT"  # its interpreter serves from the pruned wheel
    assert f"aiogram=={aiogram_version}" in (REPO / "docker" / "requirements.txt").read_text()
    assert (no_torch, no_torchvision) == ("True", "True")
    # The bundle built in at build time matches the weights (build=False: nothing is built).
    assert "encoder.tflite" in artifacts and "attention.npz" in artifacts


def test_what_needs_torch_stops_the_bot_at_start_and_says_so(build):
    """CAPTIONER=untrained builds random torch decoders; without torch in the image the bot
    exits 2 at start with the reason and what to do, before it talks to Telegram."""
    result = docker(
        "run",
        "--rm",
        "--label",
        LABEL,
        "-e",
        f"TELEGRAM_BOT_TOKEN={TOKEN}",
        "-e",
        "CAPTIONER=untrained",
        build.tag,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "cannot_start" in output and "needs torch" in output and "rebuild the image" in output
    assert TOKEN not in output


def test_without_a_token_it_exits_2_with_the_message(build):
    result = docker("run", "--rm", "--label", LABEL, build.tag, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert NO_TOKEN in result.stderr and "@BotFather" in result.stderr
    assert "Playground" not in result.stdout


@pytest.fixture(scope="module")
def compose(engine) -> tuple[str, ...]:
    """`docker compose` (v2), or a skip that says why."""
    version = docker("compose", "version", "--short")
    if version.returncode != 0:
        pytest.skip(
            "Compose v2 (`docker compose`) is not installed here (Debian bookworm ships only "
            "v1, which cannot read docker-compose.yml); `make docker-engine` installs it as "
            "root where the Debian mirror can be reached (docker/compose-v2.sh)"
        )
    numbers = [int(part) for part in re.findall(r"\d+", version.stdout)[:2]]
    if numbers < [2, 20]:
        pytest.skip(f"Compose {version.stdout.strip()} is older than 2.20 (depends_on: required)")
    return COMPOSE


def compose_env() -> dict[str, str]:
    return {**os.environ, "CAPTIONBOT_IMAGE": TAG}


def project_containers(project: str) -> list[dict]:
    ids = docker(
        "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"
    ).stdout.split()
    return [inspect(container) for container in ids]


def test_compose_without_a_token_fails_once_and_does_not_restart(build, compose):
    program = compose
    shutil.copy(build.context / ".env.example", build.context / ".env")
    project = f"captionbottest{RUN}notoken"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*program, "-p", project, *args],
            cwd=build.context,
            env=compose_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )

    try:
        up = run("up", "-d", "--no-build")
        assert up.returncode != 0, up.stdout + up.stderr  # `up` itself reports the failure
        time.sleep(5)  # time enough for a restart loop to show
        first = {c["Id"]: c for c in project_containers(project)}
        time.sleep(2)
        second = project_containers(project)
        by_service = {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in second}
        check = by_service["settings"]
        assert check["State"]["Status"] == "exited" and check["State"]["ExitCode"] == 2
        assert (
            check["RestartCount"] == 0
            and first[check["Id"]]["State"]["FinishedAt"] == check["State"]["FinishedAt"]
        )
        logs = docker("logs", check["Id"])
        assert (logs.stdout + logs.stderr).count(NO_TOKEN) == 1, logs.stdout + logs.stderr
        # The bot itself never ran, so its restart policy had nothing to loop on.
        bot = by_service.get("bot")
        assert bot is None or (bot["State"]["Status"] == "created" and bot["RestartCount"] == 0), (
            bot
        )
    finally:
        down = run("down", "--remove-orphans")
        assert down.returncode == 0, down.stderr
    assert not project_containers(project)


# ---- with a token, against the emulator on the host network ------------------------------


class ContainerLogs(BotProcess):
    """`docker logs --follow` of a container, read like the bot's own output in bot_helpers."""

    def __init__(self, container: str) -> None:
        super().__init__({}, REPO)
        self.container = container

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "docker",
            "logs",
            "--follow",
            self.container,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._readers = [
            asyncio.create_task(self._read(stream))
            for stream in (self.proc.stdout, self.proc.stderr)
        ]

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
        if self.proc:
            await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bot_container(build, emu):
    """The image as compose runs it (read-only root, tmpfs /tmp, no new privileges), on the
    host network so that it reaches the emulator on 127.0.0.1. One job per batch, so that a
    burst is still queued when SIGTERM comes."""
    name = f"captionbot-test-{RUN}-bot"
    started = await adocker(
        "run",
        "-d",
        "--name",
        name,
        "--label",
        LABEL,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp:size=64m,mode=1777",
        "--security-opt",
        "no-new-privileges:true",
        "--health-interval",
        "2s",  # the image's HEALTHCHECK command, polled faster than 30 s
        "-e",
        f"TELEGRAM_BOT_TOKEN={TOKEN}",
        "-e",
        f"TELEGRAM_API_BASE={emu.base_url}",
        "-e",
        "BATCH_MAX=1",
        "-e",
        "QUEUE_MAX=50",
        "-e",
        "SHUTDOWN_TIMEOUT_S=60",
        "-e",
        "SEND_RETRY_TIMEOUT_S=8",
        "-e",
        "RATE_LIMIT_PER_MIN=0",
        build.tag,
    )
    assert started.returncode == 0, started.stderr
    logs = ContainerLogs(name)
    await logs.start()
    try:
        await logs.wait_for_event("bot_started", timeout=150)
        await emu.wait_for_call("getUpdates", timeout=30)
        yield SimpleNamespace(name=name, logs=logs)
    finally:
        await adocker("rm", "-f", name)
        await logs.close()
    assert TOKEN.split(":", 1)[1] not in logs.output


def scene_png(seed: int) -> tuple[object, bytes]:
    from model.data.scenes import render_scene

    scene, picture = render_scene(seed)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return scene, buffer.getvalue()


@module_loop
async def test_a_scene_photo_gets_its_caption_and_attention_its_figure(bot_container, emu):
    from model.data.semantics import judge

    exact = []
    for chat, seed in zip(range(6001, 6004), (424242, 424243, 424244)):
        scene, png = scene_png(seed)
        sent = emu.user_sends_photo(chat, png)
        reply = await emu.next_bot_message(chat, timeout=60)
        assert reply["reply_to_message"]["message_id"] == sent["message_id"]
        headline = reply["text"].splitlines()[0]
        assert "Baseline decoder: " in reply["text"]
        exact.append(judge(scene, headline).exact)
    if HAVE_WEIGHTS:  # the bundled decoder gets 19 scenes in 20 exactly right
        assert sum(exact) >= 2, exact

    command = emu.user_sends_text(6001, "/attention")
    figure = await emu.next_bot_message(6001, timeout=60)
    assert figure["reply_to_message"]["message_id"] == command["message_id"]
    picture = Image.open(io.BytesIO(figure["photo_bytes"]))
    assert picture.format == "JPEG" and picture.width > picture.height > 0
    assert bot_container.logs.events("job")


@module_loop
async def test_the_healthcheck_turns_healthy(bot_container):
    deadline = time.monotonic() + 60
    while (health := inspect(bot_container.name)["State"]["Health"])["Status"] != "healthy":
        assert time.monotonic() < deadline, health
        await asyncio.sleep(1)
    assert health["Log"][-1]["ExitCode"] == 0


@module_loop
async def test_the_root_filesystem_is_read_only_and_the_bot_is_not_root(bot_container):
    state = inspect(bot_container.name)
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert state["Config"]["User"] not in ("", "0", "root")
    probe = await adocker(
        "exec",
        bot_container.name,
        "python",
        "-c",
        """
import errno, os
status = open('/proc/1/status').read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith('Uid:')))
for path in ('/app/probe', '/probe', '/opt/venv/probe'):
    try:
        open(path, 'w')
        print('writable', path)
    except OSError as error:
        print('refused' if error.errno in (errno.EROFS, errno.EACCES) else error, path)
open('/tmp/probe', 'w').write('tmpfs')
print('tmp ok')
""",
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] != "0", "the bot (PID 1) runs as root"
    assert lines[1:4] == ["refused /app/probe", "refused /probe", "refused /opt/venv/probe"], lines
    assert lines[4] == "tmp ok"
    # Read-only even for root: the filesystem refuses, not just the permissions.
    as_root = await adocker("exec", "--user", "0", bot_container.name, "touch", "/app/probe")
    assert as_root.returncode != 0 and "Read-only file system" in as_root.stderr


@module_loop
async def test_sigterm_during_a_burst_answers_every_accepted_photo_then_exits_0(bot_container, emu):
    # 30 photos: with 10, a faster bot had answered them all before the SIGTERM landed, and the
    # test would not have stopped it mid-burst
    chats = list(range(6101, 6131))
    photo = image_bytes("JPEG", (900, 900), quality=95)
    getfiles = len([1 for name, _ in emu.calls if name == "getFile"])
    sent = {chat: emu.user_sends_photo(chat, photo) for chat in chats}
    deadline = time.monotonic() + 60
    while len([1 for name, _ in emu.calls if name == "getFile"]) < getfiles + len(chats):
        assert time.monotonic() < deadline, "the bot did not accept the burst"
        await asyncio.sleep(0.05)
    stop = await adocker("stop", "--time", "90", bot_container.name, timeout=120)  # SIGTERM
    assert stop.returncode == 0, stop.stderr
    state = inspect(bot_container.name)["State"]
    await bot_container.logs.wait_exit(timeout=30)
    assert state["ExitCode"] == 0, bot_container.logs.output[-3000:]
    shutting_down = bot_container.logs.events("shutting_down")
    assert shutting_down and shutting_down[0]["updates_in_flight"] >= 2, shutting_down
    for chat in chats:
        reply = await emu.next_bot_message(chat, timeout=1)
        assert "Baseline decoder:" in reply["text"]
        assert reply["reply_to_message"]["message_id"] == sent[chat]["message_id"]
    assert bot_container.logs.events("stopped")
    assert "Traceback" not in bot_container.logs.output


# ---- compose with a token ------------------------------------------------------------------


@module_loop
async def test_compose_config_up_and_down_with_a_token(build, compose):
    async with BotAPIEmulator(bot_token=TOKEN) as emu:  # its own: no other bot polls it
        await compose_up_and_down(build, compose, emu)


async def compose_up_and_down(build, program: tuple[str, ...], emu: BotAPIEmulator) -> None:
    """Plain `up`: the bot alone, one process with the in-process queue; no Redis, no worker.
    Its journal lives on compose's volume: photos accepted but not answered when the container
    is SIGKILLed (a test hook holds the worker) are answered by the container `up` makes next."""
    project = f"captionbottest{RUN}token"
    env_file = build.context / ".env"
    settings = f"\nTELEGRAM_BOT_TOKEN={TOKEN}\nTELEGRAM_API_BASE={emu.base_url}\n"
    shutil.copy(build.context / ".env.example", env_file)
    with open(env_file, "a") as handle:
        handle.write(settings + f"{HOLD_JOBS_ENV}=1\n")
    # The only change to the real compose file: the host network, to reach the emulator.
    override = build.context / f"compose.test-{RUN}.yml"
    override.write_text(
        yaml.safe_dump(
            {"services": {name: {"network_mode": "host"} for name in ("settings", "bot")}}
        )
    )

    async def run(
        *args: str,
        files: tuple[str, ...] = ("docker-compose.yml", override.name),
        timeout: float = 180,
    ) -> subprocess.CompletedProcess:
        options = [part for name in files for part in ("-f", name)]
        return await adocker(
            *options,
            "-p",
            project,
            *args,
            program=program,
            cwd=build.context,
            env=compose_env(),
            timeout=timeout,
        )

    async def up() -> ContainerLogs:
        started = await run("up", "-d", "--no-build")
        assert started.returncode == 0, started.stdout + started.stderr
        container = (await run("ps", "-q", "bot")).stdout.strip()
        assert container
        logs = ContainerLogs(container)
        await logs.start()
        await logs.wait_for_event("bot_started", timeout=150)
        return logs

    config = await run("config", files=("docker-compose.yml",))
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    bot = services["bot"]
    assert bot["environment"]["PLAYGROUND"] == "off" and bot["environment"]["LOG_FORMAT"] == "json"
    assert bot["environment"]["TELEGRAM_BOT_TOKEN"] == TOKEN
    assert bot["restart"] == "unless-stopped" and bot["read_only"] is True
    assert services["settings"]["restart"] in ("no", False)
    assert set(services) == {"settings", "bot"}  # redis and worker are the scale profile's

    logs = None
    try:
        logs = await up()
        emu.user_sends_text(6201, "/help")
        assert "/sample" in (await emu.next_bot_message(6201, timeout=30))["text"]
        services = sorted(
            c["Config"]["Labels"]["com.docker.compose.service"] for c in project_containers(project)
        )
        assert services == ["bot", "settings"], services

        chats = {6202: 424242, 6203: 424243}  # scenes the bundled model captions
        sent = [
            (chat, emu.user_sends_photo(chat, scene_png(seed)[1])) for chat, seed in chats.items()
        ]
        await logs.wait_for_event("test_holding_jobs", timeout=60)
        deadline = time.monotonic() + 30
        while emu.pending_updates:  # confirmed to Telegram: it will not send them again
            assert time.monotonic() < deadline, emu.pending_updates
            await asyncio.sleep(0.1)
        killed = await adocker("kill", logs.container)  # SIGKILL; no restart after a kill
        assert killed.returncode == 0, killed.stderr
        await logs.wait_exit(timeout=60)
        await logs.close()
        env_file.write_text(env_file.read_text().replace(f"{HOLD_JOBS_ENV}=1\n", ""))
        logs = await up()  # a new container (its settings changed), the same volume
        for chat, photo in sent:
            reply = await emu.next_bot_message(chat, timeout=90)
            assert reply["reply_to_message"]["message_id"] == photo["message_id"]
            assert "Baseline decoder: " in reply["text"]
        assert len(logs.events("update_replayed")) == len(sent)
    finally:
        down = await run("down", "-v", "--remove-orphans")
        if logs is not None:
            await logs.wait_exit(timeout=60)
            await logs.close()
        override.unlink()
    assert down.returncode == 0, down.stderr
    assert logs.events("stopped") and "Traceback" not in logs.output  # SIGTERM: a clean stop
    (chosen,) = logs.events("role_chosen")  # --role auto: no Redis service, so one process
    assert chosen["role"] == "all" and chosen["queue"] == "in-process", chosen
    assert not project_containers(project)
    for chat, _ in sent:  # and no second answer
        answers = [m for m in emu.chat_history(chat) if m["from"]["is_bot"]]
        assert len(answers) == 1, answers


# ---- compose's scale profile: Redis, one frontend, three workers ------------------------


class WatchedEmulator(BotAPIEmulator):
    """The emulator, also noting who calls it (the caller's address): every getUpdates and
    its 409 Conflict (two processes polling one token), and who sent each message."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.pollers: Counter[str] = Counter()
        self.conflicts = 0
        self.senders: dict[tuple[int, int], str] = {}

    async def _handle_method(self, request):
        response = await super()._handle_method(request)
        method = request.match_info["method"].lower()
        caller = request.remote or "?"
        if method == "getupdates":
            self.pollers[caller] += 1
            self.conflicts += response.status == 409
        elif method in ("sendmessage", "sendphoto") and response.status == 200:
            message = json.loads(response.body)["result"]
            self.senders[(message["chat"]["id"], message["message_id"])] = caller
        return response


def bridge_gateway() -> str | None:
    """The host's address on Docker's default bridge: containers reach it from any network.
    Docker 20.10 lists it in the bridge's IPAM config on some hosts and only the subnet on
    others; the gateway is then the subnet's first address, as Docker assigns it."""
    result = docker("network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}")
    if result.returncode != 0:
        return None
    for config in json.loads(result.stdout) or []:
        if config.get("Gateway"):
            return config["Gateway"]
        if config.get("Subnet") and ":" not in config["Subnet"]:
            return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
    return None


def answers(emu: BotAPIEmulator, chat: int, message_id: int) -> list[dict]:
    """The bot's messages replying to one of the user's (a caption, or the honest reply)."""
    return [
        m
        for m in emu.chat_history(chat)
        if m["from"]["is_bot"] and (m.get("reply_to_message") or {}).get("message_id") == message_id
    ]


@module_loop
async def test_compose_scale_profile_one_poller_three_workers_and_a_killed_worker_loses_nothing(
    build, compose, request
):
    """`docker compose --profile scale up -d --scale worker=3`, the real compose file with the
    emulator reached over Docker's bridge: Redis, the bot as the one frontend (no second
    poller, no --scale bot=0), three workers; every photo of a burst is answered once; a
    worker SIGKILLed while it holds jobs loses none of them; `down -v` leaves nothing."""
    gateway = bridge_gateway()
    if gateway is None:
        pytest.skip("Docker's default bridge has no gateway address to serve the emulator on")
    started = time.monotonic()
    project = f"captionbottest{RUN}scale"
    redis_tag = f"captionbot-redis-test:{RUN}"
    stream = f"captionbot:{TOKEN.split(':')[0]}:jobs"
    env = {**compose_env(), "CAPTIONBOT_REDIS_IMAGE": redis_tag, "BASE_IMAGE": build.base}
    emu = WatchedEmulator(bot_token=TOKEN)
    await emu.start(host=gateway)

    async def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return await adocker(
            "-p", project, "--profile", "scale", *args,
            program=compose, cwd=build.context, env=env, timeout=timeout,
        )  # fmt: skip

    async def redis_cli(*args: str) -> list[str]:
        result = await adocker("exec", redis, "redis-cli", *args)
        assert result.returncode == 0 and not result.stdout.startswith(("ERR", "NOGROUP")), result
        return result.stdout.splitlines()

    async def consumers() -> dict[str, int]:
        """XINFO CONSUMERS: consumer name (<container>-<pid>) -> jobs held. Redis 7.0 lists a
        consumer once it has read a job."""
        lines = await redis_cli("XINFO", "CONSUMERS", stream, "workers")
        held, name = {}, ""
        for key, value in zip(lines[::2], lines[1::2]):
            if key == "name":
                name = value
            elif key == "pending":
                held[name] = int(value)
        return held

    async def started_workers() -> dict[str, str]:
        """Consumer name -> container id of each worker that logged `worker_started`."""
        found = {}
        for container in by_service["worker"]:
            output = await adocker("logs", container["Id"])
            for line in (output.stdout + output.stderr).splitlines():
                if '"worker_started"' in line:
                    found[json.loads(line)["consumer"]] = container["Id"]
        return found

    async def wait_for(condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.2)

    env_file = build.context / ".env"
    shutil.copy(build.context / ".env.example", env_file)
    with open(env_file, "a") as handle:
        handle.write(
            f"\nTELEGRAM_BOT_TOKEN={TOKEN}\nTELEGRAM_API_BASE={emu.base_url}\n"
            # A dead worker's jobs are taken over after 5 s; small batches spread a burst.
            "JOB_CLAIM_IDLE_MS=5000\nBATCH_MAX=2\nINFERENCE_THREADS=1\nDEFAULT_SAMPLES=1\n"
            "RATE_LIMIT_PER_MIN=0\nSEND_RETRY_TIMEOUT_S=8\n"
        )
    logs = None
    try:
        built = await run("build", "redis", timeout=600)
        assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
        up = await run("up", "-d", "--no-build", "--scale", "worker=3")
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        containers = project_containers(project)
        by_service: dict[str, list[dict]] = {}
        for container in containers:
            service = container["Config"]["Labels"]["com.docker.compose.service"]
            by_service.setdefault(service, []).append(container)
        assert {s: len(c) for s, c in by_service.items()} == {
            "settings": 1, "redis": 1, "bot": 1, "worker": 3
        }  # fmt: skip
        (redis,) = [c["Id"] for c in by_service["redis"]]
        (bot,) = by_service["bot"]
        logs = ContainerLogs(bot["Id"])
        await logs.start()
        await logs.wait_for_event("bot_started", timeout=150)
        (chosen,) = logs.events("role_chosen")
        assert chosen["role"] == "frontend" and chosen["queue"] == "redis", chosen
        assert await redis_cli("CONFIG", "GET", "appendonly") == ["appendonly", "yes"]
        assert await redis_cli("CONFIG", "GET", "appendfsync") == ["appendfsync", "everysec"]
        redis_user = inspect(redis)["Config"]["User"]
        assert redis_user not in ("", "0", "root"), redis_user
        # Three workers, each consuming the stream once its model is loaded.
        workers: dict[str, str] = {}

        async def three_workers() -> bool:
            workers.update(await started_workers())
            return len(workers) == 3

        await wait_for(three_workers, "three workers started", timeout=240)
        assert {name.rsplit("-", 1)[0] for name in workers} == {
            c["Id"][:12]
            for c in by_service["worker"]  # a container's hostname: its short id
        }
        ready_s = time.monotonic() - started

        # A burst: every photo answered exactly once.
        photos = {}
        for chat, seed in zip(range(6301, 6307), range(515151, 515157)):
            photos[chat] = emu.user_sends_photo(chat, scene_png(seed)[1])["message_id"]
        for chat in photos:
            await emu.next_bot_message(chat, timeout=120)
        await asyncio.sleep(1)  # time enough for a second answer to show, were there one
        for chat, message_id in photos.items():
            assert len(answers(emu, chat, message_id)) == 1, emu.chat_history(chat)

        # Another, and a worker SIGKILLed while it holds some of it. Its getFile calls are held
        # 4 s, so the workers hold their jobs that long: the test pauses one meanwhile (the
        # workers once answered a whole burst between two looks).
        emu.inject_fault("getFile", delay=4, times=12)
        burst = {}
        for chat, seed in zip(range(6311, 6323), range(525252, 525264)):
            burst[chat] = emu.user_sends_photo(chat, scene_png(seed)[1])["message_id"]
        victim: list[str] = []  # consumer name, container id

        async def frozen_holding_jobs() -> bool:
            """Pauses a worker that holds jobs (frozen, it can neither answer nor ack them)
            and keeps it paused if it still holds some; else lets it go on."""
            held = await consumers()
            name = max(held, key=held.__getitem__, default="")
            if not held.get(name):
                return False
            paused = await adocker("pause", workers[name])
            assert paused.returncode == 0, paused.stderr
            if (await consumers())[name]:
                victim[:] = [name, workers[name]]
                return True
            await adocker("unpause", workers[name])
            return False

        await wait_for(frozen_holding_jobs, "a worker holding jobs", timeout=60)
        held_at_death = (await consumers())[victim[0]]
        victim_ip = next(iter(inspect(victim[1])["NetworkSettings"]["Networks"].values()))
        killed = await adocker("kill", "-s", "KILL", victim[1])
        assert killed.returncode == 0, killed.stderr
        for chat in burst:
            await emu.next_bot_message(chat, timeout=120)
        await asyncio.sleep(1)
        for chat, message_id in burst.items():
            replies = answers(emu, chat, message_id)
            # One answer; a second only where the killed worker sent one and died before
            # recording it (its job then ran again elsewhere): at least once, never lost.
            senders = [emu.senders[(chat, m["message_id"])] for m in replies]
            assert len(replies) == 1 or (len(replies) == 2 and victim_ip["IPAddress"] in senders), (
                replies
            )

        # What the killed worker held was taken over: run again, by another worker. A job's
        # record is written just after its answer is sent, so wait until none is pending.
        async def none_pending() -> bool:
            return (await redis_cli("XPENDING", stream, "workers"))[0] == "0"

        await wait_for(none_pending, "every job acknowledged", timeout=60)
        records = await adocker(
            "exec", redis, "sh", "-c",
            f"for key in $(redis-cli --scan --pattern '{stream.removesuffix('jobs')}reply:*'); "
            'do redis-cli GET "$key"; done',
        )  # fmt: skip
        taken_over = [
            record
            for record in map(json.loads, records.stdout.splitlines())
            if record["deliveries"] >= 2 and record["by"] != victim[0]
        ]
        assert len(taken_over) >= held_at_death > 0, (held_at_death, victim, records.stdout)
        # Nothing given up on, and only the three workers ever took jobs.
        assert await redis_cli("XLEN", f"{stream}:dead") == ["0"]
        assert set(await consumers()) <= set(workers), (await consumers(), workers)

        # Exactly one process polled Telegram all along: the bot, and no Conflict.
        bot_ip = next(iter(inspect(bot["Id"])["NetworkSettings"]["Networks"].values()))
        assert list(emu.pollers) == [bot_ip["IPAddress"]], emu.pollers
        assert emu.conflicts == 0
        say(
            request,
            f"scale profile: up and 3 workers consuming in {ready_s:.0f} s, "
            f"{len(photos) + len(burst)} photos answered (a worker killed holding "
            f"{held_at_death} jobs, taken over by the others) in "
            f"{time.monotonic() - started - ready_s:.0f} s",
        )
    finally:
        down = await run("down", "-v", "--remove-orphans", timeout=180)
        if logs is not None:
            await logs.wait_exit(timeout=60)
            await logs.close()
        await emu.stop()
        env_file.unlink()
        docker("rmi", "--no-prune", redis_tag)
    assert down.returncode == 0, down.stderr
    assert not project_containers(project)
    volumes = docker(
        "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"
    )
    assert not volumes.stdout.strip(), volumes.stdout
    assert logs.events("stopped") and "Traceback" not in logs.output
    assert TOKEN.split(":", 1)[1] not in logs.output


# ---- the playground through a published port ---------------------------------------------


def test_the_playground_is_reachable_through_a_published_port(build):
    name = f"captionbot-test-{RUN}-playground"
    started = docker(
        "run",
        "-d",
        "--name",
        name,
        "--label",
        LABEL,
        "-p",
        "127.0.0.1::8080",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-e",
        "PLAYGROUND=auto",
        "-e",
        "PLAYGROUND_HOST=0.0.0.0",
        build.tag,
    )
    assert started.returncode == 0, started.stderr
    try:
        address = docker("port", name, "8080/tcp").stdout.split()[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/", timeout=5) as response:
                    page = response.read().decode(errors="replace")
                    break
            except OSError:
                assert time.monotonic() < deadline, docker("logs", name).stdout[-2000:]
                time.sleep(0.5)
        assert response.status == 200 and "<html" in page.lower()
        stop = docker("stop", "--time", "60", name, timeout=90)
        assert stop.returncode == 0 and inspect(name)["State"]["ExitCode"] == 0
    finally:
        docker("rm", "-f", name)

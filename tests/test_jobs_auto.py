"""`python -m bot --role auto` (bot/jobs/auto.py): what docker-compose.yml's `bot` service runs.
Frontend when QUEUE_URL's host resolves (the scale profile's Redis runs), else the whole bot
in one process with the in-process queue; the choice and its reason are logged."""

from __future__ import annotations

import pytest
from bot_helpers import BotProcess, bot_env, emu  # noqa: F401 (emu: fixture)
from redis_helpers import redis_server  # noqa: F401 (fixture)

from bot.jobs.auto import RESOLVE_WAIT_S, choose_role, resolve

COMPOSE_URL = "redis://redis:6379/0"


class Lookups:
    """A resolver that answers from the n-th look-up on (never: None), on a fake clock."""

    def __init__(self, answers_from: int | None, address: str = "172.18.0.2") -> None:
        self.answers_from = answers_from
        self.address = address
        self.hosts: list[str] = []
        self.now = 0.0

    def __call__(self, host: str) -> str | None:
        self.hosts.append(host)
        if self.answers_from is not None and len(self.hosts) >= self.answers_from:
            return self.address
        return None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def choose(self, url: str | None, wait_s: float = RESOLVE_WAIT_S):
        return choose_role(url, lookup=self, wait_s=wait_s, clock=self.clock, sleep=self.sleep)


def test_without_queue_url_it_is_one_process_with_the_in_process_queue():
    lookups = Lookups(answers_from=1)
    choice = lookups.choose(None)
    assert (choice.role, choice.queue_url) == ("all", None)
    assert "QUEUE_URL is not set" in choice.reason and lookups.hosts == []


def test_a_host_that_resolves_makes_it_the_frontend_at_once():
    lookups = Lookups(answers_from=1)
    choice = lookups.choose(COMPOSE_URL)
    assert (choice.role, choice.queue_url) == ("frontend", COMPOSE_URL)
    assert lookups.hosts == ["redis"] and lookups.now == 0
    assert "redis resolves (to 172.18.0.2)" in choice.reason


def test_a_host_that_never_resolves_is_tried_for_the_wait_then_it_is_one_process():
    lookups = Lookups(answers_from=None)
    choice = lookups.choose(COMPOSE_URL, wait_s=3)
    assert (choice.role, choice.queue_url) == ("all", None)
    assert "does not resolve" in choice.reason and "in-process queue" in choice.reason
    # Every half second for the 3 s, then given up: the start is delayed by the wait, no more.
    assert len(lookups.hosts) == 7 and lookups.now == 3


def test_a_redis_container_that_comes_up_meanwhile_is_found():
    lookups = Lookups(answers_from=3)
    choice = lookups.choose(COMPOSE_URL)
    assert choice.role == "frontend" and len(lookups.hosts) == 3 and lookups.now == 1


@pytest.mark.parametrize(
    "url",
    ["redis://10.1.2.3:6379/0", "redis://[::1]:6379/0", "unix:///run/redis/redis.sock?db=0"],
)
def test_an_address_or_a_socket_needs_no_look_up_and_means_frontend(url):
    lookups = Lookups(answers_from=None)
    choice = lookups.choose(url)
    assert (choice.role, choice.queue_url) == ("frontend", url) and lookups.hosts == []


def test_the_reason_never_shows_the_password():
    lookups = Lookups(answers_from=None)
    for answers_from in (None, 1):
        lookups = Lookups(answers_from)
        choice = lookups.choose("redis://:s3cret@redis:6379/0", wait_s=0)
        assert "s3cret" not in choice.reason and lookups.hosts == ["redis"]


def test_resolve_uses_the_system_resolver():
    assert resolve("localhost") in ("127.0.0.1", "::1")
    assert resolve("no-such-host.invalid", timeout=5) is None  # RFC 2606: never resolves


# ---- the real process ----------------------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.asyncio(loop_scope="module")
async def test_auto_without_a_redis_host_runs_the_whole_bot_in_one_process(emu, tmp_path):
    """Plain `docker compose up`: QUEUE_URL names a Redis service that does not run."""
    env = bot_env(
        emu.base_url,
        tmp_path,
        QUEUE_URL="redis://no-such-redis.invalid:6379/0",
        CAPTIONER="untrained",
    )
    bot = BotProcess(env, cwd=tmp_path, args=("--role", "auto"))
    await bot.start()
    try:
        await bot.wait_for_event("bot_started", timeout=120)
        emu.user_sends_text(7101, "/help")
        assert "/sample" in (await emu.next_bot_message(7101, timeout=30))["text"]
    finally:
        assert await bot.stop() == 0
    (chosen,) = bot.events("role_chosen")
    assert chosen["role"] == "all" and chosen["queue"] == "in-process"
    assert "no-such-redis.invalid does not resolve" in chosen["reason"]
    (starting,) = bot.events("starting")
    assert starting["role"] == "all" and starting["queue"] == "in-process"


@pytest.mark.timeout(150)
@pytest.mark.asyncio(loop_scope="module")
async def test_auto_with_a_redis_host_that_resolves_is_the_frontend(emu, redis_server, tmp_path):
    """The scale profile: the name resolves, so the bot only takes updates and enqueues."""
    url = redis_server.url.replace("127.0.0.1", "localhost")
    env = bot_env(emu.base_url, tmp_path, QUEUE_URL=url, CAPTIONER="untrained")
    bot = BotProcess(env, cwd=tmp_path, args=("--role", "auto"))
    await bot.start()
    try:
        await bot.wait_for_event("bot_started", timeout=120)
    finally:
        assert await bot.stop() == 0
    (chosen,) = bot.events("role_chosen")
    assert chosen["role"] == "frontend" and chosen["queue"] == "redis"
    assert "localhost resolves" in chosen["reason"]
    (starting,) = bot.events("starting")
    assert starting["role"] == "frontend" and starting["queue"] == "redis"
    assert not bot.events("model_warmed_up"), "a frontend loads no model"

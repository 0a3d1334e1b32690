"""`python -m bot --role auto`: the role is chosen at start, from QUEUE_URL's host.

It is what docker-compose.yml's `bot` service runs, so that one service definition serves
both ways of running the compose file:

- `docker compose up`: no Redis service runs, QUEUE_URL's host (`redis`) does not resolve,
  and the bot is the whole bot in one process (role all, the in-process queue);
- `docker compose --profile scale up --scale worker=N`: the profile's `redis` service runs
  (the bot waits for it to be healthy), its name resolves, and the bot is the one frontend
  (the polling process) while the N workers answer the jobs.

Compose cannot keep a default service out of a profile, and Docker's DNS knows a service's
name only while its container runs: that name is the one fact the container can see. The
host is looked up as the Redis client would connect to it; an address, or a unix socket,
needs no look-up and means frontend. A name that does not resolve is tried again for
RESOLVE_WAIT_S (containers restarted together, after a reboot, come up in no set order).
QUEUE_URL unset: role all, in-process. The choice and its reason are logged (`role_chosen`).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

RESOLVE_WAIT_S = 3.0  # how long a name that does not resolve is looked up again
RESOLVE_EVERY_S = 0.5
LOOKUP_TIMEOUT_S = 2.0  # one look-up, at most (a resolver that does not answer)


@dataclass(frozen=True)
class RoleChoice:
    role: str  # "all" or "frontend"
    queue_url: str | None  # None: the in-process queue
    reason: str


def resolve(host: str, timeout: float = LOOKUP_TIMEOUT_S) -> str | None:
    """The first address `host` resolves to, or None (no such name, or no answer in time)."""
    found: list[str] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        found.extend(str(info[4][0]) for info in infos)

    # A daemon thread: a resolver that hangs must not hold the process at exit.
    thread = threading.Thread(target=lookup, name="resolve-queue-host", daemon=True)
    thread.start()
    thread.join(timeout)
    return found[0] if found else None


def choose_role(
    queue_url: str | None,
    *,
    lookup: Callable[[str], str | None] = resolve,
    wait_s: float = RESOLVE_WAIT_S,
    every_s: float = RESOLVE_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RoleChoice:
    if queue_url is None:
        return RoleChoice("all", None, "QUEUE_URL is not set: one process, in-process queue")
    parts = urlsplit(queue_url)
    host = parts.hostname
    if parts.scheme == "unix" or not host:
        return RoleChoice("frontend", queue_url, "QUEUE_URL is a unix socket")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return RoleChoice("frontend", queue_url, f"QUEUE_URL names the address {host}")
    deadline = clock() + wait_s
    while True:
        address = lookup(host)
        if address is not None:
            return RoleChoice(
                "frontend", queue_url, f"QUEUE_URL's host {host} resolves (to {address})"
            )
        if clock() >= deadline:
            break
        sleep(every_s)
    return RoleChoice(
        "all",
        None,
        f"QUEUE_URL's host {host} does not resolve (looked up for {wait_s:g} s): no Redis "
        "service runs, so one process with the in-process queue",
    )

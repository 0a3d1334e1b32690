"""Liveness for Docker's HEALTHCHECK.

The running bot touches a heartbeat file every few seconds while its event loop turns
and its inference worker is alive; `python -m bot.health` exits 0 only if that file is
fresh. A file (on the container's tmpfs /tmp) works in polling mode, where the bot
listens on no port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 30.0
DEFAULT_FILE = Path("/tmp/captionbot.health")


async def heartbeat(path: Path, alive: Callable[[], bool]) -> None:
    while True:
        if alive():
            # a read-only or missing /tmp must not take the bot down
            with contextlib.suppress(OSError):
                path.write_text(f"{time.time():.0f}\n")
        await asyncio.sleep(HEARTBEAT_EVERY_S)


def is_fresh(path: Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    try:
        return time.time() - path.stat().st_mtime < stale_after_s
    except OSError:
        return False


def main() -> int:
    path = Path(os.environ.get("HEALTH_FILE") or DEFAULT_FILE)
    if is_fresh(path):
        return 0
    print(f"unhealthy: no heartbeat in {path} for {STALE_AFTER_S:.0f} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

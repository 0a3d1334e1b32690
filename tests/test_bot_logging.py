"""The token never appears in logs, errors or tracebacks, in either log format."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bot_helpers import REPO

TOKEN = "987654:AAsecret-Token_value"

SCRIPT = textwrap.dedent(f"""
    import logging, threading
    from bot.log import get_logger, register_secret, setup_logging

    register_secret({TOKEN!r})
    setup_logging(FORMAT, "INFO")
    log = get_logger("test")
    url = "https://api.telegram.org/bot{TOKEN}/getMe"
    log.info("plain", url=url)
    logging.getLogger("aiogram").error("stdlib says %s", url)
    try:
        raise RuntimeError("request to " + url + " failed")
    except RuntimeError:
        log.exception("handled")
    thread = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError(url)))
    thread.start(); thread.join()
    print("LOGGED-OK", flush=True)
    raise ConnectionError("uncaught " + url)
""")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_the_token_is_redacted_everywhere(log_format):
    result = subprocess.run(
        [sys.executable, "-c", f"FORMAT = {log_format!r}\n" + SCRIPT],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert "LOGGED-OK" in output
    assert result.returncode == 1  # the uncaught error still ends the program
    secret = TOKEN.split(":", 1)[1]
    assert secret not in output, output
    # Each of the five places logged, redacted.
    assert output.count("[redacted]") >= 5, output
    assert "Traceback" in output and "ConnectionError" in output

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
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert "LOGGED-OK" in output
    assert result.returncode == 1  # the uncaught error still ends the program
    secret = TOKEN.split(":", 1)[1]
    assert secret not in output, output
    # Each of the five places logged, redacted.
    assert output.count("[redacted]") >= 5, output
    assert "Traceback" in output and "ConnectionError" in output


# A realistic token: a 10-digit bot id and a 35-character key, as @BotFather issues them.
REAL_TOKEN = "7412589630:AAHv3kT9xQmZ2pLr8WcYn5bJd0sFgE7uKiO"
REAL_KEY = REAL_TOKEN.split(":", 1)[1]

LOCALS_SCRIPT = textwrap.dedent(f"""
    import gc, rich  # the pretty-printer many environments carry; it shows locals, cropped
    from bot.log import get_logger, register_secret, setup_logging

    register_secret({REAL_TOKEN!r})
    setup_logging("console", "INFO")
    log = get_logger("test")

    def make_request(method):  # like aiogram's session: the URL is a local variable
        url = "https://api.telegram.org/bot{REAL_TOKEN}/" + method
        raise ConnectionError("cannot connect")

    try:
        make_request("getMe")
    except ConnectionError:
        log.exception("handled")

    class Leaky:
        def __del__(self):
            url = "https://api.telegram.org/bot{REAL_TOKEN}/close"
            raise RuntimeError("closing " + url)

    Leaky(); gc.collect()
    print("LOGGED-OK", flush=True)
    make_request("getUpdates")
""")


def test_no_slice_of_the_key_leaks_from_console_tracebacks_with_rich_installed():
    pytest.importorskip("rich")  # in the test extras: this test must not skip in CI
    result = subprocess.run(
        [sys.executable, "-c", LOCALS_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert "LOGGED-OK" in output and result.returncode == 1, output
    assert "unraisable_exception" in output and "uncaught_exception" in output, output
    assert output.count("Traceback") >= 3, output
    leaked = {REAL_KEY[i : i + 8] for i in range(len(REAL_KEY) - 7)} & {
        output[i : i + 8] for i in range(len(output) - 7)
    }
    assert not leaked, output


def test_any_long_enough_piece_of_a_secret_is_redacted():
    from bot.log import REDACTED, redact, register_secret

    register_secret(REAL_TOKEN)
    assert redact(f"url='…{REAL_KEY[:20]}…'") == f"url='…{REDACTED}…'"
    assert redact(f"x{REAL_KEY[5:13]}y {REAL_KEY[-9:]}") == f"x{REDACTED}y {REDACTED}"
    assert redact(REAL_KEY[:7]) == REAL_KEY[:7]  # 7 characters may be anything

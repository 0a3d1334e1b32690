"""structlog setup: JSON or console lines on stdout, with secrets redacted.

Everything that logs (our code, aiogram, aiohttp, asyncio, uncaught exceptions in any
thread) goes through one stdlib handler whose formatter renders with structlog and then
scrubs registered secrets from the final text, so a token can't leak through an
exception message or a traceback that quotes a request URL. Tracebacks are rendered plain
(no local variables, whatever pretty-printer is installed): a renderer that shows locals
crops long values with "…", and a cropped token no longer matches it whole; so any
8-character slice of a secret is scrubbed too.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any

import structlog

_secrets: set[str] = set()
# Secrets whose every slice of SLICE characters is scrubbed too, each as one regex.
_slices: dict[str, re.Pattern[str]] = {}
REDACTED = "[redacted]"
SLICE = 8


def register_secret(value: str | None) -> None:
    """Scrub `value` from every log line from now on.

    For a Bot API token "<bot id>:<key>" the key alone is registered too: it is the
    secret part, and it may appear split from the id (e.g. URL-encoded colon).
    """
    if not value:
        return
    _secrets.add(value)
    key = value.split(":", 1)[1] if ":" in value else value
    if ":" in value:
        _secrets.add(key)
        _secrets.add(value.replace(":", "%3A"))
    if len(key) >= SLICE:
        pieces = {key[i : i + SLICE] for i in range(len(key) - SLICE + 1)}
        _slices[key] = re.compile("|".join(map(re.escape, sorted(pieces))))


def redact(text: str) -> str:
    # Longest first, so the full token is replaced before its key part.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    for key, pattern in _slices.items():
        text = _redact_slices(text, key, pattern)
    return text


def _redact_slices(text: str, key: str, pattern: re.Pattern[str]) -> str:
    """Replace every run of `text` that is a piece of `key` at least SLICE long."""
    out, pos = [], 0
    while match := pattern.search(text, pos):
        start, end = match.span()
        while end < len(text) and text[start : end + 1] in key:
            end += 1  # the longest piece of the key starting here
        out += [text[pos:start], REDACTED]
        pos = end
    return "".join(out) + text[pos:] if out else text


def _redact_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    return redact(rendered) if isinstance(rendered, str) else rendered


def setup_logging(log_format: str = "console", level: str = "INFO") -> None:
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        # JSON cannot carry a live exception: render the traceback to a string field.
        shared_tail: list[Any] = [structlog.processors.format_exc_info]
    else:
        # Plain: rich/better-exceptions would print local variables (a request URL), cropped.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
        shared_tail = []

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *shared_tail,
            renderer,
            _redact_rendered,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log (webhook mode) would log every update request; keep warnings.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiogram logs every handled update at INFO; our per-job line says more, once.
    logging.getLogger("aiogram.event").setLevel(max(root.level, logging.WARNING))
    logging.captureWarnings(True)

    log = structlog.get_logger("bot")

    def log_uncaught(exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            return
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        log.critical(
            "uncaught_exception_in_thread",
            thread=getattr(args.thread, "name", None),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def log_unraisable(args: Any) -> None:  # an exception in __del__, a finaliser, a callback
        log.error(
            "unraisable_exception",
            message=args.err_msg or "Exception ignored in",
            object=_describe(args.object),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = log_uncaught
    threading.excepthook = log_uncaught_in_thread
    sys.unraisablehook = log_unraisable


def _describe(thing: object) -> str | None:
    try:
        return None if thing is None else repr(thing)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the error itself
        return object.__repr__(thing)


def get_logger(name: str = "bot") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)

"""structlog setup: JSON or console lines on stdout, with secrets redacted.

Everything that logs (our code, aiogram, aiohttp, asyncio, uncaught exceptions in any
thread) goes through one stdlib handler whose formatter renders with structlog and then
scrubs registered secrets from the final text, so a token can't leak through an
exception message or a traceback that quotes a request URL.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import structlog

_secrets: set[str] = set()
REDACTED = "[redacted]"


def register_secret(value: str | None) -> None:
    """Scrub `value` from every log line from now on.

    For a Bot API token "<bot id>:<key>" the key alone is registered too: it is the
    secret part, and it may appear split from the id (e.g. URL-encoded colon).
    """
    if not value:
        return
    _secrets.add(value)
    if ":" in value:
        _secrets.add(value.split(":", 1)[1])
        _secrets.add(value.replace(":", "%3A"))


def redact(text: str) -> str:
    # Longest first, so the full token is replaced before its key part.
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


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
        renderer = structlog.dev.ConsoleRenderer(colors=False)
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

    def log_uncaught(exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
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

    sys.excepthook = log_uncaught
    threading.excepthook = log_uncaught_in_thread


def get_logger(name: str = "bot") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)

"""Outgoing Bot API calls that survive Telegram trouble.

`RetryMiddleware` wraps every request the bot makes: a 429 is retried after the
`retry_after` Telegram asks for, 5xx / network / undecodable answers are retried with
exponential backoff, and after `budget_s` seconds in total the call gives up with one
log line and the original error. Once shutdown has begun, no retry reaches past its
deadline (`finish_by`). getUpdates is left to aiogram's polling loop, which has its own
backoff.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiogram import Bot
from aiogram.client.session.middlewares.base import BaseRequestMiddleware, NextRequestMiddlewareType
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.methods import AnswerCallbackQuery, GetUpdates, SendChatAction, TelegramMethod
from aiogram.methods.base import Response, TelegramType

from bot.log import get_logger

log = get_logger("bot.retry")

T = TypeVar("T")

FIRST_DELAY_S = 0.25
MAX_DELAY_S = 8.0
# Telegram ignores an answer to a callback query after ~15 s; retrying longer is useless.
CALLBACK_ANSWER_BUDGET_S = 10.0

TRANSIENT_TELEGRAM_ERRORS = (TelegramServerError, TelegramNetworkError, ClientDecodeError)


def backoff_delay(attempt: int) -> float:
    """0.25 s, 0.5 s, 1 s, ... capped at 8 s, with jitter so retries don't align."""
    delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (attempt - 1))
    return delay * random.uniform(0.8, 1.2)


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    budget_s: float,
    transient: tuple[type[BaseException], ...] = TRANSIENT_TELEGRAM_ERRORS,
    deadline: Callable[[], float] = lambda: math.inf,
) -> T:
    """`await call()`, retrying transient errors until `budget_s` seconds have passed,
    and never past `deadline()` (a time.monotonic() value, read before every wait)."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TelegramRetryAfter as error:
            delay = float(error.retry_after)
            reason = f"429 retry_after={error.retry_after}"
            last: BaseException = error
        except transient as error:
            delay = backoff_delay(attempt)
            reason = f"{type(error).__name__}: {error}"
            last = error
        now = time.monotonic()
        elapsed = now - started
        if elapsed + delay > budget_s or now + delay > deadline():
            log.error(
                "telegram_gave_up",
                method=what,
                attempts=attempt,
                elapsed_s=round(elapsed, 2),
                error=reason,
            )
            raise last
        log.warning(
            "telegram_retry", method=what, attempt=attempt, delay_s=round(delay, 2), error=reason
        )
        await asyncio.sleep(delay)


class RetryMiddleware(BaseRequestMiddleware):
    def __init__(self, budget_s: float = 60.0) -> None:
        self.budget_s = budget_s
        self.deadline = math.inf

    def finish_by(self, deadline: float) -> None:
        """From now on, retry nothing past `deadline` (time.monotonic()): shutdown has begun."""
        self.deadline = deadline

    async def __call__(
        self,
        make_request: NextRequestMiddlewareType[TelegramType],
        bot: Bot,
        method: TelegramMethod[TelegramType],
    ) -> Response[TelegramType]:
        if isinstance(method, GetUpdates | SendChatAction):
            # Polling retries by itself; a late "typing..." after the reply is worse
            # than none, so chat actions are best-effort.
            # narrowed by isinstance, which aiogram's generic middleware type cannot follow
            return await make_request(bot, method)  # type: ignore[arg-type]
        budget = self.budget_s
        if isinstance(method, AnswerCallbackQuery):
            budget = min(budget, CALLBACK_ANSWER_BUDGET_S)
        return await with_retries(
            lambda: make_request(bot, method),
            what=method.__api_method__,
            budget_s=budget,
            deadline=lambda: self.deadline,
        )

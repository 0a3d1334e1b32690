"""`python -m bot [--playground]`

With TELEGRAM_BOT_TOKEN set, runs the bot against Telegram (or TELEGRAM_API_BASE).
Without one (or with --playground), starts the built-in Bot API emulator with its local
chat page and runs the very same bot against it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pydantic import SecretStr

from bot.log import get_logger, register_secret, setup_logging
from bot.settings import Settings, SettingsError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--playground",
        action="store_true",
        help="chat with the bot in a local web page instead of Telegram",
    )
    parser.add_argument(
        "--role",
        choices=("all", "frontend", "worker", "auto"),
        default="all",
        help="with QUEUE_URL: frontend (takes updates, enqueues jobs), worker "
        "(runs the model on jobs, replies) or all (both; the default). auto: frontend if "
        "QUEUE_URL's host resolves (compose's scale profile runs Redis), else all with the "
        "in-process queue",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the settings: exit 0 if the bot can start with them, "
        "2 (with every problem) if not",
    )
    return parser.parse_args(argv)


async def run_playground(settings: Settings) -> None:
    from bot.emulator.playground import start_playground

    emulator = await start_playground(host=settings.playground_host, port=settings.playground_port)
    register_secret(emulator.bot_token)
    try:
        print(
            f"Playground: open {emulator.page_url} to chat with the bot (Ctrl+C to stop)",
            flush=True,
        )
        from bot.app import run

        await run(
            settings.model_copy(
                update={
                    "mode": "polling",
                    "telegram_api_base": emulator.base_url,
                    "telegram_bot_token": SecretStr(emulator.bot_token),
                    "journal_file": None,  # the emulator's updates die with this process
                }
            )
        )
    finally:
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"captionbot: {error}", file=sys.stderr)
        return 2
    # Before anything can log: the token must never reach a log line.
    register_secret(settings.token)
    register_secret(settings.webhook_secret_value)
    setup_logging(settings.log_format, settings.log_level)
    log = get_logger("bot")

    playground = args.role in ("all", "auto") and (
        args.playground
        or (settings.token is None and settings.mode == "polling" and settings.playground == "auto")
    )
    if not playground:
        try:
            settings.require_token()
        except SettingsError as error:
            print(f"captionbot: {error}", file=sys.stderr)
            return 2
    if args.check:
        print("captionbot: settings OK", flush=True)
        return 0

    # Until aiogram installs its own handlers (after the model has loaded), SIGTERM means
    # "stop now": nothing has been accepted yet, so exit cleanly like Ctrl+C does.
    signal.signal(signal.SIGTERM, _interrupt)
    role = args.role
    try:
        if role == "auto" and not playground:
            settings, role = choose_role(settings)
        from bot.app import StartupError, run
    except KeyboardInterrupt:
        return 0
    log.info(
        "starting",
        mode="playground" if playground else settings.mode,
        captioner=settings.captioner,
        device=settings.device,
        role=role,
        queue="redis" if settings.queue_url else "in-process",
    )
    try:
        asyncio.run(run_playground(settings) if playground else run(settings, role=role))
    except (SettingsError, StartupError) as error:
        log.error("cannot_start", reason=str(error))
        return 2
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("crashed")
        return 1
    return 0


def choose_role(settings: Settings) -> tuple[Settings, str]:
    """--role auto: the settings and role to run with (bot/jobs/auto.py), logged with why."""
    from bot.jobs.auto import choose_role as choose

    choice = choose(settings.queue_url)
    get_logger("bot").info(
        "role_chosen",
        role=choice.role,
        queue="redis" if choice.queue_url else "in-process",
        reason=choice.reason,
    )
    return settings.model_copy(update={"queue_url": choice.queue_url}), choice.role


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

"""A local Telegram Bot API emulator and the playground chat page built on it.

Tests use `BotAPIEmulator` as their fake Telegram; `python -m bot --playground` uses
`start_playground` to let a person chat with the real bot in a browser, offline.
"""

from .errors import BotAPIError
from .params import UploadedFile
from .server import BotAPIEmulator

__all__ = ["BotAPIEmulator", "BotAPIError", "UploadedFile"]

"""Bot API errors, shaped exactly as Telegram reports them."""

from __future__ import annotations

from typing import Any


class BotAPIError(Exception):
    """An error answer: raised anywhere inside a method, turned into JSON by the server."""

    def __init__(self, error_code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ok": False,
            "error_code": self.error_code,
            "description": self.description,
        }
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def bad_request(reason: str) -> BotAPIError:
    return BotAPIError(400, f"Bad Request: {reason}")


def too_many_requests(retry_after: int) -> BotAPIError:
    return BotAPIError(
        429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}
    )


NOT_FOUND = BotAPIError(404, "Not Found")
UNAUTHORIZED = BotAPIError(401, "Unauthorized")

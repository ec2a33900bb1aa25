"""One exception class per failure; HTTP statuses map to them in `error_from_response` only.

The TypeScript SDK (packages/sdk/src/errors.ts) has the same classes under the same names,
each with `message`, `status` (None when no HTTP answer was had) and `code`.
"""
from __future__ import annotations

import builtins
import json
from typing import Optional


class PodflareError(Exception):
    def __init__(self, message: str, status: Optional[int] = None, code: str = "error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class InvalidArgumentError(PodflareError, ValueError):
    """400: the request is malformed or a value is out of range (also found before sending;
    a ValueError too)."""


class AuthenticationError(PodflareError):
    """401: no API key, or a wrong one (set PODFLARE_API_KEY); 403: the daemon has no key
    and this request did not address it by a loopback name (use http://127.0.0.1:7070)."""


class NotFoundError(PodflareError):
    """404: no such sandbox (or not yours), or no such file."""


class SandboxStateError(PodflareError):
    """409: the sandbox is not in a state that allows the operation (e.g. it died)."""


class PayloadTooLargeError(PodflareError):
    """413: an upload over the daemon's limit."""


class RateLimitError(PodflareError):
    """429: over a limit (sandbox count, quota)."""


class NotImplementedByDaemonError(PodflareError):
    """501: the daemon does not implement this operation yet."""


class CapacityError(PodflareError):
    """503: the host has no capacity right now; retry later."""


class ServerError(PodflareError):
    """5xx: a bug in the daemon; its log has details."""


class ConnectionError(PodflareError):  # noqa: A001 - mirrors the TypeScript SDK's name
    """The daemon could not be reached, or the connection was cut before its answer ended
    (an exec stream that ends without its exit event)."""


class TimeoutError(ConnectionError, builtins.TimeoutError):  # noqa: A001 - as in TypeScript
    """The daemon sent nothing for longer than the client waits (a kind of ConnectionError;
    also the built-in TimeoutError that a socket timeout raised before)."""


_BY_STATUS = {
    400: InvalidArgumentError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: SandboxStateError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    501: NotImplementedByDaemonError,
    503: CapacityError,
}


def error_from_response(status: int, body: bytes) -> PodflareError:
    text = body[:2000].decode("utf-8", "replace")
    message, code = text or f"HTTP {status}", "error"
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            message = str(parsed.get("error", message))
            code = str(parsed.get("code", code))
    except ValueError:
        pass
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else PodflareError)
    return cls(message, status, code)

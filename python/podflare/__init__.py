"""podflare: self-hosted microVM sandboxes for AI agents (Python SDK, standard library only)."""
from ._wire import ExecEvent, SandboxInfo
from .errors import (
    AuthenticationError,
    CapacityError,
    ConnectionError,
    InvalidArgumentError,
    NotFoundError,
    NotImplementedByDaemonError,
    PayloadTooLargeError,
    PodflareError,
    RateLimitError,
    SandboxStateError,
    ServerError,
    TimeoutError,
)
from .sandbox import ExecResult, Sandbox

__all__ = [
    "Sandbox",
    "ExecResult",
    "ExecEvent",
    "SandboxInfo",
    "PodflareError",
    "InvalidArgumentError",
    "AuthenticationError",
    "NotFoundError",
    "SandboxStateError",
    "PayloadTooLargeError",
    "RateLimitError",
    "NotImplementedByDaemonError",
    "CapacityError",
    "ServerError",
    "ConnectionError",
    "TimeoutError",
]
__version__ = "0.1.0"

"""podflare: self-hosted microVM sandboxes for AI agents (Python SDK, standard library only)."""
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
)
from .sandbox import ExecResult, Sandbox

__all__ = [
    "Sandbox",
    "ExecResult",
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
]
__version__ = "0.1.0"

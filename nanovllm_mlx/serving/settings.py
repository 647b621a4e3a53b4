"""What a server accepts: limits, the API key and the Host-header allowlist, in one place."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_MAX_WAITING = 256
DEFAULT_MAX_BODY_MB = 4.0  # a full 8k-token conversation is ~50 KB of JSON
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
RETRY_AFTER_S = 1  # what a 503 for a full queue tells clients; the openai client honours it


@dataclass(frozen=True)
class ServerSettings:
    """api_key: bearer token every endpoint but /health requires (None: open).
    model_name: the name clients use (default: the engine's model name).
    max_waiting: requests queued and not yet admitted to the running batch beyond which new
    ones get a 503 (None: unbounded). request_timeout: seconds from arrival after which a
    request is aborted and answered with a 504 (None: never). max_body_bytes: larger
    request bodies get a 413, checked while they are read. allowed_hosts: Host headers
    (any port) the server answers, against DNS rebinding (None: any host).
    tool_call_parser: the tool-call format to parse (None: the one the chat template
    writes, else hermes)."""

    api_key: str | None = None
    model_name: str | None = None
    max_waiting: int | None = DEFAULT_MAX_WAITING
    request_timeout: float | None = None
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    allowed_hosts: tuple[str, ...] | None = None
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_body_bytes < 1:
            raise ValueError(f"the body size limit must be positive, got {self.max_body_bytes}")
        if self.allowed_hosts is not None:
            hosts = tuple(normalize_host(h) for h in self.allowed_hosts)
            object.__setattr__(self, "allowed_hosts", None if "*" in hosts else hosts)


def normalize_host(host: str) -> str:
    """A Host header or allowlist entry without its port or IPv6 brackets, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port; more colons is a bare IPv6 address
        host = host.split(":", 1)[0]
    return host


def is_loopback(host: str) -> bool:
    host = normalize_host(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> tuple[str, ...] | None:
    """Loopback names when bound to loopback: a web page the user visits cannot then reach
    the server through a DNS name rebound to 127.0.0.1. Bound elsewhere, any Host."""
    return LOOPBACK_HOSTS if is_loopback(bind_host) else None

"""RouterConfig: the one validated source of truth for a router's front door."""

from __future__ import annotations

import ipaddress

import msgspec


def is_loopback(host: str) -> bool:
    """True when binding to host only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve to anything


class RouterConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port (RouterServer.port says which)
    api_keys: tuple[str, ...] = ()  # clients send `authorization: Bearer <key>`; empty: no auth
    # Serving a non-loopback address without keys must be asked for explicitly (e.g. when a
    # service mesh or ingress authenticates in front of the router).
    allow_unauthenticated_remote: bool = False
    max_outstanding: int = 1024  # admitted, unfinished requests; beyond: RESOURCE_EXHAUSTED
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca_path: str | None = None  # set: clients must present a certificate it signed
    max_message_bytes: int = 64 * 1024 * 1024
    keepalive_time_s: float = 30.0  # server pings idle connections so long streams stay up
    keepalive_timeout_s: float = 10.0
    min_client_ping_interval_s: float = 10.0  # clients pinging more often are cut off
    # Dispatch: prefix affinity over the first N full KV blocks of the prompt.
    prefix_affinity_blocks: int = 16
    affinity_cache_size: int = 100_000
    # Keep a prefix on its replica while its outstanding tokens stay within
    # factor * (least-loaded replica's) + slack.
    affinity_load_factor: float = 2.0
    affinity_load_slack_tokens: int = 4096
    # Fault handling: a request is re-submitted at most this many times after replica failures.
    max_resubmits: int = 3
    # How long a request whose replica died waits for another replica before failing UNAVAILABLE.
    orphan_timeout_s: float = 60.0
    drain_timeout_s: float = 60.0
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"RouterConfig: {message}")

        need(0 <= self.port <= 65535, f"port must be in [0, 65535] (got {self.port})")
        need(all(isinstance(k, str) and k.strip() == k and k for k in self.api_keys),
             "api_keys must be non-empty strings without surrounding whitespace")
        need(bool(self.api_keys) or self.allow_unauthenticated_remote or is_loopback(self.host),
             f"refusing to serve {self.host!r} without api_keys: anyone who can reach it could "
             "use the model. Set api_keys, bind to 127.0.0.1, or set "
             "allow_unauthenticated_remote=true if something in front authenticates clients")
        need(self.max_outstanding >= 1,
             f"max_outstanding must be >= 1 (got {self.max_outstanding})")
        need((self.tls_cert_path is None) == (self.tls_key_path is None),
             "set both tls_cert_path and tls_key_path, or neither")
        need(self.tls_client_ca_path is None or self.tls_cert_path is not None,
             "tls_client_ca_path needs tls_cert_path and tls_key_path")
        need(self.max_message_bytes >= 1024 * 1024,
             f"max_message_bytes must be >= 1 MiB (got {self.max_message_bytes})")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s",
                     "orphan_timeout_s", "drain_timeout_s", "shutdown_grace_s"):
            need(getattr(self, name) > 0, f"{name} must be > 0 (got {getattr(self, name)})")
        need(self.prefix_affinity_blocks >= 0,
             f"prefix_affinity_blocks must be >= 0; 0 turns affinity off "
             f"(got {self.prefix_affinity_blocks})")
        need(self.affinity_cache_size >= 1,
             f"affinity_cache_size must be >= 1 (got {self.affinity_cache_size})")
        need(self.affinity_load_factor >= 1.0,
             f"affinity_load_factor must be >= 1 (got {self.affinity_load_factor})")
        need(self.affinity_load_slack_tokens >= 0,
             f"affinity_load_slack_tokens must be >= 0 (got {self.affinity_load_slack_tokens})")
        need(self.max_resubmits >= 0, f"max_resubmits must be >= 0 (got {self.max_resubmits})")

    def __repr__(self) -> str:
        # Configs end up in logs; the keys must not.
        shown = msgspec.structs.asdict(self)
        shown["api_keys"] = f"<{len(self.api_keys)} keys>"
        fields = ", ".join(f"{name}={value if name == 'api_keys' else repr(value)}"
                           for name, value in shown.items())
        return f"RouterConfig({fields})"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_path is not None

"""Settings of the dev server, validated once when the server is built.

Must NOT: open sockets, generate keys or read the clock; this is a plain value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .._errors import ConfigError

__all__ = ["AT_ALGORITHMS", "MT_ALGORITHMS", "DevServerConfig", "is_loopback_host"]

AT_ALGORITHMS = ("RS256", "ES256")
MT_ALGORITHMS = ("ES512", "ES256", "RS256")

#: The audience WLCG issuers put into tokens when nobody asked for a specific one.
DEFAULT_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
DEFAULT_OP_SCOPES = (
    "openid",
    "offline_access",
    "storage.read:/",
    "storage.create:/",
    "storage.modify:/",
    "storage.stage:/",
)


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DevServerConfig:
    """Everything a dev server instance is built from.

    ``op_scopes`` are the scopes the simulated OP lets this user have; ``storage.*`` entries
    cover narrower paths per path component (WLCG semantics). ``rate_limit`` is
    ``(max_requests, window_s)`` per client IP, or ``None`` for no limit (the real server's
    default is ``(100, 300)``).
    """

    host: str = "127.0.0.1"
    port: int = 0
    tls_dir: Optional[str] = None
    at_lifetime_s: int = 1200
    at_alg: str = "RS256"
    default_audience: str = DEFAULT_AUDIENCE
    subject: str = "dev-user"
    op_scopes: Tuple[str, ...] = DEFAULT_OP_SCOPES
    mt_alg: str = "ES512"
    rate_limit: Optional[Tuple[int, float]] = None
    allow_remote: bool = False
    client_id: str = "jobtoken-devserver"
    provider_name: str = "jobtoken dev OP"
    short_token_len: int = 64
    version: str = "0.10.2+jobtoken-devserver"
    extra_san: Tuple[str, ...] = field(default=())
    #: the provider's ``mytokens_max_lifetime`` (s; 0: none): longer sub-mytokens are capped,
    #: or refused with 400 when the request sets ``error_on_restrictions`` (as the real server)
    max_mytoken_lifetime_s: int = 0
    #: RSA keys are shared per process to keep start-up fast; True forces new ones (e.g. to
    #: test that a token from another server's key is rejected).
    fresh_keys: bool = False

    def __post_init__(self) -> None:
        # Normalise list inputs so callers may pass lists; the value stays hashable.
        object.__setattr__(self, "op_scopes", tuple(self.op_scopes))
        object.__setattr__(self, "extra_san", tuple(self.extra_san))
        if self.rate_limit is not None:
            object.__setattr__(
                self, "rate_limit", (int(self.rate_limit[0]), float(self.rate_limit[1]))
            )

    def validate(self) -> None:
        """Refuse settings the server cannot honour.

        Raises:
            ConfigError: unknown algorithm, bad lifetime/port/limit, or a non-loopback host
                without ``allow_remote``.
        """
        if not self.allow_remote and not is_loopback_host(self.host):
            raise ConfigError(
                f"devserver refuses to bind host={self.host}: not loopback "
                "(it is a development tool; pass allow_remote/--force-remote to override)"
            )
        self._validate_algorithms()
        self._validate_numbers()

    def _validate_algorithms(self) -> None:
        if self.at_alg not in AT_ALGORITHMS:
            raise ConfigError(
                f"devserver at_alg={self.at_alg} unsupported; use one of {', '.join(AT_ALGORITHMS)}"
            )
        if self.mt_alg not in MT_ALGORITHMS:
            raise ConfigError(
                f"devserver mt_alg={self.mt_alg} unsupported; use one of {', '.join(MT_ALGORITHMS)}"
            )

    def _validate_numbers(self) -> None:
        if self.at_lifetime_s < 1:
            raise ConfigError(f"devserver at_lifetime_s={self.at_lifetime_s} must be >= 1")
        if self.max_mytoken_lifetime_s < 0:
            raise ConfigError(
                f"devserver max_mytoken_lifetime_s={self.max_mytoken_lifetime_s} must be >= 0"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"devserver port={self.port} out of range")
        if self.short_token_len < 32:
            raise ConfigError("devserver short_token_len must be >= 32 (the API minimum)")
        if self.rate_limit is not None and (self.rate_limit[0] < 1 or self.rate_limit[1] <= 0):
            raise ConfigError(f"devserver rate_limit={self.rate_limit} must be (N>=1, window>0)")
        if not self.subject:
            raise ConfigError("devserver subject must not be empty")

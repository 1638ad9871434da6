"""Fault injection rules: which request gets which broken answer.

Must NOT: touch sockets or sleep; the server applies what ``take`` returns. Time comes in as
an argument (``until`` is compared with the server clock's wall time).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ._issuer import TOKEN_FAULTS

__all__ = ["ENDPOINTS", "Fault", "FaultSet"]

logger = logging.getLogger(__name__)

#: Endpoint names faults can target.
ENDPOINTS = ("discovery", "access", "my", "revoke", "tokeninfo", "jwks", "op-discovery", "op-jwks")


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour.

    ``status``/``body``/``error`` replace the answer; ``delay_s`` waits first; ``drop`` closes
    the connection without an answer; ``garbage`` answers non-JSON; ``token`` (AT endpoint
    only) mints a broken access token; ``process`` lets the request take effect on the
    server before the answer is replaced (a response lost after commit).
    """

    id: int
    endpoint: str
    status: Optional[int] = None
    body: Optional[str] = None
    error: Optional[str] = None
    error_description: Optional[str] = None
    delay_s: float = 0.0
    drop: bool = False
    garbage: bool = False
    retry_after_s: Optional[float] = None
    token: Optional[str] = None
    process: bool = False
    until: Optional[float] = None

    @property
    def replaces_response(self) -> bool:
        return (
            self.status is not None
            or self.body is not None
            or self.error is not None
            or self.drop
            or self.garbage
        )

    def describe(self) -> str:
        parts = [self.endpoint]
        for name in ("status", "error", "token"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        for name in ("drop", "garbage", "process"):
            if getattr(self, name):
                parts.append(name)
        if self.delay_s:
            parts.append(f"delay_s={self.delay_s}")
        return " ".join(parts)


class FaultSet:
    """The active faults of one server, applied first-added-first per endpoint."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._faults: List[Tuple[Fault, Optional[int]]] = []  # (fault, remaining count)
        self._next_id = 1

    def add(
        self,
        endpoint: str,
        *,
        status: Optional[int] = None,
        body: Optional[str] = None,
        error: Optional[str] = None,
        error_description: Optional[str] = None,
        delay_s: float = 0.0,
        drop: bool = False,
        garbage: bool = False,
        retry_after_s: Optional[float] = None,
        count: Optional[int] = None,
        until: Optional[float] = None,
        token: Optional[str] = None,
        process: bool = False,
    ) -> Fault:
        """Inject a fault for the next ``count`` requests (all if None) until ``until``.

        ``until`` is a wall-clock instant (epoch seconds of the server clock).

        Raises:
            ValueError: unknown endpoint or token fault, or nonsensical values.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(
                f"unknown fault endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}"
            )
        if token is not None and (endpoint != "access" or token not in TOKEN_FAULTS):
            raise ValueError(
                f"token fault {token!r} needs endpoint 'access' and one of "
                f"{', '.join(TOKEN_FAULTS)}"
            )
        if count is not None and count < 1:
            raise ValueError("fault count must be >= 1")
        if delay_s < 0:
            raise ValueError("fault delay_s must be >= 0")
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"fault status {status} is not an HTTP status")
        with self._lock:
            fault = Fault(
                id=self._next_id,
                endpoint=endpoint,
                status=status,
                body=body,
                error=error,
                error_description=error_description,
                delay_s=float(delay_s),
                drop=drop,
                garbage=garbage,
                retry_after_s=retry_after_s,
                token=token,
                process=process,
                until=until,
            )
            self._next_id += 1
            self._faults.append((fault, count))
        logger.info("fault added id=%d %s count=%s", fault.id, fault.describe(), count)
        return fault

    def add_from_json(self, spec: Mapping[str, Any]) -> Fault:
        """``add`` from a JSON object (the HTTP control API); ``for_s`` is relative ``until``.

        Raises:
            ValueError: unknown keys or bad values.
        """
        allowed = {
            "endpoint",
            "status",
            "body",
            "error",
            "error_description",
            "delay_s",
            "drop",
            "garbage",
            "retry_after_s",
            "count",
            "until",
            "for_s",
            "token",
            "process",
        }
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        kwargs: Dict[str, Any] = {k: v for k, v in spec.items() if k not in ("endpoint", "for_s")}
        if spec.get("for_s") is not None:
            kwargs["until"] = self._now() + float(spec["for_s"])
        endpoint = spec.get("endpoint")
        if not isinstance(endpoint, str):
            raise ValueError("fault endpoint missing")
        return self.add(endpoint, **kwargs)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
        logger.info("faults cleared")

    def active(self) -> Tuple[Fault, ...]:
        with self._lock:
            return tuple(f for f, _ in self._faults)

    def take(self, endpoint: str) -> Optional[Fault]:
        """The fault for this request (consuming one of its count), or None."""
        now = self._now()
        with self._lock:
            for i, (fault, remaining) in enumerate(list(self._faults)):
                if fault.endpoint != endpoint:
                    continue
                if fault.until is not None and now > fault.until:
                    continue
                if remaining is not None:
                    if remaining <= 1:
                        self._faults.pop(i)
                    else:
                        self._faults[i] = (fault, remaining - 1)
                return fault
            # forget expired time windows
            self._faults = [(f, c) for f, c in self._faults if f.until is None or now <= f.until]
            return None

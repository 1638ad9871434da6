"""HTTP response values and the Mytoken error body shape.

``ApiError`` is the dev server's internal signal for "answer with this Mytoken API error";
handlers raise it and the dispatcher turns it into a response. It never leaves the server
and is deliberately not a ``JobtokenError`` (it is a wire answer, not a failure of ours).

Must NOT: do I/O or know about sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["ApiError", "Request", "Response", "error_body", "json_response"]


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request as the handlers see it."""

    method: str
    path: str
    query: str
    # both may carry a mytoken (body, "Authorization: Bearer", a "mytoken" cookie)
    headers: Mapping[str, str] = field(repr=False)  # lower-case names
    body: bytes = field(repr=False)
    client_ip: str

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = field(default=b"", repr=False)
    headers: Tuple[Tuple[str, str], ...] = ()


def error_body(error: str, description: str = "") -> Dict[str, str]:
    """``{error, error_description}``; the description is omitted when empty (Go omitempty)."""
    body = {"error": error}
    if description:
        body["error_description"] = description
    return body


def json_response(status: int, obj: Any, headers: Tuple[Tuple[str, str], ...] = ()) -> Response:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return Response(status, data, (("Content-Type", "application/json"),) + headers)


class ApiError(Exception):
    """An API error answer (status + ``error`` + optional ``error_description``)."""

    def __init__(self, status: int, error: str, description: str = "") -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.description = description

    def response(self) -> Response:
        return json_response(self.status, error_body(self.error, self.description))


def status_text(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def bad_request(description: str) -> ApiError:
    return ApiError(400, "invalid_request", description)


def http_error(status: int, description: Optional[str] = None) -> Response:
    """Framework-level errors (404/405 ...): ``error`` is the HTTP status text."""
    return json_response(status, error_body(status_text(status), description or ""))

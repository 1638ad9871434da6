"""The Mytoken error body and the response values every handler builds on.

Clients (jobtoken's own, libmytoken, the mytoken CLI) parse these bodies. Section 1.10 of
the reference gives the shape: ``{"error", "error_description"?}``, with the description
left out when empty. Framework errors carry the HTTP status text as ``error``.
"""

from __future__ import annotations

import json

import pytest

from jobtoken._errors import JobtokenError
from jobtoken.devserver._responses import (
    ApiError,
    Request,
    Response,
    bad_request,
    error_body,
    http_error,
    json_response,
)


def body_of(resp: Response) -> object:
    assert dict(resp.headers)["Content-Type"] == "application/json"
    return json.loads(resp.body)


def test_error_body_leaves_out_an_empty_description() -> None:
    """Go ``omitempty``: a client must not get ``"error_description": ""`` or null."""
    assert error_body("invalid_token") == {"error": "invalid_token"}
    assert error_body("invalid_token", "") == {"error": "invalid_token"}
    assert error_body("usage_restricted", "no") == {
        "error": "usage_restricted",
        "error_description": "no",
    }


def test_api_error_answers_its_status_and_body() -> None:
    resp = ApiError(401, "invalid_token").response()
    assert resp.status == 401 and body_of(resp) == {"error": "invalid_token"}
    resp = ApiError(403, "usage_restricted", "not allowed").response()
    assert resp.status == 403
    assert body_of(resp) == {"error": "usage_restricted", "error_description": "not allowed"}
    assert str(ApiError(403, "usage_restricted", "not allowed")) == "403 usage_restricted"


def test_api_error_is_not_a_jobtoken_error() -> None:
    """It is a wire answer: the library's error handling must never catch one as its own."""
    assert not issubclass(ApiError, JobtokenError)


def test_bad_request_is_400_invalid_request() -> None:
    err = bad_request("token not valid")
    assert (err.status, err.error, err.description) == (400, "invalid_request", "token not valid")


@pytest.mark.parametrize(
    ("status", "description", "expected"),
    [
        (404, "Cannot GET /x", {"error": "Not Found", "error_description": "Cannot GET /x"}),
        (405, None, {"error": "Method Not Allowed"}),
        (429, "", {"error": "Too Many Requests"}),
        (503, None, {"error": "Service Unavailable"}),
        (599, None, {"error": "Error"}),  # no standard phrase for the status
    ],
)
def test_framework_errors_use_the_status_text(status: int, description, expected) -> None:
    resp = http_error(status, description)
    assert resp.status == status and body_of(resp) == expected


def test_json_response_keeps_extra_headers_after_the_content_type() -> None:
    resp = json_response(200, {"keys": []}, (("Cache-Control", "max-age=3600"),))
    assert resp.headers == (
        ("Content-Type", "application/json"),
        ("Cache-Control", "max-age=3600"),
    )
    assert body_of(resp) == {"keys": []}
    assert Response(204).body == b"" and Response(204).headers == ()


def test_request_header_lookup_ignores_case_and_defaults_to_empty() -> None:
    req = Request(
        method="POST",
        path="/api/v0/token/access",
        query="",
        headers={"content-type": "application/json"},
        body=b'{"mytoken": "secret-mytoken"}',
        client_ip="127.0.0.1",
    )
    assert req.header("Content-Type") == req.header("content-type") == "application/json"
    assert req.header("Authorization") == ""
    assert "secret-mytoken" not in repr(req)  # request bodies carry mytokens


def test_request_repr_hides_mytokens_in_headers_too() -> None:
    # Authorization and Cookie are other places where clients send a mytoken
    req = Request(
        method="POST",
        path="/api/v0/tokeninfo",
        query="",
        headers={"authorization": "Bearer header-mytoken", "cookie": "mytoken=cookie-mytoken"},
        body=b"",
        client_ip="127.0.0.1",
    )
    assert "header-mytoken" not in repr(req) and "cookie-mytoken" not in repr(req)

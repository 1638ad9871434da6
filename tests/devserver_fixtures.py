"""Helpers for tests that need a running dev server (import these; no fixtures here).

Example::

    from tests.devserver_fixtures import access_token_request, client_for, running_devserver

    def test_x():
        with running_devserver(op_scopes=("storage.create:/vo",)) as srv, client_for(srv) as c:
            mt = srv.issue_mytoken()
            r = access_token_request(c, mt, scope="storage.create:/vo")
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any, Dict, Iterator, Optional

import httpx
import jwt

from jobtoken.devserver import DevServer, DevServerConfig

__all__ = [
    "access_token_request",
    "client_for",
    "decode_unverified",
    "is_live",
    "running_devserver",
    "sub_mytoken_request",
]


@contextlib.contextmanager
def running_devserver(clock: Any = None, **config: Any) -> Iterator[DevServer]:
    """A started dev server on 127.0.0.1:0 with ``DevServerConfig(**config)``."""
    srv = DevServer(DevServerConfig(**config), clock=clock)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def client_for(srv: DevServer, timeout_s: float = 5.0) -> httpx.Client:
    """An httpx client for the server (trusting its CA when it serves HTTPS)."""
    verify: Any = ssl.create_default_context(cafile=srv.ca_file) if srv.ca_file else True
    return httpx.Client(base_url=srv.url, timeout=timeout_s, verify=verify)


def access_token_request(
    client: httpx.Client,
    mytoken: Optional[str],
    *,
    form: bool = False,
    **fields: Any,
) -> httpx.Response:
    """POST the AT endpoint with ``grant_type=mytoken`` plus ``fields`` (JSON or form)."""
    body: Dict[str, Any] = {"grant_type": "mytoken"}
    if mytoken is not None:
        body["mytoken"] = mytoken
    body.update(fields)
    if form:
        return client.post("/api/v0/token/access", data=body)
    return client.post("/api/v0/token/access", json=body)


def sub_mytoken_request(client: httpx.Client, mytoken: str, **fields: Any) -> httpx.Response:
    body: Dict[str, Any] = {"grant_type": "mytoken", "mytoken": mytoken}
    body.update(fields)
    return client.post("/api/v0/token/my", json=body)


def decode_unverified(token: str) -> Dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def is_live(srv: DevServer, mytoken: str) -> bool:
    """Whether the dev server still takes ``mytoken`` (not revoked, not rotated away)."""
    from jobtoken._errors import UsageError

    try:
        return bool(srv.introspect(mytoken)["valid"])
    except UsageError:  # the dev server refuses revoked and superseded mytokens
        return False

"""Embedded Mytoken API v0 server and WLCG token issuer, for development and tests only.

It speaks the real Mytoken wire protocol (discovery, ``/api/v0/token/access``,
``/api/v0/token/my``, ``/api/v0/token/revoke``, ``/api/v0/tokeninfo``) on loopback and
acts as the OP that signs WLCG-profile access tokens (``<url>/op``). Faults can be
injected per endpoint. See docs/devserver.md.

Must NOT: be deployed as a real service; it binds loopback unless forced, keeps state in
memory and signs with throwaway keys.
"""

from __future__ import annotations

import logging

from ._config import DevServerConfig
from ._faults import ENDPOINTS, Fault, FaultSet
from ._issuer import TOKEN_FAULTS
from ._server import DevServer, RequestRecord

__all__ = [
    "ENDPOINTS",
    "TOKEN_FAULTS",
    "DevServer",
    "DevServerConfig",
    "Fault",
    "FaultSet",
    "RequestRecord",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

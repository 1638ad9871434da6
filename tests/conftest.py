"""Shared fixtures: a clean environment for every test (no token leaks in from the host)."""

from __future__ import annotations

import os

import pytest

_STRIP_PREFIXES = ("BEARER_TOKEN", "MYTOKEN", "JOBTOKEN", "_CONDOR_", "SSL_CERT", "X509_")
_STRIP_EXACT = ("XDG_RUNTIME_DIR", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_STRIP_PREFIXES) or name in _STRIP_EXACT:
            monkeypatch.delenv(name, raising=False)

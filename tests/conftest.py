"""Shared fixtures: a clean environment for every test (no token leaks in from the host)
and package loggers put back as they were."""

from __future__ import annotations

import logging
import os
from typing import Iterator

import pytest
from hypothesis import settings

# The suite's property and fuzz tests draw the same cases every run, so CI is reproducible;
# JOBTOKEN_LONG_TESTS=1 explores fresh random cases (and more of them, in tests/robustness).
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile("explore" if os.environ.get("JOBTOKEN_LONG_TESTS") else "reproducible")

_STRIP_PREFIXES = ("BEARER_TOKEN", "MYTOKEN", "JOBTOKEN", "_CONDOR_", "SSL_CERT", "X509_")
_STRIP_EXACT = ("XDG_RUNTIME_DIR", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_STRIP_PREFIXES) or name in _STRIP_EXACT:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def fresh_discovery_cache() -> Iterator[None]:
    """Each test starts as a fresh process would: no Mytoken discovery document remembered.

    The client keeps discovery per process and server URL; a dev server's port can be
    reused by a later test's server, whose endpoints or faults differ.
    """
    from jobtoken._mytoken import clear_discovery_cache

    clear_discovery_cache()
    yield
    clear_discovery_cache()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo what an in-process ``jobtoken`` main did to the package loggers.

    ``cli.main`` points the ``jobtoken`` logger at the sys.stderr of its moment (pytest's
    capture stream, closed after that test) and stops propagation; left in place, later
    tests would log into a closed file and ``caplog`` would see nothing.
    """
    saved = {}
    for name in ("jobtoken", "jobtoken.devserver"):
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate

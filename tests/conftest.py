"""Shared fixtures: a suite independent of how it was started, and of the host.

Before the first test (``pytest_configure``) the run's own process is made neutral: no
inherited ignored or blocked signal reaches the processes the tests start, no host
setting the product reads (``BEARER_TOKEN_FILE``, ``JOBTOKEN_*``, ``XDG_RUNTIME_DIR``,
HTCondor's variables, proxies, CA paths) is in the environment of any fixture, whatever
its scope, and a closed stdin is /dev/null. Each test then gets that clean environment
again (``clean_environ``) and the package loggers as they were (``restore_logging``).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from hypothesis import settings

from tests.suiteoptions import LONG  # before pytest_configure strips JOBTOKEN_*

# The suite's property and fuzz tests draw the same cases every run, so CI is reproducible;
# JOBTOKEN_LONG_TESTS=1 explores fresh random cases (and more of them, in tests/robustness).
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile("explore" if LONG else "reproducible")

# Signals a test may send to a process it started (payloads, wrappers, servers).
_TEST_SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM")


def _ignore_here(signum: int, frame: object) -> None:
    """Stands in for SIG_IGN in pytest itself; unlike SIG_IGN it is not inherited."""


def reset_inherited_signal_dispositions() -> List[str]:
    """Make every child the suite starts begin with default signal handling.

    An ignored signal (SIG_IGN) survives fork and exec, and a blocked one stays blocked:
    a suite started under ``nohup`` (HUP ignored), from a non-interactive shell with
    ``&`` (INT and QUIT ignored) or by a runner that blocks signals would hand that to
    every payload and wrapper it starts, and the signal tests would wait for signals
    that can never arrive. A caught signal is reset to SIG_DFL by exec, so pytest keeps
    ignoring what it was told to ignore (through a handler that does nothing) while its
    children start clean. Returns the names it changed.
    """
    changed = []
    for name in _TEST_SIGNALS:
        signum = getattr(signal, name)
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _ignore_here)
            changed.append(name)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        changed.extend(f"unblocked {signal.Signals(s).name}" for s in sorted(blocked))
    return changed


_STRIP_PREFIXES = ("BEARER_TOKEN", "MYTOKEN", "JOBTOKEN", "_CONDOR_", "CONDOR_", "SSL_CERT",
                   "X509_")
_STRIP_EXACT = ("XDG_RUNTIME_DIR", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


def host_settings() -> List[str]:
    """Names of the environment variables the product (or its libraries) would read from
    the host: token discovery, jobtoken's settings, HTCondor's, proxies and CA paths."""
    return [name for name in os.environ
            if name.startswith(_STRIP_PREFIXES) or name in _STRIP_EXACT]


def neutral_standard_streams() -> List[int]:
    """Open /dev/null on any of fds 0-2 the run was started without (``<&-``).

    A closed descriptor is handed to every child as closed, and the next file or pipe the
    run opens would take its number: a child's "stdin" would then be some other file.
    Returns the descriptors it opened.
    """
    opened = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)  # inheritable, as dup2 makes it
                os.close(null)
            else:
                os.set_inheritable(fd, True)  # os.open's descriptors are not (PEP 446)
            opened.append(fd)
    return opened


def pytest_configure(config: pytest.Config) -> None:
    # before any test or fixture (of any scope) or plugin thread starts a process
    reset_inherited_signal_dispositions()
    neutral_standard_streams()
    for name in host_settings():
        del os.environ[name]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a test before this one put into the environment is gone again."""
    for name in host_settings():
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


@pytest.fixture(scope="session")
def jobtoken_debs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """jobtoken's Debian packages built from this checkout, once per session: the real
    HTCondor and ARC tests and tests/test_packages.py install them ({name: .deb})."""
    import shutil

    from tests.debpackages import build_debs
    from tests.prerequisites import need

    for tool in ("dpkg-buildpackage", "dh"):
        need(shutil.which(tool), f"building the Debian package needs {tool} "
                                 "(.ci/install-packaging.sh)")
    return build_debs(tmp_path_factory.mktemp("debs"))

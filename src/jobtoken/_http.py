"""Shared construction of httpx clients: TLS trust, the http-only-on-loopback rule,
timeouts, proxies, User-Agent; plus the translation of httpx exceptions into jobtoken
errors, so no caller ever sees an ``httpx`` exception.

Choices (documented for site admins):

* **Trust store.** TLS is always verified. Explicit ``ca_file``/``ca_dir`` are the *only*
  trust anchors when given. Otherwise ``SSL_CERT_FILE``/``SSL_CERT_DIR`` replace the
  defaults (OpenSSL's own convention). Otherwise the *system* store
  (``ssl.create_default_context()``, not httpx's certifi bundle, so site and distribution
  CAs work), **plus** ``X509_CERT_DIR`` when set: grid CA directories usually hold only
  IGTF CAs, while a Mytoken server typically has a public web certificate, so the grid
  directory extends the system store instead of replacing it.
* **Plain http** only when the caller allows it *and* the host is loopback
  (127.0.0.0/8, ::1, localhost): a mytoken must never cross a network in clear.
* **Redirects** are never followed (a redirect could carry a POSTed mytoken elsewhere).
* **Proxies.** ``trust_env=False``: httpx reads no environment at all. We honour only
  ``https_proxy``/``HTTPS_PROXY`` (with ``no_proxy``/``NO_PROXY``), only for ``https://``
  targets, never for loopback and never when a transport is injected. Through such a
  proxy the request travels inside a CONNECT tunnel, so the proxy never sees a token;
  sites (HPC centres mostly) whose worker nodes reach the outside only via a proxy set
  exactly this variable. ``http_proxy``/``all_proxy`` are ignored on purpose.
* **Retries.** None at the transport level; the renewal policy owns retries.

This module must NOT send requests, read tokens, or log anything secret.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import os
import ssl
import urllib.request
from typing import Mapping, Optional

import httpx

from . import __version__
from ._config import setting
from ._errors import ConfigError, JobtokenError, ProtocolError, ServerUnavailableError

__all__ = [
    "DEFAULT_USER_AGENT",
    "http_client",
    "create_ssl_context",
    "is_loopback_host",
    "parse_retry_after",
    "proxy_for",
    "translate_http_error",
    "url_problem",
]

logger = logging.getLogger(__name__)


# a constant, not importlib.metadata: that lookup costs ~10 ms on every renewal
DEFAULT_USER_AGENT = f"jobtoken/{__version__}"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, IPv6 without brackets) is loopback."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        return bool(mapped.is_loopback)
    return bool(address.is_loopback)


def url_problem(url: str, *, allow_http: bool) -> Optional[str]:
    """Why ``url`` must not be used to send a secret, or None if it is fine.

    Pure. ``https://`` with a host is fine; ``http://`` only if ``allow_http`` and the
    host is loopback; anything else is refused.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "not a valid URL"
    if not parsed.host:
        return "URL has no host"
    if parsed.scheme == "https":
        return None
    if parsed.scheme == "http":
        if not allow_http:
            return ("plain http is not allowed (use https; for a loopback test server "
                    f"set {setting('server.allow_http')})")
        if not is_loopback_host(parsed.host):
            return "plain http is allowed only to a loopback address (127.0.0.0/8, ::1, localhost)"
        return None
    return f"unsupported URL scheme {parsed.scheme!r} (use https)"


def create_ssl_context(
    *,
    ca_file: Optional[str] = None,
    ca_dir: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> ssl.SSLContext:
    """A verifying client TLS context built by the trust rules in the module docstring.

    Raises:
        ConfigError: a given CA file/directory does not exist or cannot be loaded.
    """
    env = os.environ if environ is None else environ
    if ca_file or ca_dir:
        return _context_from(ca_file, ca_dir, origin="server.ca_file/ca_dir, --ca-file/--ca-dir")
    env_file = env.get("SSL_CERT_FILE") or None
    env_dir = env.get("SSL_CERT_DIR") or None
    if env_file or env_dir:
        return _context_from(env_file, env_dir, origin="SSL_CERT_FILE/SSL_CERT_DIR")
    context = ssl.create_default_context()
    grid_dir = env.get("X509_CERT_DIR") or None
    if grid_dir:
        if not os.path.isdir(grid_dir):
            raise ConfigError(f"CA directory from X509_CERT_DIR not found: {grid_dir}")
        try:
            context.load_verify_locations(capath=grid_dir)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use CA directory {grid_dir}: {exc}") from exc
    return context


def _context_from(ca_file: Optional[str], ca_dir: Optional[str], *, origin: str) -> ssl.SSLContext:
    if ca_file and not os.path.isfile(ca_file):
        raise ConfigError(f"CA file ({origin}) not found: {ca_file}")
    if ca_dir and not os.path.isdir(ca_dir):
        raise ConfigError(f"CA directory ({origin}) not found: {ca_dir}")
    try:
        return ssl.create_default_context(cafile=ca_file, capath=ca_dir)
    except (OSError, ssl.SSLError) as exc:
        where = ca_file or ca_dir
        raise ConfigError(f"cannot load CA certificates ({origin}) from {where}: {exc}") from exc


def proxy_for(url: str) -> Optional[str]:
    """The proxy to use for ``url`` per the module's proxy rule, or None.

    Raises:
        ConfigError: the proxy variable holds something other than an http(s) URL.
    """
    parsed = httpx.URL(url)
    if parsed.scheme != "https" or is_loopback_host(parsed.host):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get("https")
    if not proxy:
        return None
    # undocumented but in every CPython 3 (the ``no_proxy`` rule urllib itself applies);
    # typeshed leaves it out
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if bypass(parsed.host, proxies):
        return None
    if not proxy.startswith(("http://", "https://")):
        raise ConfigError(f"unsupported https_proxy {proxy!r} (need an http:// or https:// URL)")
    return proxy


def http_client(
    base_url: str,
    *,
    timeout_s: float,
    ca_file: Optional[str] = None,
    ca_dir: Optional[str] = None,
    allow_http: bool = False,
    transport: Optional[httpx.BaseTransport] = None,
    user_agent: Optional[str] = None,
) -> httpx.Client:
    """An ``httpx.Client`` for ``base_url`` that follows the module's rules.

    Raises:
        ConfigError: bad URL, http to a non-loopback host, bad timeout, bad CA option,
            bad proxy variable.
    """
    problem = url_problem(base_url, allow_http=allow_http)
    if problem:
        raise ConfigError(f"refusing server URL {base_url}: {problem}")
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ConfigError(
            f"{setting('server.timeout_s')} must be a positive number of seconds, "
            f"got {timeout_s!r}"
        )
    context = create_ssl_context(ca_file=ca_file, ca_dir=ca_dir)
    proxy = None if transport is not None else proxy_for(base_url)
    if proxy:
        logger.debug("http proxy url=%s proxy=%s", base_url, httpx.URL(proxy).host)
        # A transport (not Client(proxy=...)) keeps this working on httpx < 0.26.
        transport = httpx.HTTPTransport(verify=context, proxy=httpx.Proxy(proxy), retries=0)
    return httpx.Client(
        base_url=base_url,
        verify=context,
        timeout=httpx.Timeout(float(timeout_s)),
        follow_redirects=False,
        trust_env=False,
        transport=transport,
        headers={"User-Agent": user_agent or DEFAULT_USER_AGENT, "Accept": "application/json"},
    )


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date).

    Pure: ``now`` is the current wall-clock time. Returns None for a missing or unreadable
    header and never a negative number.
    """
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 7231 dates are GMT
        return None
    return max(0.0, when.timestamp() - now)


def _is_tls_verification_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def translate_http_error(exc: httpx.HTTPError, *, url: str, action: str) -> JobtokenError:
    """The jobtoken error for an httpx exception raised while doing ``action`` at ``url``.

    Timeouts, refused/reset connections and other transport failures are transient
    (``ServerUnavailableError``). A failed TLS certificate verification is *not*: retrying
    cannot fix a wrong trust store or a forged/expired server certificate, so it is a
    ``ConfigError`` naming the CA options. Undecodable bodies are ``ProtocolError``.
    """
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ServerUnavailableError(f"{action} failed at {url}: timed out ({name})", url=url)
    if isinstance(exc, httpx.ConnectError) and _is_tls_verification_failure(exc):
        return ConfigError(
            f"{action} failed at {url}: TLS certificate verification failed "
            "(check ca_file/ca_dir, SSL_CERT_FILE, X509_CERT_DIR)",
            retryable=False,
        )
    if isinstance(exc, httpx.DecodingError):
        return ProtocolError(f"{action} failed at {url}: undecodable response body", url=url)
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return ConfigError(f"{action} failed at {url}: {name}")
    reason = str(exc).splitlines()[0] if str(exc) else name
    return ServerUnavailableError(f"{action} failed at {url}: {reason[:200]}", url=url)

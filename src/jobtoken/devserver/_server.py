"""The dev server process side: sockets, threads, rate limit, faults, request log.

``DevServer`` runs a ``ThreadingHTTPServer`` in a daemon thread and wires the Mytoken API
(``_handlers``) to it. It also gives tests a Python API: issue the parent mytoken (there is
no browser login), revoke everything, introspect, read the request log, inject faults.

Must NOT: log or record token strings, bind a non-loopback address unless told to, or print.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from .._clock import Clock, SystemClock
from .._errors import ConfigError, UsageError
from ._config import DevServerConfig
from ._faults import Fault, FaultSet
from ._handlers import MytokenApi
from ._issuer import AccessTokenIssuer
from ._keys import new_signing_key
from ._ratelimit import RateLimiter
from ._responses import Request, Response, error_body, json_response, status_text
from ._restrictions import parse_restrictions, replace_this
from ._state import MytokenStore, Rotation
from ._tls import TlsMaterial, make_tls

__all__ = ["DevServer", "RequestRecord"]

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20
DEFAULT_CAPABILITIES = ("AT", "create_mytoken", "tokeninfo")
GARBAGE_BODY = b"<html><body>502 upstream hiccup \x00\xff</body>"


@dataclass(frozen=True)
class RequestRecord:
    """One served request, as tests see it. Holds no token, body or query string."""

    time: float
    method: str
    path: str
    endpoint: str
    status: int  # 0 when the connection was dropped without an answer
    client_ip: str
    fault_id: Optional[int] = None


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; the library never prints.
        logger.debug("connection error client=%s", client_address[0], exc_info=True)

    def __init__(
        self,
        address: Tuple[str, int],
        owner: DevServer,
        family: int,
        ssl_context: Optional[ssl.SSLContext],
    ) -> None:
        self.address_family = family
        self.owner = owner
        self.ssl_context = ssl_context
        super().__init__(address, _RequestHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshakes happen here, in the per-connection thread, never in the accept loop.
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            request.settimeout(10)
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            logger.debug("tls handshake failed client=%s error=%s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class _RequestHandler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"
    timeout = 30
    server_version = "jobtoken-devserver"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        # The stdlib writes to stderr; route through logging (request lines carry no tokens).
        logger.debug("http %s", format % args)

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._write(Response(413 if length > 0 else 400, b"bad Content-Length"))
            return
        body = self.rfile.read(length) if length > 0 else b""
        split = urlsplit(self.path)
        req = Request(
            method=self.command,
            path=split.path or "/",
            query=split.query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            client_ip=self.client_address[0],
        )
        self.server.owner._dispatch(req, self)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve  # noqa: N815

    def _write(self, resp: Response, extra: Tuple[Tuple[str, str], ...] = ()) -> None:
        self.send_response(resp.status)
        for name, value in resp.headers + extra:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if resp.body and self.command != "HEAD":
            self.wfile.write(resp.body)
        self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DevServer:
    """A loopback Mytoken server + token issuer for development and tests.

    Usage::

        with DevServer(DevServerConfig(op_scopes=("storage.create:/vo",))) as srv:
            mt = srv.issue_mytoken(capabilities=["AT", "create_mytoken"])
            srv.faults.add("access", status=503, count=2)
    """

    def __init__(
        self, config: Optional[DevServerConfig] = None, *, clock: Optional[Clock] = None
    ) -> None:
        self.config = config or DevServerConfig()
        self.config.validate()
        self.clock: Clock = clock or SystemClock()
        self.faults = FaultSet(self.clock.now)
        # the HTTP control API answers only its owner: whoever knows this secret (the CLI
        # keeps it in a 0600 file for `jobtoken devserver fault`), not every local user
        self.control_token = secrets.token_urlsafe(32)
        self._limiter = (
            RateLimiter(self.config.rate_limit[0], self.config.rate_limit[1], self.clock.monotonic)
            if self.config.rate_limit
            else None
        )
        self._mt_key = new_signing_key(self.config.mt_alg, "mytoken", fresh=self.config.fresh_keys)
        self._op_key = new_signing_key(self.config.at_alg, "op", fresh=self.config.fresh_keys)
        self._log: List[RequestRecord] = []
        self._log_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: Optional[_HttpServer] = None
        self._thread: Optional[threading.Thread] = None
        self._tls: Optional[TlsMaterial] = None
        self._api: Optional[MytokenApi] = None
        self._issuer: Optional[AccessTokenIssuer] = None
        self.url = ""
        self.op_issuer = ""
        self.port = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> DevServer:
        """Bind, build the API for the bound URL and serve in a daemon thread.

        Raises:
            ConfigError: the address cannot be bound or TLS material cannot be made.
            UsageError: already started.
        """
        if self._httpd is not None:
            raise UsageError("devserver already started")
        self._stopping.clear()
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self.config.tls_dir:
            self._tls = make_tls(self.config.tls_dir, [host, *self.config.extra_san])
        try:
            httpd = _HttpServer(
                (host.strip("[]"), self.config.port),
                self,
                family,
                self._tls.context if self._tls else None,
            )
        except OSError as exc:
            raise ConfigError(
                f"devserver cannot bind {host}:{self.config.port}: {exc.strerror or exc}"
            ) from exc
        self.port = int(httpd.server_address[1])
        scheme = "https" if self._tls else "http"
        url_host = f"[{host.strip('[]')}]" if ":" in host else host
        self.url = f"{scheme}://{url_host}:{self.port}"
        self.op_issuer = self.url + "/op"
        self._store = MytokenStore(
            key=self._mt_key,
            issuer=self.url,
            oidc_issuer=self.op_issuer,
            short_token_len=self.config.short_token_len,
        )
        self._issuer = AccessTokenIssuer(
            key=self._op_key,
            issuer=self.op_issuer,
            subject=self.config.subject,
            allowed_scopes=self.config.op_scopes,
            default_audience=self.config.default_audience,
            lifetime_s=self.config.at_lifetime_s,
            client_id=self.config.client_id,
        )
        self._api = MytokenApi(
            config=self.config,
            base_url=self.url,
            store=self._store,
            mt_key=self._mt_key,
            issuer=self._issuer,
            now=self.clock.now,
            add_fault=self.faults.add_from_json,
            clear_faults=self.faults.clear,
        )
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"devserver-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("devserver listening url=%s tls=%s", self.url, bool(self._tls))
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving; in-flight delayed requests are released at once."""
        self._stopping.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
        logger.info("devserver stopped url=%s", self.url)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ca_file(self) -> Optional[str]:
        """Path of ``ca.pem`` when serving HTTPS, else None."""
        return self._tls.ca_file if self._tls else None

    @property
    def discovery(self) -> Dict[str, Any]:
        return self._require_api().discovery_document()

    def _require_api(self) -> MytokenApi:
        if self._api is None:
            raise UsageError("devserver not started")
        return self._api

    # --- Python API for tests and the CLI ----------------------------------------------------

    def issue_mytoken(
        self,
        capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
        restrictions: Optional[Sequence[Mapping[str, Any]]] = None,
        rotation: Optional[Mapping[str, Any]] = None,
        name: str = "devserver parent",
        response_type: str = "token",
    ) -> str:
        """Issue a parent mytoken for the configured subject, as an OIDC flow would.

        Raises:
            UsageError: not started, or malformed restrictions/rotation/response_type.
        """
        self._require_api()
        if response_type not in ("token", "short_token"):
            raise UsageError(f"response_type={response_type} unsupported; use token/short_token")
        try:
            entries = replace_this(parse_restrictions(list(restrictions or [])), "127.0.0.1")
            rot = Rotation.from_json(dict(rotation) if rotation is not None else None)
        except ValueError as exc:
            raise UsageError(f"devserver issue_mytoken: {exc}") from exc
        record = self._store.create(
            oidc_sub=self.config.subject,
            restrictions=entries,
            capabilities=list(capabilities),
            rotation=rot,
            name=name,
            now=self.clock.now(),
        )
        token, _ = self._store.represent(record, response_type)
        return token

    def introspect(self, mytoken: str) -> Dict[str, Any]:
        """The tokeninfo ``introspect`` body for a mytoken, without capability checks.

        Raises:
            UsageError: the token is unknown, invalid or revoked (message carries the API error).
        """
        from ._responses import ApiError

        try:
            token_jwt, token_type = self._store.resolve(mytoken)
            record = self._store.authenticate(token_jwt, self.clock.now())
        except ApiError as exc:
            raise UsageError(f"devserver introspect: {exc.status} {exc.error}") from None
        return self._store.introspection(record, token_type)

    def set_at_lifetime(self, seconds: int) -> None:
        """Mint the access tokens of later requests with this lifetime.

        Why: a test that needs "the next token lives longer than the current one" (ensure
        must renew, and the renewed token must meet ``--min-valid``) can make that so
        instead of hoping the machine is fast enough between two equal-length tokens.

        Raises:
            UsageError: not started, or ``seconds`` < 1.
        """
        self._require_api()
        if seconds < 1 or self._issuer is None:
            raise UsageError(f"devserver at_lifetime_s={seconds} must be >= 1")
        self._issuer.lifetime_s = int(seconds)

    def revoke_all(self) -> int:
        """Revoke every mytoken issued so far; returns how many were still live."""
        return self._store.revoke_all()

    def requests(self, endpoint: Optional[str] = None) -> Tuple[RequestRecord, ...]:
        """The request log (optionally for one endpoint name), oldest first."""
        with self._log_lock:
            return tuple(r for r in self._log if endpoint is None or r.endpoint == endpoint)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    # --- request pipeline -------------------------------------------------------------------

    def _record(
        self, req: Request, endpoint: str, status: int, fault: Optional[Fault] = None
    ) -> None:
        rec = RequestRecord(
            time=self.clock.now(),
            method=req.method,
            path=req.path,
            endpoint=endpoint,
            status=status,
            client_ip=req.client_ip,
            fault_id=fault.id if fault else None,
        )
        with self._log_lock:
            self._log.append(rec)

    @staticmethod
    def _call(
        api: MytokenApi, fn: Any, req: Request, endpoint: str, token_fault: Optional[str]
    ) -> Response:
        try:
            return api.call(fn, req, token_fault)
        except Exception:  # a dev server bug: answer 500 and log it loudly, keep serving
            logger.exception("devserver handler failed endpoint=%s", endpoint)
            return json_response(500, error_body("internal_server_error", "dev server bug"))

    def _dispatch(self, req: Request, handler: _RequestHandler) -> None:
        api = self._require_api()
        endpoint, fn, early = api.route(req.method, req.path)
        rate_headers: Tuple[Tuple[str, str], ...] = ()
        if endpoint == "control":
            if not _is_loopback_ip(req.client_ip):
                early = json_response(403, error_body("Forbidden", "control API is loopback only"))
            elif not hmac.compare_digest(
                req.header("authorization").encode(), f"Bearer {self.control_token}".encode()
            ):
                early = json_response(
                    403,
                    error_body(
                        "Forbidden",
                        "control API needs the owner's secret (jobtoken devserver fault reads "
                        "it from the server's control file)",
                    ),
                )
        elif self._limiter is not None:
            decision = self._limiter.hit(req.client_ip)
            rate_headers = (
                ("X-RateLimit-Limit", str(decision.limit)),
                ("X-RateLimit-Remaining", str(decision.remaining)),
                ("X-RateLimit-Reset", str(decision.reset_s)),
            )
            if not decision.allowed:
                early = Response(
                    429,
                    b"Too Many Requests",
                    (
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Retry-After", str(decision.reset_s)),
                    ),
                )
        if early is not None or fn is None:
            resp = early if early is not None else Response(500)
            self._record(req, endpoint, resp.status)
            handler._write(resp, rate_headers)
            return
        fault = self.faults.take(endpoint) if endpoint != "control" else None
        if fault is not None and fault.delay_s > 0:
            self._stopping.wait(fault.delay_s)
        if fault is not None and fault.replaces_response:
            if fault.process:
                self._call(api, fn, req, endpoint, fault.token)
            if fault.drop:
                self._record(req, endpoint, 0, fault)
                handler._drop()
                return
            resp = _fault_response(fault)
        else:
            resp = self._call(api, fn, req, endpoint, fault.token if fault else None)
        self._record(req, endpoint, resp.status, fault)
        handler._write(resp, rate_headers)


def _is_loopback_ip(ip: str) -> bool:
    import ipaddress

    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _fault_response(fault: Fault) -> Response:
    status = fault.status if fault.status is not None else (400 if fault.error else 200)
    headers: Tuple[Tuple[str, str], ...] = ()
    if fault.retry_after_s is not None:
        headers += (("Retry-After", str(int(round(fault.retry_after_s)))),)
    if fault.garbage:
        return Response(status, GARBAGE_BODY, (("Content-Type", "application/json"),) + headers)
    if fault.body is not None:
        body: Union[str, bytes] = fault.body
        ctype = "application/json" if fault.body[:1] in ("{", "[") else "text/plain; charset=utf-8"
        return Response(status, str(body).encode(), (("Content-Type", ctype),) + headers)
    if fault.error is not None:
        resp = json_response(
            status, error_body(fault.error, fault.error_description or ""), headers
        )
        return resp
    if status == 429:
        return Response(
            429, b"Too Many Requests", (("Content-Type", "text/plain; charset=utf-8"),) + headers
        )
    return json_response(status, error_body(status_text(status), "injected fault"), headers)

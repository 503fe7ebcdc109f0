"""A scripted HTTPS server for MTA-STS policies (RFC 8461) in tests and the sandbox.

``start_policy_server(host, tls, policies)`` serves
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` for every domain in
``policies`` from one address (the client picks the policy by its Host
header, as a virtual-hosting web server does).  ``tls`` is the server's
``ssl.SSLContext`` (``mxq.sandbox.smtpd.make_tls(...).server_context``, or
one made with ``issue_context`` for a certificate of other names).

``policies`` maps a domain to a ``Reply`` or to a policy text (a 200
``text/plain`` reply)::

    Reply(body="version: STSv1\\nmode: enforce\\nmx: mx.a.test\\nmax_age: 86400\\n",
          status=200,                   # e.g. 404, 500, 301 (with location=...)
          content_type="text/plain",    # e.g. "text/html" for a wrong media type
          location=None,                # a Location header (for a redirect)
          delay=0.0,                    # seconds before the response starts
          trickle=None,                 # seconds between 1-byte writes of the body
          trickle_headers=None,         # seconds between 1-byte writes of the status line and headers
          truncate=None)                # send only this many body bytes (Content-Length says all), then close

``PolicyServer`` (also a context manager): ``.host``, ``.port``,
``.requests`` (a list of ``(host header, path)`` seen, thread-safe copy),
``.set(domain, reply_or_text)``, ``.stop()``.  It is ready (listening, TLS
included) when ``start_policy_server`` returns.

``policy_text(mode, *mx, max_age=86400)`` builds a policy body.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import socket

__all__ = ["Reply", "PolicyServer", "start_policy_server", "policy_text", "issue_context"]

WELL_KNOWN = "/.well-known/mta-sts.txt"


@dataclass
class Reply:
    """One scripted response (see the module docstring)."""

    body: str | bytes = ""
    status: int = 200
    content_type: str | None = "text/plain"
    location: str | None = None
    delay: float = 0.0
    trickle: float | None = None
    trickle_headers: float | None = None
    truncate: int | None = None


def policy_text(mode: str, *mx: str, max_age: int = 86400, eol: str = "\r\n") -> str:
    """An RFC 8461 policy body: version, mode, an ``mx:`` line per pattern, max_age."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return eol.join(lines) + eol


def issue_context(ca, *names: str) -> ssl.SSLContext:
    """A server context with a certificate for ``names`` issued by trustme ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


class _Handler(BaseHTTPRequestHandler):
    server_version = "mxq-sandbox-https"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):   # quiet
        pass

    def do_GET(self):  # noqa: N802 -- http.server's name
        srv: PolicyServer = self.server.owner
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        srv._record(host, self.path)
        reply = srv._reply_for(host, self.path)
        if reply.delay:
            time.sleep(reply.delay)
        body = reply.body.encode("utf-8") if isinstance(reply.body, str) else reply.body
        if reply.trickle_headers:
            head = (f"HTTP/1.1 {reply.status} OK\r\nContent-Type: {reply.content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            try:
                for i in range(len(head)):
                    self.wfile.write(head[i:i + 1])
                    self.wfile.flush()
                    time.sleep(reply.trickle_headers)
                self.wfile.write(body)
            except OSError:
                pass                     # the client gave up (its deadline): fine
            self.close_connection = True
            return
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        if reply.location:
            self.send_header("Location", reply.location)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if reply.trickle:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(reply.trickle)
            elif reply.truncate is not None:
                self.wfile.write(body[:reply.truncate])
            else:
                self.wfile.write(body)
        except OSError:
            pass                         # the client gave up (size or time bound): fine
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner, address, context: ssl.SSLContext):
        self.owner = owner
        self.context = context
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address):
        # The handshake runs in the request's own thread, so a slow client never holds up accept().
        request.settimeout(10)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return                        # a client that rejected our certificate: nothing to serve
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):   # quiet: clients hang up on purpose in tests
        pass


class PolicyServer:
    """HTTPS policy host(s) on ``host:port`` (see the module docstring)."""

    def __init__(self, host: str, tls: ssl.SSLContext, policies: dict | None = None, port: int = 443):
        self._lock = threading.Lock()
        self._policies: dict[str, Reply] = {}
        self._requests: list[tuple[str, str]] = []
        for domain, reply in (policies or {}).items():
            self.set(domain, reply)
        self._server = _Server(self, (host, port), tls)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def set(self, domain: str, reply: Reply | str) -> None:
        """Serve ``reply`` (a ``Reply``, or a policy text) for ``mta-sts.<domain>``."""
        with self._lock:
            self._policies[domain.lower()] = reply if isinstance(reply, Reply) else Reply(reply)

    def _reply_for(self, host: str, path: str) -> Reply:
        if path.split("?")[0] != WELL_KNOWN or not host.startswith("mta-sts."):
            return Reply("not found\n", status=404)
        with self._lock:
            return self._policies.get(host[len("mta-sts."):], Reply("no policy here\n", status=404))

    def _record(self, host: str, path: str) -> None:
        with self._lock:
            self._requests.append((host, path))

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(Host header without port, path)`` of every request so far."""
        with self._lock:
            return list(self._requests)

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> "PolicyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_policy_server(host: str, tls: ssl.SSLContext, policies: dict | None = None,
                        port: int = 443) -> PolicyServer:
    """Start a ``PolicyServer``; it accepts connections when this returns (the socket is bound and listening)."""
    return PolicyServer(host, tls, policies, port)

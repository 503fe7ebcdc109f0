"""A gevent worker process's name resolution: address literals without a trip through a thread.

gevent's default resolver (``thread``) runs every ``getaddrinfo()`` in the
hub's pool of native threads, ``"127.0.0.1"`` included.  redis-py calls it for
every new connection (the host of the Redis URL), and the SMTP session for
every new connection to an exchange (always an address: mxq resolves the
exchanges itself).  In a process busy with hundreds of greenlets a pool thread
then waits for the GIL to hand its answer back -- up to the interpreter's
switch interval each time -- and a new destination's first Redis read and
its first connect waited behind it.  Measured in the bench's loopback stage
(100 new destinations starting at once in each process): a new lane's first
DNS-cache read in Redis took a median 0.107 s with the thread resolver and
0.051 s without the trip for address literals; its connect 0.138 s against
0.076 s.

``install()`` (called when a worker starts) wraps the hub's resolver in
``LiteralsInline``: an address literal (or no host) is answered by the C
``getaddrinfo`` in the calling greenlet -- it asks no DNS and returns at
once -- and every name goes to the resolver gevent chose, as before, so a
slow DNS answer for a host name never blocks the process.  Nothing is changed
in a process without gevent's monkey patching, nor when ``GEVENT_RESOLVER``
is set (the operator chose a resolver).
"""

from __future__ import annotations

import _socket                          # the C module: gevent's patching leaves it alone
import os


def is_literal(host) -> bool:
    """Is ``host`` an IPv4 or IPv6 address literal (a scope ``%id`` allowed), or None?"""
    if host is None:
        return True
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(host, str) or not host:
        return False
    try:
        _socket.inet_pton(_socket.AF_INET, host)
        return True
    except (OSError, ValueError):
        pass
    try:
        _socket.inet_pton(_socket.AF_INET6, host.split("%", 1)[0])
        return True
    except (OSError, ValueError):
        return False


class LiteralsInline:
    """A gevent resolver: ``getaddrinfo`` of an address literal in the caller, the rest by ``inner``."""

    def __init__(self, inner):
        self.inner = inner

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 -- socket's names
        if is_literal(host):
            return _socket.getaddrinfo(host, port, family, type, proto, flags)
        return self.inner.getaddrinfo(host, port, family, type, proto, flags)

    def __getattr__(self, name):            # gethostbyname, getnameinfo, close, ...: as before
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<LiteralsInline over {self.inner!r}>"


def install() -> bool:
    """In a monkey-patched gevent process, with no ``GEVENT_RESOLVER`` set: wrap the hub's
    resolver in ``LiteralsInline``.  Returns whether it did (idempotent)."""
    if os.environ.get("GEVENT_RESOLVER"):
        return False
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return False
    if not monkey.is_module_patched("socket"):
        return False
    hub = get_hub()
    if isinstance(hub.resolver, LiteralsInline):
        return True
    hub.resolver = LiteralsInline(hub.resolver)
    return True


def installed():
    """The resolver ``install()`` wrapped in this process (the one names go to), or None."""
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return None
    if not monkey.is_module_patched("socket"):
        return None                 # (no hub made in a process that does not use gevent)
    resolver = get_hub().resolver
    return resolver.inner if isinstance(resolver, LiteralsInline) else None

"""Test session set-up shared by every test module.

Isolation: when run as root (our machines and CI), the whole test session
moves into a private network namespace before anything else starts, so its
servers on 127.0.0.x:25 cannot clash with the host's and nothing the code
under test does can reach any address but this private loopback.  Set
``MXQ_TEST_NETNS=0`` to run in the host's namespace instead.

Parallel runs (pytest-xdist, ``ops/test`` passes ``-n auto``): every process
that imports this file -- the xdist controller and each worker -- moves into
a network namespace of its own, so two workers' servers on the same
127.0.0.x:25 or 127.0.0.53:53 never meet, and each worker's session fixtures
(the DNS server, Postfix, module servers) are its own.  How many workers
``-n auto`` means, and the ``serial`` marker, are in tests/parallel.py.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

CLONE_NEWNET = 0x40000000


def _enter_private_netns() -> bool:
    """Move this process into a new network namespace with only ``lo`` (up); True if it is in one.

    Once per process: ``MXQ_TEST_NETNS_PID`` names the process that moved.
    A child process inherits the variables but not the decision, so an xdist
    worker (started by a controller that already moved) moves again, into a
    namespace of its own.  ``MXQ_IN_TEST_NETNS=1`` tells test modules and the
    programs the tests start that they are inside such a namespace.
    """
    if os.environ.get("MXQ_TEST_NETNS", "1") == "0" or os.geteuid() != 0:
        return False
    if os.environ.get("MXQ_TEST_NETNS_PID") == str(os.getpid()):   # already moved (re-imported)
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["MXQ_IN_TEST_NETNS"] = "1"
    os.environ["MXQ_TEST_NETNS_PID"] = str(os.getpid())
    return True


IN_PRIVATE_NETNS = _enter_private_netns()

# The code under test must never fall back to the system resolver: point it
# at a server that does not exist until a test starts its own.
os.environ.setdefault("MXQ_DNS_SERVERS", "127.0.0.1:9")
os.environ.setdefault("MXQ_HELO_NAME", "client.mxq.test")
# Every test exchange is on loopback (or an address the test put on the private
# namespace's loopback), which the destination policy refuses by default
# (mxq.workers.destinations); tests/test_destinations.py checks the default itself.
os.environ.setdefault("MXQ_ALLOW_PRIVATE_DESTINATIONS", "1")

# Redis and Postfix fixtures (redis_server, postfix) live in tests/fixtures_infra.py;
# xdist workers and the serial marker in tests/parallel.py.
pytest_plugins = ["tests.fixtures_infra", "tests.parallel"]


# --------------------------------------------------------------------------
# dns_server: one sandbox DNS server process for the whole session.
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory):
    """One real DNS server process (``mxq.sandbox.dns``) shared by the whole session.

    It listens on 127.0.0.53:53 (UDP and TCP) inside the private network
    namespace (on a free 127.0.0.1 port otherwise), starts with an empty zone,
    and ``MXQ_DNS_SERVERS`` points at it while the session runs, so
    ``Settings.from_env()`` and ``mxq.workers.mx`` resolve through it.

    Yields a ``DNSServerProcess``; serve your names with

        dns_server.add({"a.test": {"MX": [[10, "mx1.a.test"]]},
                        "mx1.a.test": {"A": ["127.0.0.2"], "TTL": 60}})

    ``.add(records)`` merges into what is served (a name given again replaces
    its records) and returns once the server answers with them;
    ``.remove(*names)``, ``.update(zones)`` (replace everything: don't, the
    server is shared), ``.queries(name, rtype)`` / ``.stats()`` (query
    counters), ``.address``.  The record format is the zone file format in
    ``mxq/sandbox/dns.py`` (A, AAAA, MX, CNAME, TXT, TTL, SERVFAIL, TIMEOUT).
    The server is shared: use names unique to your test module (for example
    ``<module>.test`` and names under it), and remember resolvers cache answers
    (a fresh ``mxq.workers.mx.Resolver`` per test avoids surprises).
    """
    from mxq.sandbox.dns import start_dns_server

    if IN_PRIVATE_NETNS:
        host, port = "127.0.0.53", 53
    else:
        host, port = "127.0.0.1", 0
    server = start_dns_server({}, host=host, port=port, workdir=tmp_path_factory.mktemp("dns_server"))
    previous = os.environ.get("MXQ_DNS_SERVERS")
    os.environ["MXQ_DNS_SERVERS"] = server.address
    try:
        yield server
    finally:
        if previous is None:
            os.environ.pop("MXQ_DNS_SERVERS", None)
        else:
            os.environ["MXQ_DNS_SERVERS"] = previous
        server.stop()


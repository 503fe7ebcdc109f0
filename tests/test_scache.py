"""Connection reuse across deliveries (``mxq.workers.scache``) and the engine's hooks for the queue
manager (``deliver_domain``'s ``sessions``, ``on_done`` and ``stats``), against scripted aiosmtpd
servers on 127.0.62.x:25 in the test session's private network namespace.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from mxq.sandbox.smtpd import Behaviour, ScriptedSMTP, start_server
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, RunStats, deliver_domain, route_key
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.scache import Connection, ReuseLimits, SessionCache, View
from mxq.workers.timeouts import Timeouts

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
pytestmark = pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (port 25 on 127.0.62.x)")

IP = "127.0.62."
FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=3, data_final=3)
SETTINGS = Settings(helo_name="client.scache.test", dns_servers=parse_dns_servers("127.0.0.1:9"), timeouts=FAST)


class Sessions:
    """Connections a server saw, with the QUITs."""

    def __init__(self):
        self.lock = threading.Lock()
        self.opened = 0
        self.open = 0

    def protocol(self):
        counter = self

        class Counted(ScriptedSMTP):
            def connection_made(self, transport):
                first = self.transport is None
                super().connection_made(transport)
                if first and not self.readiness:
                    with counter.lock:
                        counter.opened += 1
                        counter.open += 1

            def connection_lost(self, exc):
                if not self.readiness:
                    with counter.lock:
                        counter.open -= 1
                super().connection_lost(exc)

        return Counted


@pytest.fixture
def server():
    made = []

    def start(last: int, **behaviour):
        counter = Sessions()
        srv = start_server(IP + str(last), 25, Behaviour(hostname=f"mx{last}.scache.test", **behaviour),
                           protocol=counter.protocol())
        srv.counter = counter
        made.append(srv)
        return srv

    yield start
    for s in made:
        s.stop()


def envelopes(domain: str, n: int, start: int = 0) -> list[Envelope]:
    return [Envelope(sender="a@src.test", recipients=[Recipient(f"u{start + i}@{domain}")],
                     content=f"Subject: m{start + i}\r\n\r\nhello {start + i}\r\n".encode()) for i in range(n)]


def deliver(domain, envs, **kw):
    return deliver_domain(domain, envs, settings=SETTINGS, resolver=Resolver(SETTINGS),
                          host_status=kw.pop("host_status", MemoryHostStatus()), **kw)


def test_a_cached_connection_carries_the_next_delivery_and_closes_when_idle(server):
    srv = server(1, keep_content=False)
    cache = SessionCache(ReuseLimits(idle=0.5, time=60, count=100))
    d = f"[{IP}1]"
    for k in range(3):
        stats = RunStats()
        results = deliver(d, envelopes(d, 2, 2 * k), sessions=View(cache), stats=stats)
        assert all(r.state is State.DELIVERED for rs in results for r in rs)
        assert (stats.connects, stats.reused, stats.transactions) == ((1, 0, 2) if k == 0 else (0, 1, 2))
    assert srv.counter.opened == 1 and len(cache) == 1 and cache.hits == 2
    # idle past the limit: the reaper closes it with QUIT
    deadline = time.monotonic() + 5
    while srv.counter.open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.counter.open == 0 and len(cache) == 0 and srv.stats["quit"] == 1


def test_an_exchange_marked_down_keeps_its_open_connection_but_gets_no_new_one(server):
    # Another worker marked the exchange down (say, its connects timed out there): this process's
    # open connection, which the server keeps answering, still carries the next delivery, and the
    # shared down-list is not read for it; with no connection at hand the exchange is skipped.
    srv = server(5, keep_content=False)
    cache = SessionCache(ReuseLimits(idle=30, time=60, count=100))
    d = f"[{IP}5]"

    class Counting(MemoryHostStatus):
        reads = 0

        def is_down(self, ip, port):
            Counting.reads += 1
            return super().is_down(ip, port)

    hosts = Counting()
    assert deliver(d, envelopes(d, 1), sessions=View(cache), host_status=hosts)[0][0].state is State.DELIVERED
    assert Counting.reads == 1                       # the new connection asked first
    hosts.mark_down(IP + "5", 25, 60, "connect timed out (another worker)")
    stats = RunStats()
    results = deliver(d, envelopes(d, 1, 1), sessions=View(cache), stats=stats, host_status=hosts)
    assert results[0][0].state is State.DELIVERED and (stats.reused, stats.connects) == (1, 0)
    assert Counting.reads == 1 and srv.counter.opened == 1 and len(srv.messages) == 2
    cache.close_all()
    stats = RunStats()
    results = deliver(d, envelopes(d, 1, 2), sessions=View(cache), stats=stats, host_status=hosts)
    assert results[0][0].state is State.DEFERRED and "is marked down" in results[0][0].text
    assert Counting.reads == 2 and stats.connects == 0 and srv.counter.opened == 1 and len(srv.messages) == 2


def test_a_connection_is_replaced_at_its_transaction_limit(server):
    srv = server(2, keep_content=False)
    cache = SessionCache(ReuseLimits(idle=5, time=60, count=2))
    d = f"[{IP}2]"
    stats = RunStats()
    results = deliver(d, envelopes(d, 5), sessions=View(cache), stats=stats)
    assert all(rs[0].state is State.DELIVERED for rs in results) and len(srv.messages) == 5
    assert srv.counter.opened == 3 and stats.connects == 3      # 2 + 2 + 1 transactions
    assert len(cache) == 1                                        # the last one, with room left
    cache.close_all()


def test_a_cached_connection_the_server_closed_is_not_used(server):
    srv = server(3, keep_content=False, idle_timeout=0.3)       # the server hangs up after 0.3 s idle
    cache = SessionCache(ReuseLimits(idle=30, time=60, count=100))
    d = f"[{IP}3]"
    deliver(d, envelopes(d, 1), sessions=View(cache))
    assert len(cache) == 1
    deadline = time.monotonic() + 5
    while srv.counter.open and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = RunStats()
    results = deliver(d, envelopes(d, 1, 1), sessions=View(cache), stats=stats)
    assert results[0][0].state is State.DELIVERED
    assert (stats.connects, stats.reused, stats.connect_failures) == (1, 0, 0) and srv.counter.opened == 2
    cache.close_all()


def test_a_cached_connection_lost_on_its_first_command_is_replaced_not_failed(server):
    srv = server(4, keep_content=False)
    d = f"[{IP}4]"
    cache = SessionCache(ReuseLimits(idle=30, time=60, count=100))
    deliver(d, envelopes(d, 1), sessions=View(cache))
    (stale,) = [c for stack in cache._idle.values() for c in stack]
    stale.session._smtp.sock.shutdown(socket.SHUT_RDWR)      # gone under our feet, after the liveness check

    class Blind:
        """A cache view that hands the dead connection out unchecked."""
        limits = cache.limits

        def take(self, key):
            return stale if key == stale.key else None

        def give(self, conn):
            return False

    host_status = MemoryHostStatus()
    stats = RunStats()
    results = deliver(d, envelopes(d, 1, 1), sessions=Blind(), stats=stats, host_status=host_status)
    assert results[0][0].state is State.DELIVERED and results[0][0].attempts == 1
    assert (stats.reused, stats.connects, stats.connect_failures) == (1, 1, 0)
    assert not host_status.is_down(IP + "4", 25)            # not the server's fault
    assert len(srv.messages) == 2


def test_domains_sharing_an_exchange_share_its_connections_unless_a_certificate_check_differs():
    from mxq.workers.delivery import _Route
    r1, r2 = _Route("mx.a.test", "192.0.2.1", 25, False, False), _Route("mx.b.test", "192.0.2.1", 25, False, False)
    assert route_key(SETTINGS, r1) == route_key(SETTINGS, r2)
    required = Settings(helo_name="client.scache.test", tls="required")
    assert route_key(required, r1) != route_key(required, r2)
    other = _Route("mx.a.test", "192.0.2.2", 25, False, False)
    assert route_key(SETTINGS, r1) != route_key(SETTINGS, other)


def test_on_done_reports_each_message_as_its_final_reply_arrives(server):
    srv = server(5, keep_content=False, delays={"data_final": 0.2})
    d = f"[{IP}5]"
    seen = []
    started = time.monotonic()
    results = deliver(d, envelopes(d, 4), on_done=lambda i, rs: seen.append((i, time.monotonic() - started,
                                                                              [r.state for r in rs])))
    finished = time.monotonic() - started
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert all(states == [State.DELIVERED] for _, _, states in seen)
    # each one a final reply (0.2 s) after the one before, the first long before the run ended
    assert seen[0][1] < finished - 0.4
    assert [r[0].state for r in results] == [State.DELIVERED] * 4 and len(srv.messages) == 4


def test_a_view_holds_its_connection_until_released_and_hands_tags_over():
    class FakeSession:
        reusable = True

        def __init__(self):
            self.closed = False

        def disconnect(self):
            self.closed = True
            self.reusable = False

    closed_tags, adopted = [], []
    cache = SessionCache(ReuseLimits(idle=30, time=60, count=10), on_close=closed_tags.append)
    a = View(cache, tag="A", hold=True)
    conn = Connection(FakeSession(), key="k")
    assert a.give(conn) and len(cache) == 0          # held: nobody else can take it
    assert View(cache, tag="B").take("k") is None
    assert a.take("k") is conn                       # its owner can
    a.give(conn)
    assert a.release() and len(cache) == 1           # the task ends: to the cache, still tagged A
    b = View(cache, tag="B", on_adopt=adopted.append)
    assert b.take("k") is conn and adopted == ["A"] and conn.tag == "B"
    b.give(conn)
    cache.close_all()
    assert closed_tags == ["B"] and conn.session.closed

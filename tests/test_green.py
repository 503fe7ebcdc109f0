"""mxq.tasks.green: a gevent worker answers address literals without its resolver's thread pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mxq.tasks.green import is_literal

PROBE = r"""
import json, os, sys
from gevent import monkey
monkey.patch_all()
import gevent, socket
from mxq.tasks import green

hub = gevent.get_hub()
installed = green.install()
pool = hub.threadpool
literal = socket.getaddrinfo("127.0.0.1", 25, type=socket.SOCK_STREAM)
v6 = socket.getaddrinfo("::1", 25, type=socket.SOCK_STREAM)
after_literals = pool.size
named = socket.getaddrinfo("localhost", 25, type=socket.SOCK_STREAM)
print(json.dumps({"installed": installed, "again": green.install(), "resolver": type(hub.resolver).__name__,
                  "literal": [a[4][:2] for a in literal], "v6": [a[4][0] for a in v6],
                  "pool_after_literals": after_literals, "pool_after_name": pool.size,
                  "named": sorted({a[4][0] for a in named})}))
"""


def probe(**env):
    e = {k: v for k, v in os.environ.items() if k != "GEVENT_RESOLVER"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_address_literals_are_answered_without_the_thread_pool_and_names_by_it():
    got = probe()
    assert got["installed"] is True and got["again"] is True and got["resolver"] == "LiteralsInline"
    assert got["literal"] == [["127.0.0.1", 25]] and got["v6"] == ["::1"]
    assert got["pool_after_literals"] == 0          # no thread started for the literals
    assert got["pool_after_name"] >= 1              # a name still goes to gevent's thread resolver
    assert "127.0.0.1" in got["named"]


def test_a_resolver_the_operator_chose_is_left_alone():
    got = probe(GEVENT_RESOLVER="block")
    assert got["installed"] is False and got["resolver"] == "Resolver"


def test_is_literal():
    for host in ("127.0.0.1", "::1", "fe80::1%eth0", b"10.0.0.1", None):
        assert is_literal(host), host
    for host in ("localhost", "mx.example", "", "127.0.0.256", b"\xff", 25):
        assert not is_literal(host), host

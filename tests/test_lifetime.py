"""MXQ_MAX_LIFETIME applies to every recipient on every path (issue 9, finding 4).

- a recipient deferred for ever (an exchange answering 451 to every message) expires on
  time: not before its lifetime, and within a couple of seconds after it (real Redis,
  ``mxq worker`` and ``mxq scheduler``, an aiosmtpd exchange);
- a recipient never attempted (its batch's time ran out every time) expires too, once its
  lifetime is over, instead of coming back for ever (pure logic: the outcome of a run).
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import Claimed

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.55.10"
DOMAIN = "forever.test"


def test_a_recipient_never_attempted_expires_at_the_end_of_its_lifetime():
    from mxq.tasks.graph import _Connection

    conn = object.__new__(_Connection)          # only outcome(): counts and settings
    conn.counts, conn.ps = defaultdict(int), PipelineSettings(max_lifetime=100, retry_schedule=(10,))
    rec = {"address": "a@x.test", "domain": "x.test", "state": "deferred", "runs": 2, "notify": None}
    it = Claimed(wid="j|x.test|0", job="j", domain="x.test", meta={"created": "1000", "sender": ""},
                 indexes=["0"], records=[rec], content=b"")
    queued = {"state": "queued", "code": None, "enhanced": "4.3.0", "attempts": 0,
              "text": "not attempted: the delivery run's time was up"}
    within = conn.outcome(it, [("0", rec)], [queued], now=1050.0)
    assert within.updates == [] and within.due == 1050.0             # back at once, untouched
    past = conn.outcome(it, [("0", rec)], [queued], now=1100.5)
    ((_, new, event),) = past.updates
    assert new["state"] == "expired" and past.due is None and new["enhanced"] == "4.3.0"


@pytest.fixture
def exchange(dns_server):
    dns_server.add({DOMAIN: {"MX": [[10, f"mx.{DOMAIN}"]]}, f"mx.{DOMAIN}": {"A": [IP]}})
    srv = start_server(IP, 25, Behaviour(hostname=f"mx.{DOMAIN}", data_reply="451 4.3.0 try again later"))
    yield srv
    srv.stop()


@pytest.mark.timeout(120)
def test_a_recipient_deferred_for_ever_expires_on_time(pipeline, exchange):
    lifetime = 4.0
    p = pipeline(MXQ_MAX_LIFETIME=str(int(lifetime)), MXQ_RETRY_SCHEDULE="1")
    p.worker(concurrency=1)
    p.beat()
    start = time.time()
    (job,) = tasks.submit_many([tasks.Item(f"From: a@src.test\r\nTo: u@{DOMAIN}\r\nSubject: x\r\n\r\nbody\r\n"
                                           .encode(), sender="a@src.test", recipients=[f"u@{DOMAIN}"])])
    p.wait_done([job], timeout=60)
    took = time.time() - start
    (r,) = tasks.status(job)["recipients"]
    print(f"expired after {took:.2f} s (lifetime {lifetime:g} s), {r['attempts']} attempts: {r['text']}")
    assert r["state"] == "expired" and r["code"] == 451 and r["enhanced"] == "4.3.0"
    assert r["attempts"] >= 3                               # retried every second meanwhile
    assert lifetime - 0.5 <= took <= lifetime + 3.0         # on time: not before, not long after

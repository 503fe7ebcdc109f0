"""Back-off with real workers: a destination that stops answering loses window, is declared dead,
gets one probe when the dead period ends, and starts again from the initial window (issue 8).

The store-level arithmetic is in tests/test_runtime.py; here a real ``mxq worker``, the scheduler,
Redis, the sandbox DNS server and a scripted aiosmtpd exchange whose greeting switches to 421
(every new session refused before any transaction: a failed run) and back to 220.

Servers in this module: 127.0.62.x:25; domains under ``bo.rt.test``.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from mxq.sandbox.smtpd import Behaviour, start_server
from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import Store, make_client
from tests.fixtures_infra import wait_until
from tests.test_runtime import Concurrency, states, submit, zone

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.62."
LANE = "bo.rt.test"


def _max_between(sessions: Concurrency, start: float, end: float) -> int:
    """Sessions open at once at the server between ``start`` and ``end`` (server-side times)."""
    with sessions.lock:
        before = [n for when, n in sessions.changes if when < start]
        during = [n for when, n in sessions.changes if start <= when < end]
    return max([before[-1] if before else 0, *during])


@pytest.mark.slow
def test_back_off_dead_destination_one_probe_then_slow_start_again(pipeline, dns_server):
    zone(dns_server, LANE, IP + "10")
    sessions = Concurrency()
    b = Behaviour(hostname="mx." + LANE, size_limit=None, keep_content=False, delays={"data_final": 0.3})
    srv = start_server(IP + "10", 25, b, protocol=sessions.protocol())
    try:
        # one message per task, limit 6, initial window 2; a dead period of 3 s (the retry schedule)
        p = pipeline(MXQ_SHAPING=f"{LANE}=6c", MXQ_INITIAL_CONCURRENCY="2", MXQ_BATCH_SIZE="1",
                     MXQ_RETRY_SCHEDULE="3,3,3")
        st = Store(make_client(p.redis.url), PipelineSettings(redis_url=p.redis.url))
        p.worker(concurrency=1)
        p.beat()

        # 1. slow start to the limit
        first = submit([f"a{i}@{LANE}" for i in range(30)])
        p.wait_done(first, timeout=60)
        assert st.dest.state(LANE)["w"] == 6 and sessions.max == 6

        # 2. the exchange refuses every new session (421 greeting): each failed run takes one off the
        #    window and adds 1/window to the failed cohort; a full cohort declares the destination dead
        wait_until(lambda: not sessions.open, 15, "phase-1 connections closed (connection cache idle time)")
        b.greeting_code = 421
        before = sessions.total
        second = submit([f"b{i}@{LANE}" for i in range(20)], start=100)
        wait_until(lambda: "dn" in st.dest.state(LANE), 30, "the destination declared dead")
        s = st.dest.state(LANE)
        failed = sessions.total - before
        print(f"dead after {failed} refused sessions; window {s['w']}, why {s.get('why')!r}")
        # 6 -> 5 -> 4 -> 3 -> 2 (cohort 1/6+1/5+1/4+1/3 < 1), the fifth failed run completes it; runs
        # already under way when the verdict came may add at most one window (6)
        assert 5 <= failed <= 5 + 6, failed
        assert s["dn"] == 1                                 # the first dead period (each failed probe adds one)
        assert s["w"] <= 2 and "Service not available" in s.get("why", ""), s   # the 421 greeting's text
        # while dead, its mail waits deferred in Redis with the reason, holding no connection
        wait_until(lambda: all(r["state"] == "deferred" for r in states(second)), 30, "the lane drained")
        assert all("Service not available" in (r.get("text") or "") for r in states(second)), states(second)[:2]
        refused = sessions.total - before
        wait_until(lambda: not sessions.open, 10, "refused sessions closed")

        # 3. the exchange answers again: when the dead period ends, one probe alone, then the window
        #    starts over from the initial window and grows to the limit
        b.greeting_code = 220
        switch = time.time()
        p.wait_done(second, timeout=60)
        got = sorted(m.received_at for m in srv.messages if m.rcpt_tos[0].startswith("b"))
        assert len(got) == 20
        alone = _max_between(sessions, switch, got[0])
        print(f"after {refused} refused sessions: {alone} session(s) before the probe's delivery, "
              f"{_max_between(sessions, got[0], got[1])} before the next, {_max_between(sessions, switch, 1e12)} at most")
        assert alone == 1                                   # the probe, nobody else
        assert _max_between(sessions, got[0], got[1]) <= 3  # the initial window (2) + the probe's delivery
        assert _max_between(sessions, switch, 1e12) <= 6    # never past the limit
        s = st.dest.state(LANE)
        assert "dn" not in s and "du" not in s, s
        # nothing lost, nothing twice
        rcpts = Counter(r for m in srv.messages for r in m.rcpt_tos)
        assert len(rcpts) == 50 and set(rcpts.values()) == {1}
        assert all(r["state"] == "delivered" for r in states(first + second))
        st.r.close()
    finally:
        srv.stop()

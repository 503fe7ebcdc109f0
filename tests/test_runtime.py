"""Deliveries in flight, destination concurrency and dead destinations (issue 8, ``mxq.tasks.qmgr``).

Real ``mxq worker`` processes (gevent, one per ``concurrency``), a real
Redis, the sandbox DNS server and scripted aiosmtpd servers that count
simultaneous sessions; a dead exchange is an address whose SYNs an nftables
rule drops inside the test session's private network namespace.  The
destination window's arithmetic is checked on the store's scripts directly.

Servers in this module: 127.0.61.x:25; domains under ``rt.test``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, ScriptedSMTP, start_server
from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import Feedback, Outcome, Store, make_client
from tests.fixtures_infra import wait_until

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.61."
SENDER = "sender@src.rt.test"


# ====================================================================== helpers
class Concurrency:
    """Simultaneous SMTP sessions at a server, with the time of each change (server side).

    A session counts from its connection to its QUIT (or the connection's end).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.open: set[int] = set()
        self.max = 0
        self.total = 0
        self.changes: list[tuple[float, int]] = []

    def _note(self):
        self.max = max(self.max, len(self.open))
        self.changes.append((time.time(), len(self.open)))

    def opened(self, key: int):
        with self.lock:
            self.open.add(key)
            self.total += 1
            self._note()

    def closed(self, key: int):
        with self.lock:
            if key in self.open:
                self.open.discard(key)
                self._note()

    def max_before(self, t: float) -> int:
        with self.lock:
            return max((n for when, n in self.changes if when < t), default=0)

    def protocol(self):
        counter = self

        class Counted(ScriptedSMTP):
            def connection_made(self, transport):
                first = self.transport is None
                super().connection_made(transport)
                if first and not self.readiness:
                    counter.opened(id(self))

            async def smtp_QUIT(self, arg):
                counter.closed(id(self))
                await super().smtp_QUIT(arg)

            def connection_lost(self, exc):
                counter.closed(id(self))
                super().connection_lost(exc)

        return Counted


def server(last: int, name: str, counter: Concurrency | None = None, **behaviour):
    b = Behaviour(hostname=name, size_limit=None, **behaviour)
    return start_server(IP + str(last), 25, b, protocol=counter.protocol() if counter else ScriptedSMTP)


def message(i: int, to: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: runtime {i}\r\n"
            f"Message-ID: <rt.{i}.{to}>\r\n\r\nbody {i}\r\n").encode()


def submit(addresses: list[str], start: int = 0) -> list[str]:
    return tasks.submit_many([tasks.Item(message(start + i, a), sender=SENDER, recipients=[a])
                              for i, a in enumerate(addresses)])


def zone(dns_server, domain: str, ip: str) -> None:
    dns_server.add({domain: {"MX": [[10, f"mx.{domain}"]]}, f"mx.{domain}": {"A": [ip]}})


def states(ids: list[str]) -> list[dict]:
    return [tasks.status(j)["recipients"][0] for j in ids]


# ====================================================================== the window, on the scripts
@pytest.fixture
def store(redis_server):
    srv = redis_server()
    st = Store(make_client(srv.url), PipelineSettings(redis_url=srv.url, batch_size=4, retry_schedule=(30, 90)))
    st.publish_policy({"d": 6, "m": {}, "i": 2, "x": 1000, "t": 0.5, "u": 0, "c": 1.0, "s": [30, 90],
                       "idle": 600})
    yield st
    st.r.close()


def _chunk(st: Store, lane: str, token: str, fb: Feedback) -> str:
    """One chunk's release with its feedback (no outcomes): the lane's status."""
    return st.finish(token, lane, [], fb)[2]


def test_window_grows_one_per_delivery_shrinks_one_per_failed_run_and_a_cohort_declares_dead(store):
    from mxq.tasks import qmgr

    st, lane = store, "w.rt.test"
    assert _chunk(st, lane, "a", Feedback(ok=1, latency=0.2)) == "ok"
    s = st.dest.state(lane)
    assert s["w"] == 3 and s["lat"] == 0.2                      # initial 2, +1
    _chunk(st, lane, "b", Feedback(ok=10, latency=0.4))
    assert st.dest.state(lane)["w"] == 6                         # capped by the limit (6c)
    assert st.dest.state(lane)["lat"] == pytest.approx(0.24)     # slower: a fifth of the way up
    _chunk(st, lane, "b2", Feedback(ok=1, latency=0.1))
    # faster: half the way (noise mostly adds time, but one fast answer of a slow exchange must not
    # make it look instant)
    assert st.dest.state(lane)["lat"] == pytest.approx(0.17)
    # ... for each message of the sample: 3 messages faster, 7/8 of the way
    _chunk(st, lane, "b3", Feedback(ok=3, latency=0.01))
    assert st.dest.state(lane)["lat"] == pytest.approx(0.17 - 0.16 * 7 / 8)
    assert qmgr.smooth(0.17, 0.01, 3) == pytest.approx(st.dest.state(lane)["lat"])   # the same rule
    assert qmgr.smooth(0.17, 0.01) == pytest.approx(0.09) and qmgr.smooth(0.2, 0.4, 10) == pytest.approx(0.24)
    # Failed runs (no server reached): -1 each and 1/window of a cohort each
    _chunk(st, lane, "c", Feedback(fail=1, why="connect to x: Connection timed out", enhanced="4.4.1"))
    s = st.dest.state(lane)
    assert s["w"] == 5 and s["fc"] == pytest.approx(1 / 6) and "du" not in s
    _chunk(st, lane, "d", Feedback(ok=1))                        # a success clears the cohorts
    assert "fc" not in st.dest.state(lane) and st.dest.state(lane)["w"] == 6
    statuses = [_chunk(st, lane, f"f{i}", Feedback(fail=1, why="timed out", enhanced="4.4.1")) for i in range(4)]
    # 1/6 + 1/5 + 1/4 + 1/3 = 0.95 < 1; the fifth failed run completes the cohort: dead
    assert statuses == ["ok"] * 4 and st.dest.state(lane)["w"] == 2
    assert _chunk(st, lane, "f4", Feedback(fail=1, why="timed out", enhanced="4.4.1")) == "dead"
    s = st.dest.state(lane)
    t = st.r.time()
    assert s["dn"] == 1 and s["w"] == 2 and s["du"] == pytest.approx(t[0] + t[1] / 1e6 + 30, abs=2)
    assert s["why"] == "timed out" and s["enh"] == "4.4.1"


def test_a_dead_lane_drains_then_takes_one_probe_at_a_time(store):
    st, lane = store, "d.rt.test"
    st.r.rpush(f"mxq:ready:{lane}", *[f"j{i}|{lane}|0" for i in range(5)])
    rnow = st.r.time()
    rnow = rnow[0] + rnow[1] / 1e6

    def acquire(token):
        return st.dest.acquire(lane, token, 4, concurrency=6, interval=0, bucket=1, slot_ttl=30, backstop=1,
                               now=time.time())

    st.r.set(f"mxq:dest:{lane}", json.dumps({"du": rnow + 60, "dn": 1, "why": "no answer", "enh": "4.4.1",
                                               "t": rnow}))
    g = acquire("a")
    assert (g.mode, g.granted, g.slot) == ("drain", 4, False)    # dead: defer the mail, no connection
    assert 59 < g.dead_wait <= 60 and g.why == "no answer"
    # the dead period is over: the first task is the probe (one message, a slot); nobody else meanwhile
    st.r.set(f"mxq:dest:{lane}", json.dumps({"du": rnow - 1, "dn": 1, "why": "no answer", "t": rnow}))
    p = acquire("p")
    assert (p.mode, p.granted, p.slot) == ("probe", 1, True)
    q = acquire("q")
    assert (q.granted, q.reason) == (0, "dead") and q.wait >= 1
    assert st.r.zscore("mxq:throttled", lane) is not None     # looked at again later
    # a run that started before the verdict fails too: the dead period stands (not the next step)
    assert _chunk(st, lane, "late", Feedback(fail=1, why="late failure")) == "dead"
    s = st.dest.state(lane)
    assert s["dn"] == 1 and s["du"] == pytest.approx(rnow - 1, abs=0.01)
    # the probe fails: dead again, for the schedule's next step (90 s)
    assert _chunk(st, lane, "p.1", Feedback(fail=1, why="still nothing", probe="p")) == "dead"
    s = st.dest.state(lane)
    assert s["dn"] == 2 and s["du"] - rnow == pytest.approx(90, abs=3) and "pr" not in s
    # the next probe gets through: alive, at the initial window, and tasks for the ready work
    st.r.set(f"mxq:dest:{lane}", json.dumps(dict(s, du=rnow - 1)))
    assert acquire("p2").mode == "probe"
    assert _chunk(st, lane, "p2.1", Feedback(ok=1, latency=0.1, probe="p2")) == "ok"
    s = st.dest.state(lane)
    assert "du" not in s and "dn" not in s and s["w"] == 3       # initial 2 + the probe's delivery
    g = acquire("b")
    assert (g.mode, g.granted) == ("deliver", 4)


def test_dispatch_spreads_slow_mail_over_the_window_and_fast_mail_over_few_connections(store):
    st = store
    for lane, lat in (("slow.rt.test", 1.0), ("fast.rt.test", 0.001), ("new.rt.test", None)):
        st.r.set(f"mxq:dest:{lane}", json.dumps({"w": 6, **({"lat": lat} if lat else {})}))
    from mxq.tasks.producer import Item, build_job
    jobs = [build_job(Item(message(i, f"u{i}@{d}"), sender=SENDER, recipients=[f"u{i}@{d}"]), max_size=10**6,
                      now=1e9)
            for i in range(8) for d in ("slow.rt.test", "fast.rt.test", "new.rt.test")]
    _, dispatch = st.submit(jobs, now=1e9)
    # slow (1 s a message): 8 s of work, half a second per connection, up to the window (6);
    # fast (1 ms): 8 ms of work, one connection; unknown latency: one per MXQ_BATCH_SIZE (4)
    assert dict(dispatch) == {"slow.rt.test": 6, "fast.rt.test": 1, "new.rt.test": 2}


def test_a_lanes_first_verdict_spreads_only_when_slow_beyond_doubt():
    from mxq.tasks import qmgr

    between = (qmgr.FAST_LATENCY + qmgr.FIRST_VERDICT_SLOW) / 2
    assert qmgr.spread(0.0, between)                                   # a later verdict: spread
    assert not qmgr.spread(0.0, between, first=True)                   # one message: confirm first
    assert qmgr.spread(0.0, qmgr.FIRST_VERDICT_SLOW, first=True)       # slow beyond doubt: spread
    assert not qmgr.spread(1.0, qmgr.FIRST_VERDICT_SLOW, first=True)   # ... unless the process is late
    assert not qmgr.spread(10 * qmgr.MAX_LAG, between)                 # a late process: not on a fast lane


def test_a_runs_latency_is_the_servers_time_when_the_kernel_timed_it():
    """``qmgr.feedback``: the latency a run reports is its servers' own time per message when every
    wait was timed by the kernel (``SMTPSession.server_seconds``), whatever the run's wall time and
    the process's lag; otherwise the wall time less twice the lag, as before."""
    from mxq.tasks import qmgr
    from mxq.workers.delivery import RunStats

    busy = RunStats(transactions=4, seconds=0.8, setup_seconds=0.0, server_seconds=0.0008)
    fb = qmgr.feedback(busy, None, lag=0.01)
    assert fb.ok == 4 and fb.latency == pytest.approx(0.0002)     # not 0.2 - 0.02: instant
    assert qmgr.chunk_size(fb.latency, 64) == 64
    slow = RunStats(transactions=2, seconds=2.1, server_seconds=2.0)
    assert qmgr.feedback(slow, None, lag=0.5).latency == pytest.approx(1.0)     # the lag is not taken off
    untimed = RunStats(transactions=4, seconds=0.8, server_seconds=0.7, server_timed=False)
    assert qmgr.feedback(untimed, None, lag=0.01).latency == pytest.approx(0.18)
    nothing = RunStats(transactions=3, seconds=0.3, server_seconds=0.0)
    assert qmgr.feedback(nothing, None).latency == 1e-6             # never 0: known, and instant


def test_a_connections_own_first_answers_grow_its_chunk_step_by_step():
    # A connection that started before its lane had a latency sizes its chunks on its own answers,
    # at most qmgr.CHUNK_GROWTH times the messages they cover: one fast answer (a timer-driven
    # exchange answering a dot that came just before its tick in 12 ms) no longer claims the lane.
    from mxq.tasks import qmgr

    assert qmgr.chunk_size(None, 64, 0) == qmgr.UNKNOWN_CHUNK == 1          # nothing measured: one
    assert qmgr.chunk_size(0.012, 64) == 64                                 # the lane's latency: as before
    sizes, measured = [], 0
    while measured < 64:
        k = qmgr.chunk_size(0.002 if measured else None, 64, measured)
        sizes.append(k)
        measured += k
    assert sizes == [1, 4, 20, 64]                                          # an instant exchange: two chunks more
    assert qmgr.chunk_size(0.25, 64, 1) == 2                                # below the cap: sized for its latency
    assert qmgr.chunk_size(1.0, 64, 30) == 1


def test_a_fast_first_answer_from_a_server_that_was_silent_claims_one_message_at_a_time():
    # A lane whose first chunk's server was silent past SPECULATE_SILENCE (the task speculated):
    # one fast answer (a timer-driven exchange answering a dot that came just before its tick) is
    # not its speed.  One message a claim until SILENT_TRUST of the connection's own answers timed
    # it; then the usual growth.  Without the silence, as before (four after one fast answer).
    from mxq.tasks import qmgr

    assert qmgr.chunk_size(0.002, 64, 1) == 4
    assert qmgr.chunk_size(0.002, 64, 1, silent=True) == 1
    sizes, measured = [], 0
    while measured < 64:
        k = qmgr.chunk_size(0.002 if measured else None, 64, measured, silent=True)
        sizes.append(k)
        measured += k
    assert sizes == [1, 1, 8, 40, 64]                                       # two claims more, then as ever
    assert qmgr.chunk_size(1.0, 64, 1, silent=True) == 1                    # a slow one: one either way
    assert qmgr.chunk_size(0.012, 64, None, silent=True) == 64              # the lane's latency: as before


class _BusyRt:
    """The parts of a ``graph.Runtime`` a ``_Lane`` uses, in a process late to wake (lag 40 ms)."""
    local_spawn = True
    local_active = 0
    lag = 0.04

    def __init__(self):
        self.local_lock = threading.Lock()

    def busy(self):
        from mxq.tasks import qmgr
        return self.lag >= qmgr.MAX_LAG

    class store:
        @staticmethod
        def ready_count(lane):
            return 4

    class ps:
        soft_time_limit = 600


def test_speculation_opens_the_window_even_in_a_busy_process(monkeypatch):
    # A worker starting hundreds of new destinations at once is late to wake (its lag above
    # qmgr.MAX_LAG) exactly when their first chunks wait: speculation, called when the server has
    # been silent (graph._Connection.watch), still opens the window, and once (before: spawn's
    # busy rule refused, and each lane stayed on one connection until its first verdict).
    from mxq.tasks import graph

    opened = []
    monkeypatch.setattr(graph._Lane, "extra", lambda self: opened.append(self.domain))
    rt = _BusyRt()
    lane = graph._Lane(rt, "busy.rt.test")
    lane.local = 1                                      # the first connection, waiting on its chunk
    assert rt.busy()
    assert lane.spawn(4) == 0                           # a busy process spreads nothing on a verdict
    lane.speculate(5)
    lane.speculate(5)                                   # once per task
    for t in lane.threads:
        t.join(5)
    assert opened == ["busy.rt.test"] * 4               # the window of 5: four more connections


def test_a_busy_process_opens_a_slow_lanes_connections_itself_and_publishes_the_others(monkeypatch):
    # A busy process publishes the connections a verdict asks for as tasks, for a less busy worker
    # to open.  For a lane slow beyond doubt (qmgr.slow_beyond_doubt) that only added a task's cost
    # and its wait in the queue to each connection: the bench's slow stage published 40-90 such
    # tasks in its slower runs.  Those are opened here; other lanes' wants still go as tasks.
    from mxq.tasks import graph, qmgr

    opened, published = [], []
    monkeypatch.setattr(graph._Lane, "extra", lambda self: opened.append(self.domain))
    monkeypatch.setattr(graph, "publish", lambda dispatch, **_kw: published.extend(dispatch) or 0)
    rt = _BusyRt()
    lane = graph._Lane(rt, "slow.rt.test")
    lane.local = 1                                      # the connection whose verdict came in
    assert rt.busy()
    lane.publish([("slow.rt.test", 3)])                 # not known to be slow: tasks, any worker
    assert published == [("slow.rt.test", 3)] and not opened
    published.clear()
    lane.publish([("slow.rt.test", 3), ("other.rt.test", 2)], slow=True)
    for t in lane.threads:
        t.join(5)
    assert opened == ["slow.rt.test"] * 3 and published == [("other.rt.test", 2)]
    # The rule: a second a message is slow at a 40 ms lag; 0.1 s is not (an instant exchange
    # timed by a starved process); nor is anything at a lag that large, nor an unknown lane.
    assert qmgr.slow_beyond_doubt(rt.lag, 1.0) and qmgr.slow_beyond_doubt(0.0, qmgr.FIRST_VERDICT_SLOW)
    assert not qmgr.slow_beyond_doubt(0.0, 0.1)
    assert not qmgr.slow_beyond_doubt(0.2, 1.0)
    assert not qmgr.slow_beyond_doubt(0.0, None)


def test_the_claimed_mail_budget_lets_one_message_a_connection_and_queues_bigger_chunks_in_turn():
    # qmgr.Budget: a connection's first message never waits (slow lanes, probes, first chunks);
    # what a chunk takes beyond it comes out of the process's budget, first come first served.
    from mxq.tasks.qmgr import Budget

    b = Budget(10)
    assert b.take(1, 0) == 1 and b.held == 0
    assert b.take(64, 0) == 11 and b.held == 10            # a chunk of 64 asked: room for 11
    assert b.take(1, 0) == 1                               # one message still goes when full
    assert b.take(3, 0) == 0 and b.held == 10              # no room, no wait asked: nothing
    got: dict[str, int] = {}

    def waiter(name, k):
        got[name] = b.take(k, 30)

    big = threading.Thread(target=waiter, args=("big", 9))
    big.start()
    wait_until(lambda: len(b._waiters) == 1, 5, "the first waiter")
    small = threading.Thread(target=waiter, args=("small", 2))
    small.start()
    wait_until(lambda: len(b._waiters) == 2, 5, "the second waiter")
    b.give(2)       # room for the small one (1 beyond its first), not the big one (8): it came first
    assert b.held == 8 and [w[0] for w in b._waiters] == [8, 1]        # both still wait
    b.give(8)       # the big one goes, then the small one
    big.join(5)
    small.join(5)
    assert got == {"big": 9, "small": 2} and b.held == 9 and not b._waiters
    b.give(8)
    b.give(1)
    assert b.held == 0


def test_a_connection_waiting_for_room_gives_up_when_told_and_lets_the_next_go():
    from mxq.tasks.qmgr import Budget

    b = Budget(4)
    b.POLL = 0.05
    assert b.take(5, 0) == 5 and b.held == 4
    stop = threading.Event()
    got: dict[str, int] = {}
    big = threading.Thread(target=lambda: got.update(big=b.take(5, 30, stop=stop.is_set)))
    big.start()
    wait_until(lambda: len(b._waiters) == 1, 5, "the first waiter")
    small = threading.Thread(target=lambda: got.update(small=b.take(2, 30)))
    small.start()
    wait_until(lambda: len(b._waiters) == 2, 5, "the second waiter")
    b.give(1)                       # room for the small one, behind the big one
    stop.set()                      # the big one's connection stops (heartbeat lost, shutdown)
    big.join(5)
    small.join(5)
    assert got == {"big": 0, "small": 2} and b.held == 4 and not b._waiters


def test_speculation_follows_the_servers_silence_not_the_chunks_time():
    # The watch asks the run's connection how long its server has owed a reply
    # (SMTPSession.silence, tested on a real socket in test_pipelining: it leaves out this
    # process's delays, a reply already in included).  Before: the chunk's time since it
    # connected, less its set-up, and for a busy process ten times its lag: in the bench's slow
    # stage most lanes got their window only with their first verdict, 1 s later.  A new
    # destination's set-up (no connection yet) opens nothing however long it takes (0.3-1 s in a
    # worker starting 100 destinations at once).
    from types import SimpleNamespace

    from mxq.tasks import graph, qmgr
    from mxq.workers.delivery import RunStats

    windows: list[int] = []
    called = threading.Event()

    class Lane:
        speculated = False

        def speculate(self, window):
            windows.append(window)
            called.set()

    conn = object.__new__(graph._Connection)
    conn.latency, conn.probe, conn.lane = None, False, Lane()
    conn.rt, conn.grant = SimpleNamespace(local_spawn=True), SimpleNamespace(window=5)
    stats = RunStats()
    over = conn.watch(stats)
    try:
        assert not called.wait(4 * qmgr.SPECULATE_SILENCE)       # still setting up: no connection yet
        session = SimpleNamespace(silence=qmgr.SPECULATE_SILENCE / 2)
        stats.session = session                                    # connected; the server answering
        assert not called.wait(4 * qmgr.SPECULATE_SILENCE)
        session.silence = qmgr.SPECULATE_SILENCE                   # the server sits on what it was sent
        assert called.wait(10)
        assert windows == [5]
    finally:
        over.set()
    lane = Lane()
    lane.speculated = True
    conn.lane = lane
    assert conn.watch(stats) is None                               # once per task
    conn.lane, conn.latency = Lane(), 0.5
    assert conn.watch(stats) is None                               # latency known: nothing to speculate on


# ====================================================================== across real workers
@pytest.fixture(scope="module")
def zones(dns_server):
    for last, name in ((10, "par.rt.test"), (11, "start.rt.test"), (12, "spec.rt.test"), (20, "dead.rt.test"),
                       (21, "ok.rt.test"), (30, "kill.rt.test"), (31, "kill2.rt.test"), (32, "term.rt.test"),
                       (40, "a.reuse.rt.test"), (40, "b.reuse.rt.test"), (13, "over.rt.test"),
                       (14, "conf.rt.test")):
        zone(dns_server, name, IP + str(last))


def test_a_domain_gets_parallel_connections_up_to_its_limit_across_two_workers(pipeline, zones):
    par = Concurrency()
    srv = server(10, "mx.par.rt.test", par, delays={"data_final": 0.3}, keep_content=False)
    try:
        # A message per task (chunks of 1): the first dispatch publishes 4 tasks, so both workers
        # (each blocked waiting for one) get some, and each may open more connections itself.
        p = pipeline(MXQ_SHAPING="par.rt.test=4c", MXQ_BATCH_SIZE="1")
        p.worker(concurrency=1)
        p.worker(concurrency=1)
        p.beat()
        ids = submit([f"u{i}@par.rt.test" for i in range(40)])
        p.wait_done(ids, timeout=60)
        assert [s["state"] for s in states(ids)] == ["delivered"] * 40 and len(srv.messages) == 40
        print(f"par.rt.test=4c: at most {par.max} sessions at once, {par.total} sessions")
        assert 1 < par.max <= 4             # spread over parallel connections, never past the limit
        assert par.max == 4                 # the window grew to the limit: 40 x 0.3 s is plenty
        # both workers took part: each delivered to the domain, or was refused a connection
        # because the other held the domain's every slot (the limit is fleet-wide)
        logs = [w.log() for w in p.processes[:2]]
        assert all("deliver par.rt.test: delivered=" in log or "held back by shaping (concurrency)" in log
                   for log in logs)
        # gevent workers: the Redis and SMTP connections' address literals skip the resolver's threads
        assert all("gevent resolver: address literals answered in the caller" in log for log in logs)
    finally:
        srv.stop()


def test_slow_start_from_the_initial_window(pipeline, zones):
    sessions = Concurrency()
    srv = server(11, "mx.start.rt.test", sessions, delays={"data_final": 0.4}, keep_content=False)
    try:
        # one message per task (chunks of 1): the dispatch asks for 30 connections at once
        p = pipeline(MXQ_SHAPING="start.rt.test=6c", MXQ_INITIAL_CONCURRENCY="2", MXQ_BATCH_SIZE="1")
        p.worker(concurrency=2)
        p.beat()
        ids = submit([f"s{i}@start.rt.test" for i in range(30)])
        p.wait_done(ids, timeout=60)
        first = min(m.received_at for m in srv.messages)
        before = sessions.max_before(first)
        print(f"slow start: {before} sessions before the first delivery, {sessions.max} at most")
        assert before == 2                  # the initial window, used in full, before any success
        assert sessions.max == 6            # grown to the limit, never past it
    finally:
        srv.stop()


def test_a_slow_destination_gets_its_initial_window_before_its_first_verdict(pipeline, zones):
    # Postfix opens a destination's initial concurrency at once.  mxq learns a destination's speed
    # from its first delivery; one that has owed it a reply for qmgr.SPECULATE_SILENCE is slow, and
    # its mail is spread over the initial window without waiting for that first verdict.
    sessions = Concurrency()
    srv = server(12, "mx.spec.rt.test", sessions, delays={"data_final": 2.0}, keep_content=False)
    try:
        # 20 messages of a new destination: its latency unknown, one task takes them (MXQ_BATCH_SIZE 64)
        p = pipeline(MXQ_SHAPING="spec.rt.test=8c", MXQ_INITIAL_CONCURRENCY="4")
        p.worker(concurrency=1)
        p.beat()
        ids = submit([f"v{i}@spec.rt.test" for i in range(20)])
        p.wait_done(ids, timeout=60)
        assert [s["state"] for s in states(ids)] == ["delivered"] * 20 and len(srv.messages) == 20
        first = min(m.received_at for m in srv.messages)
        before = sessions.max_before(first)
        print(f"slow new destination: {before} sessions before its first verdict, {sessions.max} at most")
        assert before == 4                  # the initial window, opened before the first verdict
        assert sessions.max <= 8            # never past the limit
    finally:
        srv.stop()


def test_a_first_verdict_from_one_message_is_confirmed_before_the_lane_spreads(pipeline, zones):
    # A new destination's first chunk is one message (qmgr.UNKNOWN_CHUNK).  Timed under
    # qmgr.FIRST_VERDICT_SLOW, that one sample does not spread the lane (qmgr.spread's ``first``): in a
    # busy start-up it is as often the process's delays as the server's.  The connection goes on
    # with a chunk sized for it, and that chunk's verdict spreads the lane when the destination is
    # really that slow (here 80 ms at the final dot: past qmgr.FAST_LATENCY, so it does).
    sessions = Concurrency()
    srv = server(14, "mx.conf.rt.test", sessions, delays={"data_final": 0.08}, keep_content=False)
    try:
        p = pipeline(MXQ_SHAPING="conf.rt.test=6c")
        p.worker(concurrency=1)
        p.beat()
        ids = submit([f"c{i}@conf.rt.test" for i in range(24)])
        p.wait_done(ids, timeout=60)
        assert [s["state"] for s in states(ids)] == ["delivered"] * 24 and len(srv.messages) == 24
        arrivals = sorted(m.received_at for m in srv.messages)
        before = sessions.max_before(arrivals[2])
        print(f"first verdict at 80 ms: {before} session(s) until the third message, {sessions.max} at most, "
              f"{sessions.total} in all")
        assert before == 1              # the first verdict spread nothing: the next chunk, one connection
        assert 2 <= sessions.max <= 6   # the second verdict spread the lane, within its limit
    finally:
        srv.stop()


def test_a_chunk_far_behind_its_estimate_hands_its_unsent_mail_to_other_connections(pipeline, zones):
    # The destination was instant until now (1 ms a message), so one connection takes all ten
    # messages as one chunk; now it answers each final dot after 1 s.  Past qmgr.overdue_after
    # (1 s here) the chunk starts no new transaction and its unsent messages go back to the front
    # of the lane, not attempted, and the lane's other connections take them: without that, the
    # ten went one after another over the one connection (10 s, one session at a time).
    sessions = Concurrency()
    srv = server(13, "mx.over.rt.test", sessions, delays={"data_final": 1.0}, keep_content=True)
    try:
        p = pipeline(MXQ_SHAPING="over.rt.test=5c")
        p.redis.client().set("mxq:dest:over.rt.test", json.dumps({"lat": 0.001}))
        p.worker(concurrency=1)
        p.beat()
        ids = submit([f"o{i}@over.rt.test" for i in range(10)])
        p.wait_done(ids, timeout=60)
        got = Counter(m.email()["Message-ID"] for m in srv.messages)
        assert len(got) == 10 and set(got.values()) == {1}              # each once
        recipients = [s["recipients"][0] for s in (tasks.status(j) for j in ids)]
        assert all(r["state"] == "delivered" and r["attempts"] == 1 for r in recipients)   # given back: no attempt
        print(f"overdue chunk: at most {sessions.max} sessions at once, {sessions.total} sessions")
        assert "overdue=" in p.processes[0].log()      # a chunk was stopped and gave its rest back
        assert 2 <= sessions.max <= 5                   # the rest went over parallel connections, within 5c
    finally:
        srv.stop()


def _nft(*rules: str) -> None:
    subprocess.run(["nft", "-f", "-"], input="\n".join(rules).encode(), check=True)


def _syn_sent(ip: str) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "syn-sent", "dst", ip], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


@pytest.mark.skipif(shutil.which("nft") is None or shutil.which("ss") is None, reason="needs nft and ss")
def test_a_dead_exchange_gets_one_probe_at_a_time_and_other_domains_deliver(pipeline, zones, dns_server):
    from tests.conftest import IN_PRIVATE_NETNS
    if not IN_PRIVATE_NETNS:
        pytest.skip("nftables rules only inside the test session's private network namespace")
    dead_ip = IP + "20"
    _nft("add table inet mxq_rt_dead",
         "add chain inet mxq_rt_dead out { type filter hook output priority 0; }",
         f"add rule inet mxq_rt_dead out ip daddr {dead_ip} tcp dport 25 drop")
    ok = server(21, "mx.ok.rt.test", delays={"data_final": 0.05}, keep_content=False)
    revived = None
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), _syn_sent(dead_ip)))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        p = pipeline(MXQ_CONNECT_TIMEOUT="2", MXQ_RETRY_SCHEDULE="3", MXQ_MAX_LIFETIME="600")
        p.worker(concurrency=2)
        p.beat()
        sampler.start()
        dead = submit([f"d{i}@dead.rt.test" for i in range(30)])          # submitted first
        healthy = submit([f"h{i}@ok.rt.test" for i in range(60)], start=100)
        p.wait_done(healthy, timeout=30)
        assert all(s["state"] == "delivered" for s in states(healthy))
        assert not any(s["state"] == "delivered" for s in states(dead))
        client = p.redis.client()
        wait_until(lambda: "du" in json.loads(client.get("mxq:dest:dead.rt.test") or "{}"), 20,
                   "the dead exchange's domain declared dead")
        declared = time.monotonic()
        # Every recipient of the dead domain ends deferred, with the reason, none lost.
        wait_until(lambda: all(s["state"] == "deferred" for s in states(dead)), 20, "every dead recipient deferred")
        texts = Counter("suspended" if "temporarily suspended" in s["text"] else s["text"] for s in states(dead))
        print(f"dead domain: {dict(texts)}")
        assert all("timed out" in s["text"] or "marked down" in s["text"] for s in states(dead))
        assert texts["suspended"] >= 20     # most were never tried: deferred without a connection
        assert all(s["next_attempt"] for s in states(dead))
        # Two more dead periods (3 s each, and the probes' 2 s connect timeouts): one probe at a time.
        time.sleep(9)
        stop.set()
        sampler.join(5)
        after = [n for t, n in samples if t > declared + 2.5]        # connects under way at the verdict ended
        before = max(n for t, n in samples if t <= declared)
        print(f"connections trying the dead exchange: up to {before} before it was declared dead, "
              f"up to {max(after)} after ({sum(1 for n in after if n)} samples of {len(after)} with one)")
        assert before <= 5                  # the initial window
        assert max(after) == 1              # probes, one at a time ...
        assert any(after)                   # ... and there were some
        # The exchange comes back: the next probe gets through and the domain's mail goes out.
        subprocess.run(["nft", "delete", "table", "inet", "mxq_rt_dead"], check=True)
        revived = server(20, "mx.dead.rt.test", keep_content=False)
        p.wait_done(dead, timeout=40)
        assert all(s["state"] == "delivered" for s in states(dead)) and len(revived.messages) == 30
        # No delivery task broke off: the connections a dead lane's task opened (and those they
        # opened in turn) were joined, each once started ("cannot join thread before it is
        # started" raised from _Lane.run while a connection it had opened was opening another).
        raised = [line for line in p.logs().splitlines() if "raised unexpected" in line]
        assert not raised, raised[:3]
    finally:
        stop.set()
        subprocess.run(["nft", "delete", "table", "inet", "mxq_rt_dead"], capture_output=True)
        ok.stop()
        if revived is not None:
            revived.stop()


def _established(ip: str) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", "dst", ip], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.strip())


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss")
def test_a_worker_killed_with_many_deliveries_in_flight_loses_nothing(pipeline, zones):
    srv = server(30, "mx.kill.rt.test", delays={"data_final": 0.5})
    srv2 = server(31, "mx.kill2.rt.test", delays={"data_final": 0.5})
    try:
        p = pipeline(MXQ_LEASE_SECONDS="2", MXQ_DISPATCH_STALE="2")
        w1 = p.worker(concurrency=1)
        p.beat()
        rcpts = [f"k{i}@kill.rt.test" if i % 2 else f"k{i}@kill2.rt.test" for i in range(300)]
        ids = submit(rcpts)
        wait_until(lambda: len(srv.messages) + len(srv2.messages) >= 60, 30, "deliveries under way")
        wait_until(lambda: _established(IP + "30") + _established(IP + "31") >= 10, 10, "connections in flight")
        open_at_kill = _established(IP + "30") + _established(IP + "31")
        w1.kill()                           # SIGKILL: no release, no ack, nothing recorded after this
        sent_at_kill = len(srv.messages) + len(srv2.messages)
        p.worker(concurrency=1)
        p.wait_done(ids, timeout=90)
        got = Counter(m.email()["Message-ID"] for m in srv.messages + srv2.messages)
        dups = sum(n - 1 for n in got.values())
        print(f"killed with {open_at_kill} connections open after {sent_at_kill} deliveries: "
              f"{len(got)} distinct messages, {dups} sent twice")
        assert len(got) == 300 and all(s["state"] == "delivered" for s in states(ids))   # nothing lost
        assert dups <= open_at_kill         # only what was in flight is sent again
    finally:
        srv.stop()
        srv2.stop()


def test_a_worker_stopped_with_sigterm_finishes_its_chunks_and_leaves_the_rest_queued(pipeline, zones):
    """A warm shutdown (podman/docker stop, mxq up, systemd: SIGTERM) ends each connection after the
    chunk under way instead of draining its lane: the process exits within seconds, nothing is sent
    twice, and another worker delivers the rest."""
    srv = server(32, "mx.term.rt.test", delays={"data_final": 0.5})
    try:
        p = pipeline(MXQ_SHAPING="default=2c")      # 2 connections x 0.5 s: 160 messages take ~40 s
        w1 = p.worker(concurrency=1)
        p.beat()
        ids = submit([f"t{i}@term.rt.test" for i in range(160)])
        wait_until(lambda: len(srv.messages) >= 10, 30, "deliveries under way")
        w1.proc.send_signal(signal.SIGTERM)         # the supervisor forwards it: a warm shutdown
        assert w1.proc.wait(20) == 0                # within one chunk's time, not the lane's (~35 s)
        at_exit = len(srv.messages)
        assert at_exit < 160, "the worker drained the lane before exiting: the test proved nothing"
        p.worker(concurrency=1)
        p.wait_done(ids, timeout=90)
        got = Counter(m.email()["Message-ID"] for m in srv.messages)
        print(f"SIGTERM after {at_exit} deliveries: {len(got)} distinct, {sum(got.values()) - len(got)} twice")
        assert len(got) == 160 and set(got.values()) == {1}
        assert all(s["state"] == "delivered" for s in states(ids))
    finally:
        srv.stop()


def test_a_connection_carries_several_tasks_and_domains_sharing_its_exchange(pipeline, zones):
    sessions = Concurrency()
    srv = server(40, "mx.reuse.rt.test", sessions, keep_content=False)
    try:
        p = pipeline()
        w = p.worker(concurrency=1)
        p.beat()
        ids = []
        for i in range(6):                  # one message at a time: a task each
            ids += submit([f"r{i}@a.reuse.rt.test" if i % 2 else f"r{i}@b.reuse.rt.test"], start=i)
            p.wait_done(ids, timeout=20)
            # ... and the next one once this task is over (its connection parked in the process's
            # cache): a job is done when its outcome is written, a moment before its task gives the
            # connection back, and a task starting in between rightly opens a connection of its own
            # (seen once under the full suite's load).
            wait_until(lambda: w.log().count(": delivered=1, ") >= i + 1, 20, f"task {i} over")
        assert all(s["state"] == "delivered" for s in states(ids))
        print(f"6 tasks over {sessions.total} connection(s)")
        assert sessions.total == 1          # both domains, all six tasks: one connection
        # idle past MXQ_CONNECTION_CACHE_TIME (2 s), it is closed (QUIT)
        wait_until(lambda: not sessions.open, 10, "the idle connection closed")
        assert srv.stats["quit"] == 1
    finally:
        srv.stop()


def new_domains(dns_server, prefix: str, n: int, last: int) -> list[str]:
    """``n`` new domains ``{prefix}{i}.fan.rt.test``, each with its MX at ``IP + last`` in the test DNS."""
    domains = [f"{prefix}{i}.fan.rt.test" for i in range(n)]
    for d in domains:
        zone(dns_server, d, IP + str(last))
    return domains


def send_to_each(p, domains: list[str], timeout: float) -> list[str]:
    """One message to ``u@`` each domain, waited for until every one is delivered; the job ids."""
    ids = submit([f"u@{d}" for d in domains])
    p.wait_done(ids, timeout=timeout)
    assert [s["state"] for s in states(ids)] == ["delivered"] * len(domains)
    return ids


@pytest.mark.parametrize("path", ["fanout", "intake"])
def test_a_batch_to_many_new_domains_starts_its_runs_inside_the_fanouts(pipeline, dns_server, path):
    # A producer's batch to 40 new domains asks for 40 delivery runs: one mxq.fanout (or, for a
    # batch over MXQ_INTAKE_THRESHOLD, the mxq.intake task) runs qmgr.FAN_CHUNK of them itself and
    # publishes the rest in fanouts of FAN_CHUNK (a group of FANOUT_DIRECT or fewer as mxq.deliver
    # tasks), instead of publishing and receiving 40 tasks one by one in a busy process.
    from mxq.tasks import qmgr
    from mxq.tasks.dispatch import FANOUT_DIRECT

    domains = new_domains(dns_server, "f", 40, 50)
    srv = server(50, "mx.fan.rt.test", keep_content=False)
    try:
        env = {"MXQ_INTAKE_THRESHOLD": "10"} if path == "intake" else {}
        p = pipeline(**env)
        w = p.worker(concurrency=2)
        p.beat()
        send_to_each(p, domains, timeout=60)
        got = Counter(m.rcpt_tos[0] for m in srv.messages)
        assert sorted(got) == sorted(f"u@{d}" for d in domains) and set(got.values()) == {1}   # once each
        log = w.log()
        received = Counter(line.split("Task mxq.", 1)[1].split("[", 1)[0] for line in log.splitlines()
                           if "Task mxq." in line and line.endswith("] received"))
        delivers, fanouts = received["deliver"], received["fanout"]
        print(f"{path}: {delivers} mxq.deliver and {fanouts} mxq.fanout tasks for 40 new domains")
        # 40 = 16 run by the first task + 16 by one more fanout + 8 published as mxq.deliver tasks
        # (more only when a run found its connection's lane refilled after it closed)
        assert qmgr.FAN_CHUNK == 16 and FANOUT_DIRECT == 8
        assert fanouts == (1 if path == "fanout" else 0) + 1
        assert delivers < 40 - 2 * qmgr.FAN_CHUNK + 4
        assert "Traceback" not in log
    finally:
        srv.stop()


def test_a_fanout_taken_by_a_worker_of_other_roles_only_publishes(pipeline, dns_server):
    # A worker started with -Q mxq.intake (no mxq.delivery) delivers nothing: its fanout publishes
    # every run as an mxq.deliver task for the delivery workers.
    domains = new_domains(dns_server, "g", 20, 51)
    srv = server(51, "mx.fan2.rt.test", keep_content=False)
    try:
        p = pipeline()
        intake_only = p.worker(concurrency=1, queues="mxq.intake")
        delivery = p.worker(concurrency=1, queues="mxq.delivery")
        p.beat()
        send_to_each(p, domains, timeout=60)
        assert len(srv.messages) == 20
        assert "Task mxq.fanout[" in intake_only.log()
        assert "deliver g" not in intake_only.log() and "status=sent" not in intake_only.log()
        assert delivery.log().count("Task mxq.deliver[") >= 20
    finally:
        srv.stop()


def test_a_fanouts_runs_to_slow_new_domains_all_start_before_the_first_verdict(pipeline, dns_server):
    # 40 new domains whose exchange takes 3 s at the final dot, one worker process: the fanout runs
    # 16, the fanout it publishes (taken by the same process) 16 more, 8 go as mxq.deliver tasks.
    # Every domain's first RCPT comes before the first message is accepted: no run waits for
    # another's delivery to start (a bound on runs setting up at once, held until each run's first
    # chunk was delivered, started one more run per 0.5 s: 1.25x Postfix in the bench's slow stage).
    domains = new_domains(dns_server, "s", 40, 52)
    first_rcpt: dict[str, float] = {}

    class Noted(ScriptedSMTP):
        async def smtp_RCPT(self, arg):
            if arg and "@" in arg:
                first_rcpt.setdefault(arg.split("@", 1)[1].split(">", 1)[0].lower(), time.time())
            await super().smtp_RCPT(arg)

    b = Behaviour(hostname="mx.fan3.rt.test", size_limit=None, keep_content=False, delays={"data_final": 3.0})
    srv = start_server(IP + "52", 25, b, protocol=Noted)
    try:
        p = pipeline()
        p.worker(concurrency=1)
        p.beat()
        send_to_each(p, domains, timeout=90)
        first = min(m.received_at for m in srv.messages)
        late = sorted(d for d in domains if first_rcpt.get(d, first) >= first)
        print(f"{len(domains) - len(late)} of 40 domains had a transaction under way before the first verdict")
        assert not late
    finally:
        srv.stop()

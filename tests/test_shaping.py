"""Traffic shaping (``mxq.tasks.shaping``): the ``MXQ_SHAPING`` format, the Redis scripts against a
real ``redis-server``, and the limits holding across several real ``celery worker`` processes,
measured at real SMTP servers (aiosmtpd, sandbox) that count simultaneous sessions.

Servers in this module: 127.0.52.x:25 in the test session's private network namespace;
domains under ``shape.test``.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from mxq import tasks
from mxq.tasks.shaping import BACKSTOP, THROTTLED, Limits, Policy, Shaper, slots_key, tat_key
from mxq.tasks.store import Store
from mxq.tasks.settings import PipelineSettings
from tests.fixtures_infra import wait_until
from mxq.sandbox.smtpd import Behaviour, ScriptedSMTP, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.52."
SENDER = "sender@src.shape.test"


# ====================================================================== the format
def test_unset_means_twenty_connections_and_no_rate():
    p = Policy.from_env({})
    assert p.default == Limits(concurrency=20, rate=None, burst=None)
    assert p.for_domain("gmail.com") == p.default
    assert Policy.from_env({"MXQ_SHAPING": "  "}) == p


def test_inline_rules_override_the_default_field_by_field():
    p = Policy.parse("default=10c,5/s; Gmail.COM=2c,50/s,burst=10\n"
                     "b.example=1/m  # one a minute\n"
                     "c.example=3c;Bücher.example=*c,*/s")
    assert p.default == Limits(10, 5.0, None) and p.default.bucket == 5
    assert p.for_domain("gmail.com") == Limits(2, 50.0, 10)
    b = p.for_domain("b.example")
    assert b.concurrency == 10 and math.isclose(b.rate, 1 / 60) and b.bucket == 1
    # no rate of its own: the default's rate (and burst) apply
    assert p.for_domain("c.example") == Limits(3, 5.0, None)
    # IDNA and case folded, like lanes; "*" lifts a limit
    assert p.for_domain("xn--bcher-kva.example") == Limits(None, None, None)
    assert p.for_domain("other.example") is p.default
    assert Policy.parse(p.describe()) == Policy.parse(p.describe())
    assert Policy.parse(p.describe()).for_domain("gmail.com") == Limits(2, 50.0, 10)


def test_burst_goes_with_its_rate():
    p = Policy.parse("default=5/s,burst=2; x.example=3c; y.example=8/s")
    assert p.for_domain("x.example") == Limits(3, 5.0, 2)
    assert p.for_domain("y.example") == Limits(20, 8.0, None) and p.for_domain("y.example").bucket == 8
    assert Policy.parse("default=0.5/s").default.bucket == 1
    assert math.isclose(Policy.parse("default=7200/h").default.rate, 2.0)


@pytest.mark.parametrize("text, message", [
    ("gmail.com", "expected TARGET=LIMIT"),
    ("x.example=", "expected TARGET=LIMIT"),
    ("x.example=5x", "'5x' is not a limit"),
    ("x.example=0c", "concurrency must be a whole number from 1"),
    ("x.example=2.5c", "concurrency must be a whole number"),
    ("x.example=5c,6c", "concurrency is given twice"),
    ("x.example=5/s,1/m", "rate is given twice"),
    ("x.example=5/d", "unit must be /s, /m (/min) or /h"),
    ("x.example=-1/s", "a rate must be a positive number"),
    ("x.example=0/s", "a rate must be a positive number"),
    ("x.example=5c,,5/s", "empty limit"),
    ("x.example=burst=3", "burst=N needs a rate"),
    ("x.example=5/s,burst=0", "burst must be a whole number"),
    ("default=1c;default=2c", "'default' already has a rule"),
    ("a.example=1c; A.EXAMPLE=2c", "already has a rule"),
    ("bad..example=1c", "is not a domain"),
])
def test_bad_rules_are_refused_naming_the_rule(text, message):
    with pytest.raises(ValueError) as e:
        Policy.parse(text)
    assert message in str(e.value)
    assert str(e.value).startswith("MXQ_SHAPING: rule ")


def test_rule_number_in_the_error():
    with pytest.raises(ValueError, match=r"rule 2 \('b.example=9q'\)"):
        Policy.parse("a.example=1c; b.example=9q")


def test_rules_file(tmp_path):
    f = tmp_path / "shaping.conf"
    f.write_text("# mxq traffic shaping\ndefault = 4c\n\ngmail.com = 5c, 50/s   # Google\n", encoding="utf-8")
    p = Policy.from_env({"MXQ_SHAPING": str(f)})
    assert p.default == Limits(4, None, None)
    assert p.for_domain("gmail.com") == Limits(5, 50.0, None)
    f.write_text("default=4c\nx.example=4z\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"MXQ_SHAPING file {f}: rule 2"):
        Policy.from_env({"MXQ_SHAPING": str(f)})
    with pytest.raises(ValueError, match="cannot read the rules file"):
        Policy.from_env({"MXQ_SHAPING": str(tmp_path / "missing.conf")})


# ====================================================================== the scripts (real Redis)
@pytest.fixture
def redis_client(redis_server):
    srv = redis_server()
    client = srv.client()
    yield client
    client.close()


def _ready(client, lane: str, n: int, pending: int = 0):
    client.rpush(f"mxq:ready:{lane}", *[f"job{i}|{lane}|0" for i in range(n)])
    if pending:
        client.hset("mxq:pending", lane, pending)


def _redis_now(client) -> float:
    s, us = client.time()
    return s + us / 1e6


def test_rate_grants_the_bucket_then_refuses_with_the_wait(redis_client):
    r = redis_client
    sh = Shaper(r, Policy.parse("r.example=*c,10/s,burst=3"))
    _ready(r, "r.example", 10, pending=2)
    g = sh.acquire("r.example", "t1", 16, now=1000.0)
    assert (g.granted, g.reason, g.slot) == (3, "ok", False)       # the bucket, not the batch size
    assert r.hget("mxq:pending", "r.example") == b"1"                # the task started: not pending
    g = sh.acquire("r.example", "t2", 16, now=1000.0)
    assert (g.granted, g.reason) == (0, "rate")
    assert 0 < g.wait <= 0.1                                          # the next token: 1/10 s
    # refused: the task is no longer pending, the lane waits in mxq:throttled, the work stays ready
    assert r.hget("mxq:pending", "r.example") is None
    assert r.zscore(THROTTLED, "r.example") == pytest.approx(1000.0 + g.wait)
    assert r.llen("mxq:ready:r.example") == 10
    assert r.zscore("mxq:dispatch", "r.example") == 1000.0


def test_rate_holds_over_time_on_redis_time(redis_client):
    r = redis_client
    sh = Shaper(r, Policy.parse("r.example=*c,50/s,burst=5"))
    _ready(r, "r.example", 1000)
    start = _redis_now(r)
    granted = 0
    while _redis_now(r) - start < 1.0:
        granted += sh.acquire("r.example", "t", 4, now=time.time()).granted
        time.sleep(0.003)
    elapsed = _redis_now(r) - start
    # GCRA: at most rate * elapsed + burst; and not much less (polled every few ms)
    assert granted <= 50 * elapsed + 5
    assert granted >= 50 * 1.0 - 3


def test_grant_is_capped_by_ready_work_and_unused_tokens_are_refunded(redis_client):
    r = redis_client
    sh = Shaper(r, Policy.parse("r.example=*c,1/m,burst=5"))
    _ready(r, "r.example", 2)
    assert sh.acquire("r.example", "a", 16, now=0).granted == 2       # only 2 ready: 2 tokens
    r.rpush("mxq:ready:r.example", "x|r.example|0", "y|r.example|0", "z|r.example|0", "w|r.example|0")
    assert sh.acquire("r.example", "b", 16, now=0).granted == 3       # 5 - 2 left
    assert sh.acquire("r.example", "c", 16, now=0).reason == "rate"
    sh.refund("r.example", 2)
    assert sh.acquire("r.example", "d", 16, now=0).granted == 2
    assert r.pttl(tat_key("r.example")) > 0                           # the state expires when idle


def test_empty_lane_is_not_throttled(redis_client):
    r = redis_client
    sh = Shaper(r, Policy.parse("default=1c,1/s"))
    r.hset("mxq:pending", "e.example", 1)
    g = sh.acquire("e.example", "t", 16, now=5.0)
    assert (g.granted, g.reason) == (0, "empty")
    assert r.hget("mxq:pending", "e.example") is None                # no zero left behind
    assert r.zcard(THROTTLED) == 0 and r.zcard(slots_key("e.example")) == 0


def test_concurrency_slots(redis_client):
    r = redis_client
    sh = Shaper(r, Policy.parse("c.example=2c"), slot_ttl=30)
    _ready(r, "c.example", 10)
    a = sh.acquire("c.example", "a", 1, now=0)
    b = sh.acquire("c.example", "b", 1, now=0)
    assert (a.granted, a.slot, b.granted, b.slot) == (1, True, 1, True)
    c = sh.acquire("c.example", "c", 1, now=0)
    assert (c.granted, c.reason, c.wait) == (0, "concurrency", BACKSTOP)
    assert r.zscore(THROTTLED, "c.example") == BACKSTOP
    assert sh.holders("c.example") == 2
    sh.release("c.example", "a")
    assert sh.acquire("c.example", "c", 1, now=0).granted == 1
    assert set(r.zrange(slots_key("c.example"), 0, -1)) == {b"b", b"c"}
    # no concurrency limit: no slot is taken at all
    free = Shaper(r, Policy.parse("default=*c"))
    _ready(r, "f.example", 5)
    g = free.acquire("f.example", "z", 3, now=0)
    assert (g.granted, g.slot) == (3, False) and r.exists(slots_key("f.example")) == 0


def test_slot_of_a_dead_holder_expires_and_renewal_keeps_a_live_one(redis_client):
    r = redis_client
    # 1 s: a renewal every 0.25 s keeps the slot even when a loaded machine stalls this process
    # for most of a second between two of them.
    ttl = 1.0
    sh = Shaper(r, Policy.parse("c.example=1c"), slot_ttl=ttl)
    _ready(r, "c.example", 10)
    assert sh.acquire("c.example", "live", 1, now=0).slot
    # the holder renews (its heartbeat): nobody else gets in for well past the ttl
    until = time.monotonic() + 3 * ttl
    while time.monotonic() < until:
        renewed = time.monotonic()          # the slot's new expiry is at least ttl after this
        assert sh.renew("c.example", "live")
        assert sh.acquire("c.example", "other", 1, now=0).reason == "concurrency"
        time.sleep(ttl / 4)
    # the holder "dies" (no more renewals, no release): its slot expires on Redis time, a ttl
    # after its last renewal (not after the loop ended: the last sleep may have overslept)
    wait_until(lambda: sh.acquire("c.example", "other", 1, now=0).granted, 5, "the dead holder's slot to expire")
    assert time.monotonic() - renewed >= ttl * 0.7
    assert not sh.renew("c.example", "live")                        # it knows it lost the slot
    assert r.zrange(slots_key("c.example"), 0, -1) == [b"other"]


def test_scheduler_tick_redispatches_a_throttled_lane_when_due(redis_client):
    r = redis_client
    ps = PipelineSettings(batch_size=4, domain_concurrency=3, dispatch_stale=1e6)  # no "quiet lane" re-dispatch
    store = Store(r, ps)
    sh = Shaper(r, Policy.parse("t.example=*c,1/h,burst=1"))
    _ready(r, "t.example", 10, pending=1)
    assert sh.acquire("t.example", "a", 4, now=100.0).granted == 1
    r.lpop("mxq:ready:t.example")           # as the claim would
    g = sh.acquire("t.example", "b", 4, now=100.0)
    assert g.reason == "rate" and 3590 < g.wait <= 3600
    assert r.hget("mxq:pending", "t.example") is None
    due = 100.0 + g.wait
    early = store.tick(now=due - 1, limit=100)
    assert ("t.example", 3) not in early.dispatch and r.zscore(THROTTLED, "t.example") == pytest.approx(due)
    late = store.tick(now=due + 0.01, limit=100)
    assert ("t.example", 3) in late.dispatch                         # min(ceil(9/4), 3) tasks
    assert r.zcard(THROTTLED) == 0 and r.hget("mxq:pending", "t.example") == b"3"


# ====================================================================== across real workers
class SessionCounter:
    """Simultaneous SMTP sessions at one server, counted server side.

    A session is open from the connection to QUIT (or the connection's end):
    the client gives its slot back only after the 221, so a slot handed on
    is never seen as two sessions.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.open: set[int] = set()
        self.max = 0
        self.total = 0

    def opened(self, key: int):
        with self.lock:
            self.open.add(key)
            self.total += 1
            self.max = max(self.max, len(self.open))

    def closed(self, key: int):
        with self.lock:
            self.open.discard(key)

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


def _server(last: int, name: str, counter: SessionCounter | None = None, **behaviour):
    b = Behaviour(hostname=name, keep_content=False, size_limit=None, **behaviour)
    return start_server(IP + str(last), 25, b, protocol=counter.protocol() if counter else None)


ZONES = {
    "conc.shape.test": {"MX": [[10, "mx.conc.shape.test"]]},
    "free.shape.test": {"MX": [[10, "mx.free.shape.test"]]},
    "rate.shape.test": {"MX": [[10, "mx.rate.shape.test"]]},
    "fast.shape.test": {"MX": [[10, "mx.fast.shape.test"]]},
    "slow.shape.test": {"MX": [[10, "mx.slow.shape.test"]]},
    "mx.conc.shape.test": {"A": [IP + "10"]},
    "mx.free.shape.test": {"A": [IP + "11"]},
    "mx.rate.shape.test": {"A": [IP + "12"]},
    "mx.fast.shape.test": {"A": [IP + "13"]},
    "mx.slow.shape.test": {"A": [IP + "14"]},
}


@pytest.fixture(scope="module")
def zones(dns_server):
    dns_server.add(ZONES)


def _message(i: int, to: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: shaping {i}\r\n"
            f"Message-ID: <s.{i}.{to}>\r\n\r\nbody {i}\r\n").encode()


def _submit(addresses: list[str]) -> list[str]:
    return tasks.submit_many([tasks.Item(_message(i, a), sender=SENDER, recipients=[a])
                              for i, a in enumerate(addresses)])


def test_concurrency_limit_holds_across_two_workers(pipeline, zones):
    shaped, free = SessionCounter(), SessionCounter()
    # Each message holds its connection 0.1 s at the final dot, so tasks overlap.
    conc = _server(10, "mx.conc.shape.test", shaped, delays={"data_final": 0.1})
    other = _server(11, "mx.free.shape.test", free, delays={"data_final": 0.1})
    try:
        p = pipeline(MXQ_SHAPING="default=20c; conc.shape.test=2c", MXQ_BATCH_SIZE="2",
                     MXQ_DOMAIN_CONCURRENCY="6")
        p.worker(concurrency=2)
        p.worker(concurrency=2)              # 2 processes x 2 children: 4 deliveries at once
        p.beat()
        rcpts = [f"u{i}@conc.shape.test" for i in range(40)] + [f"v{i}@free.shape.test" for i in range(40)]
        ids = _submit(rcpts)
        p.wait_done(ids, timeout=60)
        assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)
        assert len(conc.messages) == 40 and len(other.messages) == 40
        print(f"simultaneous sessions: shaped max {shaped.max} (limit 2) over {shaped.total} sessions, "
              f"unshaped max {free.max} over {free.total}")
        assert shaped.max <= 2                  # the limit held, counted at the server
        assert shaped.max == 2                  # and was used
        assert free.max >= 3                    # the workers could have gone further (the other domain did)
        assert "held back by shaping (concurrency)" in p.logs()
        client = p.redis.client()
        wait_until(lambda: client.zcard(slots_key("conc.shape.test")) == 0, 10, "every slot given back")
    finally:
        conc.stop()
        other.stop()


def test_rate_limit_holds_and_other_domains_keep_flowing(pipeline, zones):
    rate, burst, n = 20.0, 20, 120
    shaped = _server(12, "mx.rate.shape.test")
    fast = _server(13, "mx.fast.shape.test")
    try:
        p = pipeline(MXQ_SHAPING=f"rate.shape.test={rate:g}/s")      # burst: one second's worth
        p.worker(concurrency=2)
        p.worker(concurrency=2)
        p.beat()
        started = time.time()
        ids = _submit([f"r{i}@rate.shape.test" for i in range(n)])
        others = _submit([f"f{i}@fast.shape.test" for i in range(60)])
        p.wait_done(others, timeout=30)
        others_done = time.time()
        shaped_then = len(shaped.messages)
        p.wait_done(ids, timeout=60)
        times = sorted(m.received_at for m in shaped.messages)
        assert len(times) == n
        # The unshaped domain was not held up behind the shaped one.
        assert shaped_then < n - burst, (shaped_then, others_done - started)
        assert others_done - started < (n - burst) / rate

        # The rate, from the server's timestamps: in every window of W seconds at most
        # rate * W * 1.1 + burst messages; over the whole run at most rate * 1.1 after the burst.
        window = 4.0
        worst = max(sum(1 for u in times if t <= u < t + window) for t in times)
        span = times[-1] - times[0]
        overall = (n - burst) / span
        print(f"rate limit {rate:g}/s burst {burst}: worst {window:g} s window {worst} messages "
              f"(bound {rate * window * 1.1 + burst:.0f}), {overall:.1f}/s over {span:.1f} s "
              f"after the burst; unshaped domain done {others_done - started:.1f} s after submission "
              f"with {shaped_then}/{n} of the shaped one sent")
        assert worst <= rate * window * 1.1 + burst
        assert overall <= rate * 1.1
        assert overall >= rate * 0.5            # held to the rate, not starved far below it
        assert "held back by shaping (rate)" in p.logs()
    finally:
        shaped.stop()
        fast.stop()


def test_slot_outlives_the_lease_while_delivering_and_frees_when_the_worker_dies(pipeline, zones):
    sessions = SessionCounter()
    slow = _server(14, "mx.slow.shape.test", sessions, delays={"data_final": 2.0})
    try:
        # lease (and slot ttl) 1 s, each message takes 2 s: only the heartbeat keeps the slot
        p = pipeline(MXQ_SHAPING="slow.shape.test=1c", MXQ_BATCH_SIZE="1", MXQ_LEASE_SECONDS="1",
                     MXQ_DISPATCH_STALE="1", MXQ_COMMAND_TIMEOUT="10")
        w1 = p.worker(concurrency=2)
        p.beat()
        ids = _submit([f"s{i}@slow.shape.test" for i in range(3)])
        client = p.redis.client()
        # The second transaction has begun (its MAIL) and its message is not in yet (recorded after the
        # 2 s final-dot delay): its delivery holds the slot now.  ("A message in and a session open"
        # was also true in the first session's tail, after its 250 and before its QUIT and release.)
        wait_until(lambda: len(slow.messages) == 1 and slow.stats["mail"] >= 2 and sessions.open, 20,
                   "a second message under way")
        holder = client.zrange(slots_key("slow.shape.test"), 0, -1)
        assert len(holder) == 1
        w1.kill()                             # SIGKILL: no release, no more renewals
        w2 = p.worker(concurrency=2)
        p.wait_done(ids, timeout=40)
        assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)
        assert sessions.max == 1              # never two connections, through renewals and the kill
        # the last task gives its slot back (or parks it with its idle connection) just after the
        # outcome is recorded
        wait_until(lambda: client.zcard(slots_key("slow.shape.test")) == 0, 10, "the last slot given back")
        assert w2.running
    finally:
        slow.stop()


def test_worker_refuses_to_start_with_bad_rules(pipeline):
    p = pipeline(MXQ_SHAPING="default=20c; gmail.com=5c,50/q")
    with pytest.raises(RuntimeError) as e:
        p.worker(concurrency=1)
    assert "mxq: MXQ_SHAPING: rule 2 ('gmail.com=5c,50/q'): '50/q': the rate's unit must be" in str(e.value)

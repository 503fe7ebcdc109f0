"""The Redis state store (mxq.tasks.store) against a real redis-server: the Lua scripts'
contracts -- atomic submit, claim under lease, renew, release with the final-state
guard, deferred queue, scheduler tick, dispatch bookkeeping and the producer's validation.

No Celery here: the tasks are exercised in test_pipeline*.py.
"""

from __future__ import annotations

import json
from email.message import EmailMessage

import pytest

from mxq import tasks
from mxq.tasks.settings import PipelineSettings, parse_schedule
from mxq.tasks.store import Outcome, Store, make_client
from mxq.tasks.producer import build_job, Item, status_of

NOW = 1_000_000.0


def unit_store(srv) -> Store:
    """A store on ``srv`` with the small limits the store-level tests count on (batches of 3, ...)."""
    s = PipelineSettings(redis_url=srv.url, lease_seconds=30, dispatch_stale=60, batch_size=3,
                         domain_concurrency=2, retry_schedule=(10, 20), max_lifetime=100, result_ttl=500)
    return Store(make_client(srv.url), s)


@pytest.fixture
def store(redis_server):
    st = unit_store(redis_server())
    yield st
    st.r.close()


def msg(n=0, to=("a@one.test",)):
    m = EmailMessage()
    m["From"] = "sender@src.test"
    m["To"] = ", ".join(to)
    m["Subject"] = f"m{n}"
    m.set_content(f"body {n}\n")
    return m


def job(n=0, to=("a@one.test",), key=None):
    return build_job(Item(msg(n, to), idempotency_key=key), max_size=10**6, now=NOW)


def keys(st):
    return sorted(k.decode() for k in st.r.keys("*"))


def test_submit_stores_once_and_splits_by_domain(store):
    j = job(to=("a@one.test", "B@ONE.test", "c@two.test", "d@Bücher.example"))
    ids, disp = store.submit([j], now=NOW)
    assert ids == [j.id]
    # one lane per normalised domain, one deliver task each (ceil(1/3) = 1)
    assert sorted(disp) == [("one.test", 1), ("two.test", 1), ("xn--bcher-kva.example", 1)]
    assert store.r.lrange("mxq:ready:one.test", 0, -1) == [f"{j.id}|one.test|0,1".encode()]
    assert store.content(j.id) == j.content
    assert store.r.keys(f"*{j.id}*") == [f"mxq:job:{j.id}".encode()]     # one key per job
    meta, recs = store.job(j.id)
    assert meta["left"] == "4" and meta["n"] == "4"
    assert [r["state"] for r in recs.values()] == ["queued"] * 4
    assert recs[3]["domain"] == "xn--bcher-kva.example"
    st = status_of(j.id, meta, recs)
    assert st["state"] == "queued" and len(st["recipients"]) == 4
    assert set(st["recipients"][0]) == {"address", "domain", "state", "code", "enhanced", "text", "exchange",
                                        "ip", "relay", "attempts", "first_attempt", "last_attempt",
                                        "next_attempt"}


def test_dispatch_counts_pending_tasks_up_to_the_window(store):
    # batch_size 3, latency unknown: a task per 3 items, at most the initial window (5) at once.
    jobs = [job(i) for i in range(20)]
    _, disp = store.submit(jobs[:4], now=NOW)
    assert disp == [("one.test", 2)]                # ceil(4/3)
    _, disp = store.submit(jobs[4:7], now=NOW)
    assert disp == [("one.test", 1)]                # ceil(7/3) = 3, two already published
    _, disp = store.submit(jobs[7:], now=NOW)
    assert disp == [("one.test", 2)]                # ceil(20/3) = 7, but the window is 5
    assert store.r.hget("mxq:pending", "one.test") == b"5"
    # a task starting (its acquire) is no longer pending; its claims leave the count alone
    g = store.dest.acquire("one.test", "t1", 3, concurrency=20, interval=0, bucket=1, slot_ttl=30, backstop=1,
                           now=NOW)
    assert (g.granted, g.mode, g.slot, g.window) == (3, "deliver", True, 5)
    assert store.r.hget("mxq:pending", "one.test") == b"4"
    items = store.claim("one.test", "t1.1", now=NOW)
    assert len(items) == 3 and store.r.hget("mxq:pending", "one.test") == b"4"
    # the running task counts too: 17 ready want 5 tasks, 4 pending + 1 running
    assert store.dest.state("one.test")["run"] == 1
    _, disp = store.submit([job(99)], now=NOW)
    assert disp == []


def test_idempotency_key_returns_existing_job(store):
    a, b = job(1, key="k-1"), job(2, key="k-1")
    (ida,), _ = store.submit([a], now=NOW)
    (idb,), disp = store.submit([b], now=NOW)
    assert ida == idb == a.id and disp == []
    assert store.r.exists(f"mxq:job:{b.id}") == 0 and store.r.get(f"mxq:idem:{a.idem}") == a.id.encode()
    # re-running the same script (a retried call) stores nothing twice
    c, d = job(3), job(4, key="k-2")
    first, _ = store.submit([b, c, d], now=NOW)
    again, disp = store.submit([b, c, d], now=NOW)
    assert first == again == [a.id, c.id, d.id] and disp == []
    assert store.r.llen("mxq:ready:one.test") == 3


def test_claim_lease_release_and_final_guard(store):
    j = job(to=("a@one.test", "b@one.test"))
    store.submit([j], now=NOW)
    (it,) = store.claim("one.test", "tok", now=NOW)
    assert it.job == j.id and it.indexes == ["0", "1"] and it.content == j.content
    assert it.meta["sender"] == "sender@src.test" and [r["address"] for r in it.records] == ["a@one.test", "b@one.test"]
    assert store.r.zscore("mxq:lease", "tok") == NOW + 30
    assert store.r.get("mxq:batch:tok") == f"one.test\n{it.wid}".encode()
    assert store.r.llen("mxq:ready:one.test") == 0
    # renew only what a token holds
    assert store.renew("other", now=NOW + 10) is False and store.r.zcard("mxq:lease") == 1
    assert store.renew("tok", now=NOW + 10) is True
    assert store.r.zscore("mxq:lease", "tok") == NOW + 40
    delivered = dict(it.records[0], state="delivered", code=250)
    deferred = dict(it.records[1], state="deferred", code=451)
    applied, _ = store.release("tok", "one.test", [Outcome(it.wid, [("0", delivered, ""), ("1", deferred, "")],
                                                           due=NOW + 10)], now=NOW + 1)
    assert sorted(applied) == [f"{j.id}|0", f"{j.id}|1"]
    assert store.r.zcard("mxq:lease") == 0 and store.r.get("mxq:batch:tok").startswith(b"\n")    # its reply now
    assert store.r.zscore("mxq:deferred", it.wid) == NOW + 10
    assert store.r.hget(f"mxq:job:{j.id}", "left") == b"1"
    # the same release again (its reply lost, redis-py's retry): the same answer, nothing twice
    again, _ = store.release("tok", "one.test", [Outcome(it.wid, [("0", delivered, ""), ("1", deferred, "")],
                                                         due=NOW + 10)], now=NOW + 1)
    assert sorted(again) == [f"{j.id}|0", f"{j.id}|1"] and store.r.hget(f"mxq:job:{j.id}", "left") == b"1"
    # a later writer without the lease cannot overwrite the final state
    applied, _ = store.release("late", "one.test", [Outcome(it.wid, [("0", dict(deferred), "")])], now=NOW + 2)
    assert applied == []
    assert json.loads(store.r.hget(f"mxq:job:{j.id}", "r:0"))["state"] == "delivered"


def test_job_done_sets_ttl_on_every_key(store):
    j = job(key="done-key")
    store.submit([j], now=NOW)
    (it,) = store.claim("one.test", "tok", now=NOW)
    store.release("tok", "one.test", [Outcome(it.wid, [("0", dict(it.records[0], state="bounced"), "bounced")],
                                              idem=it.meta["idem"])], now=NOW + 1)
    for k in (f"mxq:job:{j.id}", f"mxq:idem:{j.idem}"):
        assert 0 < store.r.ttl(k) <= 500, k
    meta, recs = store.job(j.id)
    assert status_of(j.id, meta, recs)["state"] == "done"
    # the bounce queued one report item on the report lane, with a task for it
    assert store.r.lrange("mxq:ready:!r", 0, -1) == [f"!r|{j.id}|0|bounced".encode()]
    assert store.claim("!r", "rt", now=NOW + 2) == [f"!r|{j.id}|0|bounced"]
    assert store.r.zscore("mxq:lease", "rt") is not None
    store.release("rt", "!r", [Outcome(f"!r|{j.id}|0|bounced")], now=NOW + 3)
    assert store.r.zcard("mxq:lease") == 0 and store.r.llen("mxq:ready:!r") == 0


def _start(store, lane, token, now):
    """What a delivery task does first: its acquire (a slot, no longer pending)."""
    return store.dest.acquire(lane, token, 3, concurrency=20, interval=0, bucket=1, slot_ttl=30, backstop=1,
                              now=now)


def test_tick_requeues_expired_leases_and_moves_due_items(store):
    a, b = job(1), job(2)
    store.submit([a, b], now=NOW)
    _start(store, "one.test", "tb", NOW)
    (ib,) = store.claim("one.test", "tb", now=NOW, limit=1)
    (ia,) = store.claim("one.test", "ta", now=NOW, limit=1)
    # b's worker releases it as deferred until NOW+10 and ends (its slot given back);
    # a's worker dies (lease expires at NOW+30)
    store.release("tb", "one.test", [Outcome(ib.wid, [("0", dict(ib.records[0], state="deferred"), "")],
                                             due=NOW + 10)], now=NOW + 1)
    store.dest.release("one.test", "tb", now=NOW + 1)
    t = store.tick(now=NOW + 5)
    assert (t.requeued, t.moved) == (0, 0)
    t = store.tick(now=NOW + 11)
    assert (t.requeued, t.moved) == (0, 1) and t.dispatch == [("one.test", 1)]
    t = store.tick(now=NOW + 31)
    assert (t.requeued, t.moved) == (1, 0)
    # the expired lease went to the front, the due item to the back
    assert store.r.lrange("mxq:ready:one.test", 0, -1) == [ia.wid.encode(), ib.wid.encode()]
    assert not store.r.exists("mxq:batch:ta")
    # the dead worker's late release cannot schedule the requeued item
    store.release("ta", "one.test", [Outcome(ia.wid, [], due=NOW + 99)], now=NOW + 32)
    assert store.r.zscore("mxq:deferred", ia.wid) is None
    # two schedulers ticking at once: the second finds nothing to move
    assert store.tick(now=NOW + 40).requeued == 0


def test_quiet_lane_is_redispatched(store):
    store.submit([job(1)], now=NOW)
    assert store.tick(now=NOW + 30).dispatch == []          # task published 30 s ago: still fresh
    assert store.tick(now=NOW + 61).dispatch == [("one.test", 1)]   # lost? publish again
    assert store.tick(now=NOW + 62).dispatch == []


def test_quiet_lane_is_not_redispatched_while_its_tasks_wait_in_the_broker(store):
    """10,000 lanes woken at once take minutes to drain: a lane whose task still waits in the
    broker's queue is not lost, and publishing it again every minute would flood that queue."""
    store.submit([job(1), job(2, to=("b@two.test",))], now=NOW)
    store.r.rpush("mxq.delivery", b"{task one.test}", b"{task two.test}")   # the published wake-ups, queued
    assert store.tick(now=NOW + 61).dispatch == []
    assert store.tick(now=NOW + 200).dispatch == []
    store.r.delete("mxq.delivery")                                         # drained: one may have been lost
    assert sorted(store.tick(now=NOW + 201).dispatch) == [("one.test", 1), ("two.test", 1)]
    # intake likewise, on its own queue
    a = job(3, to=("x@one.test",))
    store.submit([a], split=False, now=NOW + 201)
    store.r.rpush("mxq.intake", b"{mxq.intake}")
    assert store.tick(now=NOW + 300).intake == []
    store.r.delete("mxq.intake")
    assert store.tick(now=NOW + 301).intake == [a.id]


def test_intake_mode_splits_once(store):
    a = job(1, to=("x@one.test", "y@two.test"))
    ids, disp = store.submit([a], split=False, now=NOW)
    assert disp == [] and store.r.zscore("mxq:intake", a.id) == NOW
    assert store.tick(now=NOW + 61).intake == [a.id]        # a lost mxq.intake is re-published
    assert sorted(store.intake([a.id], now=NOW + 62)) == [("one.test", 1), ("two.test", 1)]
    assert store.intake([a.id], now=NOW + 63) == []
    assert store.r.llen("mxq:ready:one.test") == 1


def test_invalid_submission_writes_nothing(redis_server, monkeypatch):
    srv = redis_server()
    monkeypatch.setenv("MXQ_REDIS_URL", srv.url)
    monkeypatch.setenv("MXQ_MAX_MESSAGE_SIZE", "2000")
    client = srv.client()
    bad = [
        (msg(), {"recipients": ["bad\r\nRCPT TO:<x@y.test>"]}, "CR or LF"),
        (msg(), {"recipients": ["no-at-sign"]}, "local part and a domain"),
        (msg(), {"sender": "a@b.test\nX: y"}, "CR or LF"),
        (b"From: a@b.test\r\nTo: c@d.test\r\n\r\n" + b"x" * 3000 + b"\r\n", {}, "larger than the limit"),
        (b"no headers at all", {"recipients": ["c@d.test"]}, ""),
    ]
    for m, kw, reason in bad:
        with pytest.raises(tasks.InvalidMessage) as e:
            tasks.submit(m, **kw)
        assert reason in e.value.reason
    with pytest.raises(tasks.InvalidMessage) as e:
        tasks.submit_many([msg(1), {"message": msg(2), "recipients": ["x@@y.test"]}, msg(3)])
    assert e.value.reason.startswith("item 1:") and e.value.index == 1
    assert client.dbsize() == 0


def test_run_forever_moves_due_work_and_publishes(redis_server, monkeypatch):
    import threading

    from mxq.tasks.app import rebind
    from mxq.tasks.scheduler import run_forever
    from tests.fixtures_infra import wait_until

    srv = redis_server()
    monkeypatch.setenv("MXQ_REDIS_URL", srv.url)
    rebind(srv.url)
    st = Store(make_client(srv.url), PipelineSettings.from_env())
    j = job(1)
    st.submit([j], now=NOW)
    _start(st, "one.test", "tok", NOW)
    (it,) = st.claim("one.test", "tok", now=NOW)
    st.release("tok", "one.test", [Outcome(it.wid, [("0", dict(it.records[0], state="deferred"), "")], due=NOW + 1)],
               now=NOW)
    st.dest.release("one.test", "tok", now=NOW)
    st.r.delete("mxq.delivery")                       # the submit's wake-up task; we want the scheduler's
    stop = threading.Event()
    t = threading.Thread(target=run_forever, kwargs={"interval": 0.1, "stop": stop}, daemon=True)
    t.start()
    try:
        wait_until(lambda: st.r.llen("mxq.delivery") >= 1, 10, "a deliver task published by the scheduler")
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert st.r.lrange("mxq:ready:one.test", 0, -1) == [it.wid.encode()]
    body = json.loads(st.r.lindex("mxq.delivery", 0))
    assert body["headers"]["task"] == "mxq.deliver" and body["headers"]["argsrepr"] == "['one.test']"


def test_submit_forms_and_dsn_options(redis_server, monkeypatch, tmp_path):
    from mxq.tasks.app import rebind

    srv = redis_server()
    monkeypatch.setenv("MXQ_REDIS_URL", srv.url)
    rebind(srv.url)
    m = msg(7, to=("Ann <ann@one.test>",))
    m["Bcc"] = "hidden@two.test"
    path = tmp_path / "m.eml"
    path.write_bytes(bytes(m))
    a = tasks.submit(m, dsn={"ret": "hdrs", "envid": "E-1"}, notify=("FAILURE", "DELAY"))
    b = tasks.submit(path)                   # a pathlib.Path
    with open(path, "rb") as f:
        c = tasks.submit(f, sender="")       # an opened file; the null sender
    client = srv.client()
    for jid in (a, b, c):
        st = tasks.status(jid)
        assert st["state"] == "queued"
        assert [r["address"] for r in st["recipients"]] == ["ann@one.test", "hidden@two.test"]
        content = client.hget(f"mxq:job:{jid}", "c")
        assert b"Subject: m7" in content and b"hidden@two.test" not in content      # Bcc removed
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"mxq:job:{a}").items() if k != b"c"}
    assert (meta["ret"], meta["envid"], meta["sender"]) == ("HDRS", "E-1", "sender@src.test")
    rec = json.loads(meta["r:0"])
    assert rec["notify"] == ["FAILURE", "DELAY"] and rec["orcpt"] == "ann@one.test"
    assert client.hget(f"mxq:job:{c}", "sender") == b""
    # one deliver task per lane for the three jobs: two lanes, each woken once
    assert client.llen("mxq.delivery") == 2


def test_settings_from_env_and_backoff():
    s = PipelineSettings.from_env({"MXQ_RETRY_SCHEDULE": "1, 5,30", "MXQ_MAX_LIFETIME": "3",
                                   "MXQ_LEASE_SECONDS": "2.5", "MXQ_REDIS_URL": "redis://r.example:1/2"})
    assert s.retry_schedule == (1, 5, 30) and s.max_lifetime == 3 and s.lease_seconds == 2.5
    assert s.redis_url == "redis://r.example:1/2"
    assert [s.backoff(n) for n in (1, 2, 3, 4, 10)] == [1, 5, 30, 30, 30]      # the last step repeats
    d = PipelineSettings.from_env({})
    assert d.retry_schedule == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert (d.max_lifetime, d.result_ttl, d.redis_url) == (432000, 604800, "redis://127.0.0.1:6379/0")
    for bad in ({"MXQ_RETRY_SCHEDULE": "1,x"}, {"MXQ_RETRY_SCHEDULE": "0"}, {"MXQ_BATCH_SIZE": "-1"},
                {"MXQ_LEASE_SECONDS": "soon"}, {"MXQ_TASK_SOFT_LIMIT": "10", "MXQ_TASK_HARD_LIMIT": "5"}):
        with pytest.raises(ValueError):
            PipelineSettings.from_env(bad)
    assert parse_schedule("60") == (60.0,)


def test_redis_host_status(redis_server):
    from mxq.tasks.hoststatus import RedisHostStatus

    srv = redis_server()
    hs = RedisHostStatus(srv.client())
    assert hs.is_down("127.0.0.9", 25) is False
    hs.mark_down("127.0.0.9", 25, 2.2, "Connection refused")
    assert hs.is_down("127.0.0.9", 25) and not hs.is_down("127.0.0.9", 587)
    assert hs.reason("127.0.0.9", 25) == "Connection refused"
    assert 2 <= srv.client().ttl("mxq:down:127.0.0.9:25") <= 3          # SET EX: expires by itself
    # another worker (another client) sees the same memory
    assert RedisHostStatus(srv.client()).is_down("127.0.0.9", 25)
    # Redis gone: the failure memory is an optimisation, never an error
    srv.stop()
    gone = RedisHostStatus(srv.client(socket_connect_timeout=0.5, retry=None))
    assert gone.is_down("127.0.0.9", 25) is False
    gone.mark_down("127.0.0.9", 25, 5, "x")

"""Every state-changing store script is safe to run twice (issue 9, finding 1).

A reply lost after Redis ran a script (a reset connection, a read timeout)
makes redis-py send the same EVALSHA again.  Here the store's client runs
every EVALSHA twice and hands the caller the second reply -- exactly what a
retried call does -- and the state must be what one run leaves.  Real
redis-server; the pipeline-level fault (a proxy losing the answers) is in
test_store_faults.py.
"""

from __future__ import annotations

import time

import pytest

from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import CLAIM_BYTES, Outcome, Store, make_client
from tests.test_store import NOW, job, unit_store

LANE = "one.test"


@pytest.fixture
def twice(redis_server):
    """A store whose every script call runs twice in Redis; the caller sees the second reply."""
    st = unit_store(redis_server())
    once = st.r.evalsha
    runs = []

    def evalsha(sha, numkeys, *args):
        once(sha, numkeys, *args)
        runs.append(sha)
        return once(sha, numkeys, *args)

    st.r.evalsha = evalsha
    st.runs = runs
    yield st
    st.r.close()


def test_a_retried_claim_returns_the_same_batch_and_pops_nothing_more(twice):
    jobs = [job(i) for i in range(7)]
    twice.submit(jobs, now=NOW)
    first = twice.claim(LANE, "t.1", now=NOW)
    assert [it.job for it in first] == [j.id for j in jobs[:3]]
    assert twice.r.llen(f"mxq:ready:{LANE}") == 4                    # popped once, not twice
    assert twice.r.get("mxq:batch:t.1").split(b"\n")[1:] == [it.wid.encode() for it in first]
    assert [it.content for it in first] == [j.content for j in jobs[:3]]
    second = twice.claim(LANE, "t.2", now=NOW)
    assert [it.job for it in second] == [j.id for j in jobs[3:6]]
    assert twice.runs                                                  # the scripts did run twice


def test_retried_record_release_tick_and_shaping_scripts_change_nothing_more(twice):
    jobs = [job(i, to=("a@one.test", "b@one.test")) for i in range(6)]
    twice.submit(jobs, now=NOW)
    assert twice.r.hget("mxq:pending", LANE) == b"2"
    # acquire: the task is no longer pending (once), three rate tokens taken (once)
    g = twice.dest.acquire(LANE, "t", 3, concurrency=20, interval=1.0, bucket=10, slot_ttl=30, backstop=1,
                           now=NOW)
    assert g.granted == 3 and g.slot
    assert twice.r.hget("mxq:pending", LANE) == b"1"
    tat = float(twice.r.get(f"mxq:shape:tat:{LANE}"))
    assert tat - time.time() < 3.5
    items = twice.claim(LANE, "t.1", now=NOW)
    a, b, c = items
    # record: one recipient of a delivered, counted down once
    delivered = dict(a.records[0], state="delivered", code=250)
    applied, _ = twice.record("t.1", LANE, [Outcome(a.wid, [("0", delivered, "")])], now=NOW)
    assert applied == [f"{a.job}|0"]
    assert twice.r.hget(f"mxq:job:{a.job}", "left") == b"1"
    # release: b delivered, c deferred with a delay report: one report, one deferred entry
    applied, dispatch, _ = twice.finish("t.1", LANE, [
        Outcome(b.wid, [("0", dict(b.records[0], state="delivered"), ""),
                        ("1", dict(b.records[1], state="delivered"), "")]),
        Outcome(c.wid, [("0", dict(c.records[0], state="deferred"), "delayed")], due=NOW + 10)], now=NOW)
    assert sorted(applied) == sorted([f"{b.job}|0", f"{b.job}|1", f"{c.job}|0"])
    assert ("!r", 1) in dispatch
    assert twice.r.hget(f"mxq:job:{b.job}", "left") == b"0"
    assert twice.r.llen("mxq:ready:!r") == 1
    assert twice.r.zcard("mxq:deferred") == 1 and twice.r.zcard("mxq:lease") == 0
    # tick: the expired lease of another batch is put back once, and the answer says so
    twice.claim(LANE, "t.2", now=NOW)
    assert twice.r.llen(f"mxq:ready:{LANE}") == 0
    t = twice.tick(now=NOW + 100)
    assert t.requeued == 1 and t.moved == 1 and (LANE, 1) in t.dispatch     # 4 ready, 1 pending
    assert twice.r.llen(f"mxq:ready:{LANE}") == 4
    # the slot given back (the answer says it was held), unused tokens refunded once
    held, _ = twice.dest.release(LANE, "t")
    assert held
    twice.dest.refund(LANE, 2, 1.0)
    assert float(twice.r.get(f"mxq:shape:tat:{LANE}")) == pytest.approx(tat - 2, abs=1e-6)


def test_a_claim_reply_carries_bounded_content(redis_server, monkeypatch):
    """Items whose contents together exceed CLAIM_BYTES: the claim takes what fits (at least one)
    and leaves the rest at the front of the lane (issue 9, finding 7)."""
    import mxq.tasks.store as store_mod

    srv = redis_server()
    st = Store(make_client(srv.url), PipelineSettings(redis_url=srv.url, batch_size=64))
    monkeypatch.setattr(store_mod, "CLAIM_BYTES", 3 * 1024 * 1024)
    assert CLAIM_BYTES == 64 * 1024 * 1024
    big = [job(i) for i in range(5)]
    for j in big:
        j.content = j.content + b"x" * (1024 * 1024 + 1)          # a little over 1 MiB each
    st.submit(big, now=NOW)
    got = st.claim(LANE, "b.1", now=NOW)
    assert [it.job for it in got] == [j.id for j in big[:2]]
    assert sum(len(it.content) for it in got) <= 3 * 1024 * 1024
    assert [w.decode().split("|")[0] for w in st.r.lrange(f"mxq:ready:{LANE}", 0, -1)] == [j.id for j in big[2:]]
    assert st.r.get("mxq:batch:b.1").split(b"\n")[1:] == [it.wid.encode() for it in got]
    # one item larger than the bound still goes (alone)
    monkeypatch.setattr(store_mod, "CLAIM_BYTES", 1000)
    assert [it.job for it in st.claim(LANE, "b.2", now=NOW)] == [big[2].id]
    st.r.close()


def test_a_retried_claim_returns_its_batch_when_a_hold_or_suspension_came_in_between(redis_server):
    """The same claim sent again after its reply was lost, with ``mxq queue hold`` of one of its jobs
    and ``mxq queue suspend`` of its lane in between: it answers the batch it leased and parks
    nothing (a parked copy of an item in flight would be delivered again once released)."""
    from mxq.tasks.admin import Admin

    srv = redis_server()
    st = Store(make_client(srv.url), PipelineSettings(redis_url=srv.url, batch_size=3, lease_seconds=30))
    admin = Admin(st)
    jobs = [job(i) for i in range(5)]
    st.submit(jobs, now=NOW)
    first = st.claim(LANE, "h.1", now=NOW)
    assert admin.hold_job(first[0].job, now=NOW) == {"held": 1, "parked": 0, "in_flight": 1}
    admin.suspend(LANE, now=NOW)
    again = st.claim(LANE, "h.1", now=NOW)
    assert [(it.wid, it.content) for it in again] == [(it.wid, it.content) for it in first]
    assert st.r.zcard("mxq:held") == 0
    assert st.r.llen(f"mxq:ready:{LANE}") == 2
    # a new claim of the suspended lane takes nothing and leaves no lease behind
    assert st.claim(LANE, "h.2", now=NOW) == []
    assert st.r.zscore("mxq:lease", "h.2") is None and st.r.zscore("mxq:lease", "h.1") is not None
    st.r.close()


def test_retried_hold_release_suspend_and_resume_answer_what_they_did(twice):
    """The operator's scripts run twice answer what the first run did (the second alone would say
    it parked or moved nothing, or that the lane was suspended already)."""
    from mxq.tasks.admin import Admin

    admin = Admin(twice)
    jobs = [job(i) for i in range(4)]
    twice.submit(jobs, now=NOW)
    assert admin.hold_job(jobs[1].id, now=NOW) == {"held": 1, "parked": 1, "in_flight": 0}
    assert twice.r.zcard("mxq:held") == 1 and twice.r.llen(f"mxq:ready:{LANE}") == 3
    released = admin.release_job(jobs[1].id, now=NOW)
    assert (released["was_held"], released["released"], released["moved"]) == (1, 1, 1)
    assert twice.r.zcard("mxq:held") == 0 and twice.r.llen(f"mxq:ready:{LANE}") == 4
    assert admin.suspend(LANE, now=NOW)["replaced"] is False
    assert admin.resume(LANE, now=NOW)[0] is True
    assert twice.runs

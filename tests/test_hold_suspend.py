"""Hold/release (postsuper -h/-H) and suspend/resume (kcli suspend): the operator's queue states.

First the store's contracts against a real redis-server (what may be claimed, dispatched,
expired), then the real pipeline (tests/pipeline_fixtures.py: ``mxq worker``, ``mxq
scheduler``, the ``mxq`` command as a subprocess) delivering to scripted aiosmtpd servers
found through the session's DNS server: a held job is not delivered while the others are and
is delivered once after its release; a suspended domain gets no connection (counted at its
server) while another domain's mail flows, and each of its messages arrives once after
``mxq queue resume`` -- or after the end of ``--duration``.
"""

from __future__ import annotations

import json
import time

import pytest

from mxq import tasks
from mxq.tasks.admin import Admin, parse_duration
from mxq.tasks.store import Outcome, get_store
from tests.fixtures_infra import wait_until
from tests.test_store import NOW, job, store  # noqa: F401 (the store-level tests' fixture)

pytest_plugins = ["tests.pipeline_fixtures"]



def wids(st, key):
    return [w.decode() for w in (st.r.lrange(key, 0, -1) if key.startswith("mxq:ready") else st.r.zrange(key, 0, -1))]


# ------------------------------------------------------------------ store: hold / release
def test_a_held_job_is_parked_never_claimed_and_released_to_the_back(store):
    a, h, b = job(1, ("a@one.test",)), job(2, ("h@one.test", "h@two.test")), job(3, ("b@one.test",))
    store.submit([a, h, b], now=NOW)
    admin = Admin(store)
    assert admin.hold_job(h.id, now=NOW) == {"held": 2, "parked": 2, "in_flight": 0}
    assert wids(store, "mxq:ready:one.test") == [f"{a.id}|one.test|0", f"{b.id}|one.test|0"]
    from mxq.tasks.metrics import RedisCollector
    assert RedisCollector(store.settings.redis_url).depths()[0]["held"] == 2
    assert store.r.llen("mxq:ready:two.test") == 0
    assert sorted(wids(store, "mxq:held")) == sorted([f"{h.id}|one.test|0", f"{h.id}|two.test|1"])
    # a held job stays held whatever the clock: the tick moves nothing, nothing expires
    assert store.tick(now=NOW + 10**6).moved == 0
    # claims of both lanes give everything but the held job
    assert [c.job for c in store.claim("one.test", "t1", limit=10, now=NOW)] == [a.id, b.id]
    assert store.claim("two.test", "t2", limit=10, now=NOW) == []
    listed = {j["job"]: [r["state"] for r in j["recipients"]] for j in admin.listing(now=NOW)}
    assert listed == {a.id: ["active"], b.id: ["active"], h.id: ["held", "held"]}
    assert [j["job"] for j in admin.listing(state="held", now=NOW)] == [h.id]
    # unknown and not-held answers
    assert admin.hold_job("0" * 32) is None and admin.release_job("0" * 32) is None
    assert admin.release_job(a.id, now=NOW)["was_held"] == 0
    # release: back on the ready lists, tasks dispatched (the ones published at submission have
    # run: found nothing, or parked what they popped), claimed as any other
    store.r.delete("mxq:pending")
    rel = admin.release_job(h.id, now=NOW + 1)
    assert (rel["was_held"], rel["released"], rel["moved"]) == (2, 2, 2)
    assert sorted(rel["dispatch"]) == [("one.test", 1), ("two.test", 1)]
    assert store.r.zcard("mxq:held") == 0 and not store.r.exists("mxq:hold:one.test", "mxq:hold:two.test")
    assert [c.job for c in store.claim("two.test", "t3", limit=10, now=NOW + 1)] == [h.id]


def test_a_job_held_in_flight_finishes_its_transaction_and_what_is_left_is_parked(store):
    h = job(1, ("x@one.test", "y@one.test"))
    store.submit([h], now=NOW)
    (item,) = store.claim("one.test", "t1", now=NOW)
    admin = Admin(store)
    assert admin.hold_job(h.id, now=NOW) == {"held": 2, "parked": 0, "in_flight": 1}
    # the transaction under way: x delivered, y deferred (due at NOW + 10)
    recs = item.records
    store.release("t1", "one.test", [Outcome(item.wid, [
        ("0", dict(recs[0], state="delivered", code=250), ""),
        ("1", dict(recs[1], state="deferred", code=451), "")], due=NOW + 10)], now=NOW)
    assert store.tick(now=NOW + 11).moved == 1                  # due: back on the ready list ...
    assert store.claim("one.test", "t2", now=NOW + 11) == []    # ... and parked by the claim
    assert wids(store, "mxq:held") == [item.wid]
    assert [r["state"] for r in admin.listing(now=NOW)[0]["recipients"]] == ["held"]
    assert admin.release_job(h.id, now=NOW + 12)["released"] == 1
    (again,) = store.claim("one.test", "t3", now=NOW + 12)
    assert again.wid == item.wid


def test_hold_of_a_domain_takes_what_waits_now_not_what_comes_later(store):
    ready, deferred = job(1, ("r@one.test", "o@two.test")), job(2, ("d@one.test",))
    store.submit([ready, deferred], now=NOW)
    (d,) = [c for c in store.claim("one.test", "t0", limit=10, now=NOW) if c.job == deferred.id]
    store.r.lpush("mxq:ready:one.test", f"{ready.id}|one.test|0")     # (the claim took both; put one back)
    store.release("t0", "one.test", [Outcome(d.wid, [("0", dict(d.records[0], state="deferred"), "")],
                                             due=NOW + 50)], now=NOW)
    intake = job(3, ("i@one.test",))
    store.submit([intake], split=False, now=NOW)                       # stored, not split yet
    admin = Admin(store)
    assert admin.hold_domain("one.test", now=NOW) == {"held": 3, "parked": 2, "in_flight": 0}
    assert store.r.llen("mxq:ready:one.test") == 0 and store.r.zcard("mxq:deferred") == 0
    assert wids(store, "mxq:ready:two.test") == [f"{ready.id}|two.test|1"]      # other domains untouched
    store.intake([intake.id], now=NOW)                                  # split now: parked when claimed
    later = job(4, ("l@one.test",))
    store.submit([later], now=NOW)                                      # after the hold: not held
    assert [c.job for c in store.claim("one.test", "t1", limit=10, now=NOW + 1)] == [later.id]
    assert store.r.zcard("mxq:held") == 3
    doc = admin.snapshot(now=NOW)
    row = next(x for x in doc["domains"] if x["domain"] == "one.test")
    assert row["held"] == 3 and doc["totals"]["held"] == 3
    rel = admin.release_domain("one.test", now=NOW)
    assert (rel["was_held"], rel["released"], rel["moved"]) == (3, 3, 3)
    assert [w.split("|")[0] for w in wids(store, "mxq:ready:one.test")] == [ready.id, deferred.id, intake.id]
    assert admin.release_domain("one.test", now=NOW)["was_held"] == 0


def test_drop_takes_held_mail_too(store):
    h, k = job(1, ("a@one.test",)), job(2, ("b@one.test",))
    store.submit([h, k], now=NOW)
    admin = Admin(store)
    admin.hold_job(h.id, now=NOW)
    admin.hold_job(k.id, now=NOW)
    assert admin.drop_job(h.id, now=NOW)["removed"] == 1
    assert wids(store, "mxq:held") == [f"{k.id}|one.test|0"]
    assert admin.drop_domain("one.test", now=NOW)["dropped"] == 1
    assert store.r.zcard("mxq:held") == 0 and not store.r.exists("mxq:hold:one.test")


# ------------------------------------------------------------------ store: suspend / resume
def test_a_suspended_lane_gets_no_task_no_grant_no_claim_and_resume_dispatches_it(store):
    admin = Admin(store)
    doc = admin.suspend("one.test", reason="maintenance at one", now=NOW)
    assert doc["expires"] is None and not doc["replaced"]
    a, b = job(1, ("a@one.test", "x@two.test")), job(2, ("b@one.test",))
    _, disp = store.submit([a, b], now=NOW)
    assert disp == [("two.test", 1)]                            # no task for the suspended lane
    assert store.r.llen("mxq:ready:one.test") == 2              # its mail waits, queued
    assert store.r.zscore("mxq:dispatch", "one.test") is None   # and the scheduler does not re-publish it
    assert "one.test" not in dict(store.tick(now=NOW + 1000).dispatch)
    g = store.dest.acquire("one.test", "tok", 3, concurrency=5, interval=0, bucket=1, slot_ttl=30,
                           backstop=1, now=NOW)
    assert (g.granted, g.reason, g.wait, g.slot) == (0, "suspended", -1.0, False)
    assert not store.r.exists("mxq:shape:conn:one.test")        # no slot taken
    assert store.claim("one.test", "t1", now=NOW) == []         # a connection under way gets no more
    # the fleet-wide gauges still count its waiting mail
    from mxq.tasks.metrics import RedisCollector
    queues, ready = RedisCollector(store.settings.redis_url).depths()
    assert ready["one.test"] == 2 and queues["ready"] == 3         # (and two.test's one)
    assert [x["domain"] for x in admin.snapshot(now=NOW)["suspended"]] == ["one.test"]
    assert admin.suspended()[0]["reason"] == "maintenance at one"
    was, disp = admin.resume("one.test", now=NOW + 1)
    assert was and disp == [("one.test", 1)]
    assert admin.resume("one.test", now=NOW + 1)[0] is False
    assert [c.job for c in store.claim("one.test", "t2", limit=10, now=NOW + 1)] == [a.id, b.id]


def test_a_suspension_with_a_duration_ends_by_itself_through_the_scheduler(store):
    admin = Admin(store)
    now = time.time()
    admin.suspend("one.test", duration=0.5, now=now)
    a = job(1, ("a@one.test",))
    _, disp = store.submit([a], now=now)
    assert disp == [] and store.r.zscore("mxq:throttled", "one.test") == pytest.approx(now + 0.5)
    assert store.tick(now=now + 0.2).dispatch == []              # not yet
    assert [x["domain"] for x in admin.suspended()] == ["one.test"]
    wait_until(lambda: not store.r.exists("mxq:suspend:one.test"), 5, "the suspension to expire")
    assert admin.suspended() == [] and not store.r.exists("mxq:suspended")
    assert store.tick(now=max(time.time(), now + 0.5)).dispatch == [("one.test", 1)]


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400
    for bad in ("", "soon", "-5", "0", "5x"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# ------------------------------------------------------------------ the real pipeline
IP = "127.0.75."
HOLD, SUS, GO, SLOW = "held.hs.test", "sus.hs.test", "go.hs.test", "slow.hs.test"


@pytest.fixture(scope="module")
def exchanges(dns_server):
    """One scripted server per domain (each counts its connections)."""
    from mxq.sandbox.smtpd import Behaviour, start_server

    servers = {}
    for n, d in enumerate((HOLD, SUS, GO, SLOW)):
        ip = IP + str(10 + n)
        dns_server.add({d: {"MX": [[10, "mx." + d]]}, "mx." + d: {"A": [ip]}})
        slow = {"data_final": 0.4} if d == SLOW else {}       # 0.4 s at the final dot: one message a chunk
        servers[d] = start_server(ip, 25, Behaviour(hostname="mx." + d, delays=slow))
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture
def fresh(exchanges):
    for s in exchanges.values():
        s.clear()
    return exchanges


def mxq(*args: str):
    from tests.test_queue_cli import mxq as run
    return run(*args)


def message(to: str, tag: str) -> bytes:
    return (f"From: ops@src.hs.test\r\nTo: {to}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@src.hs.test>\r\n\r\nbody {tag}\r\n").encode()


def subjects(server) -> list[str]:
    return sorted(m.email()["Subject"] for m in server.messages)


def test_a_held_job_waits_past_its_lifetime_while_others_go_and_is_delivered_once_released(pipeline, fresh):
    p = pipeline(MXQ_MAX_LIFETIME="4")
    held = tasks.submit(message(f"h@{HOLD}", "held"), recipients=[f"h@{HOLD}"])
    r = mxq("queue", "hold", held, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"held": 1, "parked": 1, "in_flight": 0, "job": held, "domain": None}
    p.worker(concurrency=1)
    p.beat()
    others = [tasks.submit(message(f"u{i}@{HOLD}", f"o{i}")) for i in range(5)]
    p.wait_done(others, 30)
    assert subjects(fresh[HOLD]) == [f"o{i}" for i in range(5)]
    listed = json.loads(mxq("queue", "list", "--json", "--state", "held").stdout)
    assert [(j["job"], [x["address"] for x in j["recipients"]]) for j in listed] == [(held, [f"h@{HOLD}"])]
    assert f"on hold: its recipients in {HOLD}" in mxq("queue", "show", "--no-content", held).stdout.decode()
    row = next(x for x in json.loads(mxq("queue", "--json").stdout)["domains"] if x["domain"] == HOLD)
    assert (row["held"], row["ready"], row["deferred"], row["in_flight"]) == (1, 0, 0, 0)
    # Held past MXQ_MAX_LIFETIME (4 s) with the scheduler ticking: not expired, not attempted.
    created = float(p.redis.client().hget(f"mxq:job:{held}", "created"))
    wait_until(lambda: time.time() > created + 6, 10, "the held job's lifetime to pass")
    rec = tasks.status(held)["recipients"][0]
    assert (rec["state"], rec["attempts"]) == ("queued", 0)
    assert mxq("queue", "release", "--domain", "nothing.hs.test").returncode == 66
    r = mxq("queue", "release", held)
    assert r.returncode == 0 and r.stdout.decode().startswith("released 1 recipient(s)"), r.stderr
    # Released: attempted at once (Postfix's postsuper -H: its lifetime applies again, and
    # this first attempt succeeds), delivered exactly once.
    p.wait_done([held], 15)
    rec = tasks.status(held)["recipients"][0]
    assert (rec["state"], rec["attempts"]) == ("delivered", 1)
    assert subjects(fresh[HOLD]) == ["held"] + [f"o{i}" for i in range(5)]


def test_a_suspended_domain_gets_no_connection_and_resume_delivers_each_message_once(pipeline, fresh):
    p = pipeline()
    p.worker(concurrency=1)
    p.beat()
    r = mxq("queue", "suspend", SUS.upper(), "--reason", "their maintenance window")
    assert r.returncode == 0 and r.stdout.decode() == f"suspended {SUS} until mxq queue resume\n", r.stderr
    waiting = [tasks.submit(message(f"s{i}@{SUS}", f"s{i}")) for i in range(5)]
    going = [tasks.submit(message(f"g{i}@{GO}", f"g{i}")) for i in range(3)]
    p.wait_done(going, 30)                          # the workers deliver meanwhile
    # ... and the scheduler ticks past MXQ_DISPATCH_STALE (3 s): a quiet lane would be woken by now
    beat = p.workdir / "scheduler-heartbeat"
    since = time.time()
    wait_until(lambda: beat.exists() and beat.stat().st_mtime > since + 4, 15, "scheduler ticks")
    client = p.redis.client()
    assert fresh[SUS].stats["connections"] == 0 and fresh[SUS].messages == []
    assert client.llen(f"mxq:ready:{SUS}") == 5                   # queued, not deferred, not lost
    assert not client.exists(f"mxq:shape:conn:{SUS}")             # no slot: no worker capacity
    assert client.llen("mxq.delivery") == 0                       # and no task waiting for it
    assert all(tasks.status(j)["recipients"][0]["state"] == "queued" for j in waiting)
    doc = json.loads(mxq("queue", "--json").stdout)
    assert doc["suspended"][0]["domain"] == SUS and doc["suspended"][0]["reason"] == "their maintenance window"
    assert f"suspended: {SUS} until resumed: their maintenance window" in mxq("queue").stdout.decode()
    r = mxq("queue", "resume", SUS)
    assert r.returncode == 0 and r.stdout.decode() == f"resumed {SUS}\n", r.stderr
    p.wait_done(waiting, 30)
    assert subjects(fresh[SUS]) == [f"s{i}" for i in range(5)]      # each once
    assert fresh[SUS].stats["connections"] >= 1
    assert mxq("queue", "resume", SUS).returncode == 66
    client.close()


def test_a_suspension_with_a_duration_delivers_when_it_ends(pipeline, fresh):
    p = pipeline()
    p.worker(concurrency=1)
    p.beat()
    start = time.time()
    r = mxq("queue", "suspend", SUS, "--duration", "3s", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["domain"] == SUS and doc["expires"] - doc["since"] == pytest.approx(3)
    jobs = [tasks.submit(message(f"d{i}@{SUS}", f"d{i}")) for i in range(3)]
    p.wait_done(jobs, 30)
    assert subjects(fresh[SUS]) == [f"d{i}" for i in range(3)]
    assert min(m.received_at for m in fresh[SUS].messages) >= start + 3
    assert mxq("queue", "suspend", SUS, "--duration", "soon").returncode == 64


def test_a_suspension_stops_connections_under_way_after_their_current_message(pipeline, fresh):
    p = pipeline()
    p.worker(concurrency=1)
    p.beat()
    client = p.redis.client()
    n = 150
    jobs = tasks.submit_many([tasks.Item(message(f"w{i}@{SLOW}", f"w{i}")) for i in range(n)])
    wait_until(lambda: len(fresh[SLOW].messages) >= 3, 30, "delivery to the slow domain under way")
    Admin(get_store()).suspend(SLOW)                        # (in this process: the command takes a second)
    running = client.zcard(f"mxq:shape:conn:{SLOW}")       # connections that may finish one more message
    before = len(fresh[SLOW].messages)
    wait_until(lambda: client.zcard("mxq:lease") == 0 and client.zcard(f"mxq:shape:conn:{SLOW}") == 0, 20,
               "the connections under way to end")
    after = len(fresh[SLOW].messages)
    print(f"suspended with {running} connection(s) under way: {before} delivered then, {after} after")
    assert after - before <= running, (before, after, running)
    assert after < n and client.llen(f"mxq:ready:{SLOW}") == n - after          # the rest waits, queued
    beat = p.workdir / "scheduler-heartbeat"
    since = time.time()
    wait_until(lambda: beat.stat().st_mtime > since + 4, 15, "scheduler ticks past MXQ_DISPATCH_STALE")
    assert len(fresh[SLOW].messages) == after
    assert mxq("queue", "resume", SLOW).returncode == 0
    p.wait_done(jobs, 60)
    assert subjects(fresh[SLOW]) == sorted(f"w{i}" for i in range(n))                # each once
    client.close()

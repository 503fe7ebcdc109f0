"""The operator's commands, ``mxq queue [flush|drop]`` and ``mxq suppress``, run as real subprocesses
(the installed ``mxq`` entry point) against a real redis-server and, where mail must move, a real
``celery worker`` (tests/pipeline_fixtures.py) delivering to aiosmtpd servers found through the
session's DNS server.

Domains: ``ok.q.test`` accepts (127.0.74.10:25); ``dead.q.test`` and ``back.q.test`` point at
127.0.74.20 and 127.0.74.21, where nothing listens until a test starts a server there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxq import tasks
from mxq.tasks.admin import Admin
from mxq.tasks.store import Outcome, get_store
from tests.fixtures_infra import wait_until
from tests.test_webhooks import Receiver
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

MXQ = str(Path(sys.executable).with_name("mxq"))
IP = "127.0.74."
OK, DEAD, BACK = "ok.q.test", "dead.q.test", "back.q.test"


@pytest.fixture(scope="module")
def sink(dns_server):
    dns_server.add({OK: {"MX": [[10, "mx." + OK]]}, "mx." + OK: {"A": [IP + "10"]},
                    DEAD: {"MX": [[10, "mx." + DEAD]]}, "mx." + DEAD: {"A": [IP + "20"]},
                    BACK: {"MX": [[10, "mx." + BACK]]}, "mx." + BACK: {"A": [IP + "21"]}})
    srv = start_server(IP + "10", 25, Behaviour(hostname="mx." + OK))
    yield srv
    srv.stop()


@pytest.fixture
def ok(sink):
    sink.clear()
    return sink


def mxq(*args: str, input: bytes | None = b"", env: dict | None = None, timeout: float = 60):
    """Run ``mxq ARGS`` with this process's environment (the pipeline's) plus ``env``."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([MXQ, *args], input=input, capture_output=True, timeout=timeout, env=e)


def message(to: str, tag: str) -> bytes:
    return (f"From: ops@src.q.test\r\nTo: {to}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@src.q.test>\r\n\r\nbody {tag}\r\n").encode()


def queue_json(**kw) -> dict:
    r = mxq("queue", "--json", **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def deferred(job: str) -> bool:
    return all(r["state"] == "deferred" for r in tasks.status(job)["recipients"])


# ------------------------------------------------------------------ mxq queue
def test_queue_lists_by_domain_and_state(pipeline, ok):
    p = pipeline()
    r = mxq("queue")
    assert r.returncode == 0 and r.stdout.decode() == "mail queue is empty\n"

    # Two recipients of one job deferred at dead.q.test (refused; next try in 300 s).
    w = p.worker(concurrency=1, MXQ_RETRY_SCHEDULE="300")
    stuck = tasks.submit(message(f"a@{DEAD}", "stuck"), recipients=[f"a@{DEAD}", f"b@{DEAD}"])
    wait_until(lambda: deferred(stuck), 20, "the dead domain's recipients to be deferred")
    w.stop()
    # Three messages ready for ok.q.test (no worker now), one of them claimed under a lease: in flight.
    ready = [tasks.submit(message(f"u{i}@{OK}", f"r{i}")) for i in range(3)]
    (held,) = get_store().claim(OK, "operator-test-token", limit=1)
    assert held.job == ready[0]

    doc = queue_json()
    rows = {x["domain"]: x for x in doc["domains"]}
    assert rows[OK] == {"domain": OK, "ready": 2, "in_flight": 1, "deferred": 0, "held": 0, "recipients": 3}
    assert rows[DEAD] == {"domain": DEAD, "ready": 0, "in_flight": 0, "deferred": 1, "held": 0, "recipients": 2}
    assert doc["totals"] == {"ready": 2, "in_flight": 1, "deferred": 1, "held": 0, "recipients": 5}
    assert doc["suspended"] == []
    assert doc["intake"] == 0 and doc["reports"] == {"ready": 0, "in_flight": 0}
    oldest = doc["oldest_deferred"]
    assert [o["recipient"] for o in oldest] == [f"a@{DEAD}", f"b@{DEAD}"]
    o = oldest[0]
    assert o["job"] == stuck and o["attempts"] == 1 and 0 <= o["age"] < 60
    assert o["next_attempt"] - time.time() > 200 and o["enhanced"].startswith("4.")
    assert o["text"] == tasks.status(stuck)["recipients"][0]["text"] and o["text"]

    # The table says the same for people.
    r = mxq("queue", "--oldest", "1")
    text = r.stdout.decode()
    assert r.returncode == 0
    assert re.search(rf"^{re.escape(OK)}\s+2\s+1\s+0\s+0\s+3$", text, re.M), text
    assert re.search(rf"^{re.escape(DEAD)}\s+0\s+0\s+1\s+0\s+2$", text, re.M), text
    assert re.search(r"^TOTAL\s+2\s+1\s+1\s+0\s+5$", text, re.M), text
    assert "oldest deferred:" in text and f"a@{DEAD}" in text and f"b@{DEAD}" not in text


def test_flush_retries_a_domain_now(pipeline, ok):
    p = pipeline()
    p.worker(concurrency=1, MXQ_RETRY_SCHEDULE="300")
    jobs = {d: tasks.submit(message(f"x@{d}", f"f-{d}")) for d in (DEAD, BACK)}
    wait_until(lambda: all(deferred(j) for j in jobs.values()), 20, "both domains deferred")
    client = p.redis.client()
    assert client.exists(f"mxq:down:{IP}21:25")          # the refusing exchange is marked down
    srv = start_server(IP + "21", 25, Behaviour(hostname="mx." + BACK))     # back.q.test is back
    try:
        r = mxq("queue", "flush", BACK.upper() + ".", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"moved": 1, "domain": BACK}
        wait_until(lambda: tasks.status(jobs[BACK])["state"] == "done", 15, "the flushed domain delivered")
        assert [m.rcpt_tos for m in srv.messages] == [[f"x@{BACK}"]]
        rec = tasks.status(jobs[BACK])["recipients"][0]
        assert rec["state"] == "delivered" and rec["attempts"] == 2
        # the other domain was not touched: still deferred, still due in minutes
        assert deferred(jobs[DEAD]) and tasks.status(jobs[DEAD])["recipients"][0]["attempts"] == 1
        assert client.zscore("mxq:deferred", f"{jobs[DEAD]}|{DEAD}|0") - time.time() > 200
        # flush of everything: the dead one is tried again at once (and deferred again)
        r = mxq("queue", "flush")
        assert r.returncode == 0 and r.stdout.decode().startswith("flushed 1 deferred message(s)")
        wait_until(lambda: tasks.status(jobs[DEAD])["recipients"][0]["attempts"] == 2, 15, "a second attempt")
        assert mxq("queue", "flush", "bad..domain").returncode == 65
    finally:
        srv.stop()


# ------------------------------------------------------------------ mxq queue drop
def test_drop_job_asks_then_nothing_is_delivered(pipeline, ok, receiver_factory):
    hook = receiver_factory()
    p = pipeline(MXQ_WEBHOOK_URL=hook.url)
    job = tasks.submit(message(f"d1@{OK}", "drop"), recipients=[f"d1@{OK}", f"d2@{OK}"])
    assert mxq("queue", "drop", "0" * 32, "--yes").returncode == 66          # unknown job

    r = mxq("queue", "drop", job, input=b"n\n")
    assert r.returncode == 1 and b"[y/N]" in r.stderr and b"2 recipient(s)" in r.stderr
    assert tasks.status(job)["state"] == "queued"
    r = mxq("queue", "drop", job, input=b"")                                  # EOF: no
    assert r.returncode == 1 and tasks.status(job)["state"] == "queued"

    r = mxq("queue", "drop", job, input=b"y\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith("dropped 2 recipient(s)")
    st = tasks.status(job)
    assert st["state"] == "done"
    assert [(x["state"], x["enhanced"]) for x in st["recipients"]] == [("dropped", "5.0.0")] * 2
    assert "dropped by the operator" in st["recipients"][0]["text"]
    assert p.redis.client().llen(f"mxq:ready:{OK}") == 0
    r = mxq("status", job)
    assert r.returncode == 0 and r.stdout.decode().count("dropped") >= 2

    # A worker now: the dropped job is never delivered; a later message to the same domain is.
    p.worker(concurrency=1)
    after = tasks.submit(message(f"after@{OK}", "after"))
    p.wait_done([after], timeout=30)
    assert sorted(a for m in ok.messages for a in m.rcpt_tos) == [f"after@{OK}"]
    # and the webhook endpoint heard about the two dropped recipients (enqueued by the command)
    wait_until(lambda: len([e for e in hook.events() if e["state"] == "dropped"]) == 2, 20, "dropped events")
    dropped = sorted(e["recipient"] for e in hook.events() if e["state"] == "dropped")
    assert dropped == [f"d1@{OK}", f"d2@{OK}"]
    assert {e["job"] for e in hook.events() if e["state"] == "dropped"} == {job}
    r = mxq("queue", "drop", job, "--yes")
    assert r.returncode == 0 and b"nothing to drop" in r.stdout


def test_drop_domain_deferred_and_ready(pipeline, ok):
    p = pipeline()
    w = p.worker(concurrency=1, MXQ_RETRY_SCHEDULE="300")
    mixed = tasks.submit(message(f"m@{OK}", "mixed"), recipients=[f"m@{OK}", f"m1@{DEAD}", f"m2@{DEAD}"])
    wait_until(lambda: tasks.status(mixed)["recipients"][1]["state"] == "deferred", 20, "deferred at dead")
    w.stop()
    fresh = tasks.submit(message(f"n@{DEAD}", "fresh"))                    # ready, no worker
    before = {x["domain"]: x for x in queue_json()["domains"]}[DEAD]
    assert (before["ready"], before["deferred"], before["recipients"]) == (1, 1, 3)

    r = mxq("queue", "drop", DEAD, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dropped"] == 3 and out["removed"] == 2 and out["target"] == DEAD
    assert DEAD not in {x["domain"] for x in queue_json()["domains"]}
    st = tasks.status(mixed)
    assert st["state"] == "done"
    assert [x["state"] for x in st["recipients"]] == ["delivered", "dropped", "dropped"]
    assert tasks.status(fresh)["recipients"][0]["state"] == "dropped"
    # the domain comes back, a flush and a worker: nothing dropped is sent
    srv = start_server(IP + "20", 25, Behaviour(hostname="mx." + DEAD))
    try:
        assert mxq("queue", "flush").returncode == 0
        p.worker(concurrency=1)
        probe = tasks.submit(message(f"probe@{DEAD}", "probe"))
        p.wait_done([probe], timeout=30)
        assert [m.rcpt_tos for m in srv.messages] == [[f"probe@{DEAD}"]]
    finally:
        srv.stop()


def test_drop_while_in_flight_never_overwritten_except_by_the_truth(pipeline):
    """Store level: a batch under lease when its job is dropped; the worker's late release."""
    p = pipeline()
    store = get_store()
    job = tasks.submit(message(f"f1@{OK}", "flight"), recipients=[f"f1@{OK}", f"f2@{OK}", f"f3@{OK}"])
    other = tasks.submit(message(f"g@{OK}", "other"))
    items = store.claim(OK, "tok-flight")
    assert [i.job for i in items] == [job, other]
    result = Admin(store).drop_job(job)
    assert result["dropped"] == 3 and result["in_flight"] == 1 and result["removed"] == 0
    assert p.redis.client().sismember("mxq:guard", "tok-flight")
    it, ot = items
    delivered = dict(it.records[0], state="delivered", code=250)       # that transaction went through
    failed = dict(it.records[1], state="deferred", code=451)
    bounced = dict(it.records[2], state="bounced", code=550, enhanced="5.1.1")
    ok_other = dict(ot.records[0], state="delivered", code=250)
    store.release("tok-flight", OK, [Outcome(it.wid, [("0", delivered, ""), ("1", failed, ""), ("2", bounced, "")],
                                             due=time.time() + 300),
                                     Outcome(ot.wid, [("0", ok_other, "")])])
    states = [r["state"] for r in tasks.status(job)["recipients"]]
    assert states == ["delivered", "dropped", "dropped"]
    meta, _ = store.job(job)
    assert meta["left"] == "0"                       # counted once, not twice
    assert tasks.status(other)["recipients"][0]["state"] == "delivered"   # the batch's other item as usual
    client = p.redis.client()
    assert not client.sismember("mxq:guard", "tok-flight") and client.zcard("mxq:lease") == 0
    assert client.keys("mxq:suppress:*") == []       # the refused bounce was not written, so no entry


# ------------------------------------------------------------------ mxq suppress
def test_suppress_commands(pipeline, ok, tmp_path):
    p = pipeline()
    p.worker(concurrency=1)
    r = mxq("suppress", "list")
    assert r.returncode == 0 and r.stdout == b"no suppressed addresses\n"
    r = mxq("suppress", "add", f"Bob@{OK.upper()}", "--ttl", "100", "--reason", "asked to stop")
    assert r.returncode == 0 and r.stdout.decode().startswith(f"suppressed bob@{OK} for 1m40s")
    assert 95 <= p.redis.client().ttl(f"mxq:suppress:bob@{OK}") <= 100
    entries = json.loads(mxq("suppress", "list", "--json").stdout)
    assert [(e["address"], e["source"], e["text"]) for e in entries] == [(f"bob@{OK}", "operator", "asked to stop")]
    assert f"bob@{OK}" in mxq("suppress", "list").stdout.decode()

    eml = tmp_path / "m.eml"
    eml.write_bytes(message(f"bob@{OK}", "sup"))
    r = mxq("send", "--wait", "--json", "--timeout", "20", str(eml))
    assert r.returncode == 69, r.stderr                        # final at once, not delivered
    st = json.loads(r.stdout)
    assert st["state"] == "done" and st["recipients"][0]["state"] == "suppressed"
    assert "asked to stop" in st["recipients"][0]["text"]

    assert mxq("suppress", "remove", f"bob@{OK}").returncode == 0
    assert mxq("suppress", "remove", f"bob@{OK}").returncode == 66
    r = mxq("send", "--wait", "--timeout", "20", str(eml))
    assert r.returncode == 0, r.stderr
    assert [m.rcpt_tos for m in ok.messages] == [[f"bob@{OK}"]]

    assert mxq("suppress", "add", "not-an-address").returncode == 65
    assert mxq("suppress", "add", f"x@{OK}", "--ttl", "0").returncode == 64
    assert mxq("suppress").returncode == 64
    # Redis away: 75, quickly
    started = time.monotonic()
    r = mxq("suppress", "list", env={"MXQ_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert r.returncode == 75 and b"cannot reach Redis" in r.stderr and time.monotonic() - started < 15


@pytest.fixture
def receiver_factory():
    made = []

    def make(**kw) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()

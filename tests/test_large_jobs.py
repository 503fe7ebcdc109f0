"""Large submissions (issue 9, finding 3 and 7, submission side) against a real redis-server.

- one message to 10,000 recipients of one domain, and one message to 10,000
  domains: stored whole (no Lua ``unpack`` of an unbounded list), split into
  work items of at most 100 recipients, claimable, and -- through real Celery
  workers -- all delivered by a sandbox exchange;
- recipients per message capped (``MXQ_RECIPIENT_LIMIT``), refused at submission;
- no Redis call of a submission carries more than ``CALL_BYTES`` (or one
  message): a redis-server that disconnects any client holding more than 24
  MiB (``maxmemory-clients``) stores a 96 MiB ``submit_many`` whole (before:
  the connection was cut and the whole payload resent 40 times);
- a large submission that fails half-way (Redis at maxmemory while staging)
  leaves nothing: no job, no work, no staged keys.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from mxq import tasks
from mxq.tasks.producer import Item, build_job
from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import CALL_BYTES, Store, make_client
from tests.fixtures_infra import wait_until

pytest_plugins = ["tests.pipeline_fixtures"]

NOW = 1_000_000.0
SENDER = "bulk@src.large.test"


def text(recipients: list[str], body: bytes = b"hello\r\n") -> bytes:
    return f"From: {SENDER}\r\nTo: list@large.test\r\nSubject: bulk\r\n\r\n".encode() + body


@pytest.fixture
def store(redis_server):
    srv = redis_server()
    st = Store(make_client(srv.url), PipelineSettings(redis_url=srv.url, batch_size=64, domain_concurrency=4))
    yield st
    st.r.close()


@pytest.fixture
def submit_redis(redis_server, monkeypatch):
    """A fresh Redis that ``mxq.tasks.submit*`` and the scheduler use (``MXQ_REDIS_URL``, app rebound)."""
    from mxq.tasks.app import rebind

    srv = redis_server()
    monkeypatch.setenv("MXQ_REDIS_URL", srv.url)
    rebind(srv.url)
    return srv


def full_at(client, maxmemory: str) -> None:
    """Redis refuses writes past ``maxmemory`` (noeviction, as mxq requires)."""
    client.config_set("maxmemory", maxmemory)
    client.config_set("maxmemory-policy", "noeviction")


def ready_items(st: Store, lane: str) -> list[str]:
    return [w.decode() for w in st.r.lrange(f"mxq:ready:{lane}", 0, -1)]


def test_ten_thousand_recipients_in_one_domain_are_stored_whole_in_items_of_100(store):
    rcpts = [f"u{i}@one.large.test" for i in range(10000)]
    j = build_job(Item(text(rcpts), recipients=rcpts), max_size=10**6, now=NOW)
    ids, disp = store.submit([j], now=NOW)
    assert ids == [j.id] and disp == [("one.large.test", 2)]        # ceil(100 items / 64), at most 4
    items = ready_items(store, "one.large.test")
    assert len(items) == 100
    seen = [int(i) for w in items for i in w.split("|")[2].split(",")]
    assert sorted(seen) == list(range(10000))                          # every recipient once
    assert all(len(w.split("|")[2].split(",")) == 100 for w in items)
    # every item claims with its records (no unpack of 10,000 fields anywhere)
    got = store.claim("one.large.test", "t1", limit=64, now=NOW) + \
        store.claim("one.large.test", "t2", limit=64, now=NOW)
    assert len(got) == 100 and sum(len(c.indexes) for c in got) == 10000
    assert all(r["state"] == "queued" for c in got for r in c.records)
    meta, recs = store.job(j.id)
    assert meta["n"] == meta["left"] == "10000" and len(recs) == 10000


def test_queue_drop_finds_every_item_of_a_split_job(store):
    from mxq.tasks.admin import Admin

    rcpts = [f"u{i}@one.large.test" for i in range(250)]
    j = build_job(Item(text(rcpts), recipients=rcpts), max_size=10**6, now=NOW)
    store.submit([j], now=NOW)
    assert store.r.llen("mxq:ready:one.large.test") == 3                 # 100 + 100 + 50
    got = Admin(store).drop_job(j.id, now=NOW + 1)
    assert (got["dropped"], got["removed"]) == (250, 3)
    assert store.r.llen("mxq:ready:one.large.test") == 0
    assert {r["state"] for r in store.job(j.id)[1].values()} == {"dropped"}


def test_ten_thousand_domains_in_one_message_are_stored_whole(store):
    rcpts = [f"u@d{i}.large.test" for i in range(10000)]
    j = build_job(Item(text(rcpts), recipients=rcpts), max_size=10**6, now=NOW)
    ids, disp = store.submit([j], now=NOW)        # before: "too many results to unpack" after the writes
    assert ids == [j.id]
    assert len(disp) == 10000 and all(n == 1 for _, n in disp)
    assert store.r.hlen("mxq:pending") == 10000 and store.r.zcard("mxq:dispatch") == 10000
    assert ready_items(store, "d9999.large.test") == [f"{j.id}|d9999.large.test|9999"]
    # the intake path (a large submit_many) splits such a job too
    k = build_job(Item(text(rcpts), recipients=rcpts), max_size=10**6, now=NOW)
    store.submit([k], split=False, now=NOW)
    assert store.intake([k.id], now=NOW) == []          # one task per lane is pending already
    assert ready_items(store, "d0.large.test") == [f"{j.id}|d0.large.test|0", f"{k.id}|d0.large.test|0"]
    assert store.r.llen("mxq:ready:d9999.large.test") == 2


def _small_jobs(n: int, domains: int = 10, key: str | None = None) -> list:
    return [build_job(Item(text([]).replace(b"Subject: bulk", f"Subject: m{i}".encode()),
                           recipients=[f"u{i}@d{i % domains}.large.test"],
                           idempotency_key=f"{key}-{i}" if key else None), max_size=10**6, now=NOW)
            for i in range(n)]


def _commands(client) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}


def test_a_staged_submission_stores_each_message_with_one_command(store):
    """2,500 messages (more than CALL_JOBS: staged in calls of 1,000, committed once): every job
    hash written whole by one HSET and nothing else per message -- the commit queues the work
    items with one RPUSH per lane.  Before: HSET and EXPIRE while staging, EXISTS and PERSIST at
    the commit (4 commands a message)."""
    from mxq.tasks.store import CALL_JOBS

    jobs = _small_jobs(2500)
    assert len(jobs) > 2 * CALL_JOBS
    commit, calls = store._commit, []
    store._commit = lambda **kw: calls.append(kw) or commit(**kw)
    store.r.config_resetstat()
    ids, disp = store.submit(jobs, now=NOW)
    counts = _commands(store.r)
    assert ids == [j.id for j in jobs]
    assert sum(store.r.llen(f"mxq:ready:d{d}.large.test") for d in range(10)) == 2500
    assert sorted(lane for lane, _ in disp) == sorted(f"d{d}.large.test" for d in range(10))
    assert counts["hset"] <= 2500 + 3 + 20                # a job each; the 3 chunks' specs; dispatch
    assert counts.get("expire", 0) == counts.get("persist", 0) == counts.get("exists", 0) == 0
    assert counts["rpush"] == 10                          # one per lane for the whole batch
    total = sum(n for c, n in counts.items() if c not in ("config|resetstat", "evalsha", "script|load",
                                                           "script|exists"))
    assert total / 2500 < 1.1, counts
    assert all(store.r.ttl(f"mxq:job:{j}") == -1 for j in ids[::250])
    assert store.r.zcard("mxq:staging") == 0 and store.r.keys("mxq:stage:*") != []   # the ids, for a retry
    # a retried commit (its reply lost: redis-py sends the same call again) answers the same
    # and queues nothing more
    (call,) = calls
    again, disp_again = commit(**call)
    assert [i.decode() for i in again] == ids and not disp_again
    assert sum(store.r.llen(f"mxq:ready:d{d}.large.test") for d in range(10)) == 2500


def test_a_staged_submission_never_committed_is_removed_by_the_scheduler(store, monkeypatch):
    """The producer dies between staging and commit (no failure path ran): the staged job hashes
    are queued nowhere, and the scheduler's step removes them once STAGE_TTL has passed -- not
    before (a slow producer may still commit)."""
    from mxq.tasks.store import STAGE_TTL, Store

    def killed(self, *a, **kw):
        raise SystemExit("producer killed")

    monkeypatch.setattr(Store, "_unstage_now", lambda self, token: None)     # killed: no clean-up ran
    monkeypatch.setattr(store, "_commit", lambda *a, **kw: killed(store))
    jobs = _small_jobs(1500, key="k")
    with pytest.raises(SystemExit):
        store.submit(jobs, now=NOW)
    assert store.r.exists(*[f"mxq:job:{j.id}" for j in jobs]) == 1500
    assert not store.r.keys("mxq:ready:*") and store.r.zcard("mxq:staging") == 1
    assert store.unstage(NOW + STAGE_TTL - 5) == 0                           # not yet
    assert store.r.exists(*[f"mxq:job:{j.id}" for j in jobs]) == 1500
    assert store.unstage(NOW + STAGE_TTL + 5) == 1
    assert store.r.keys("mxq:*") == []
    # the same batch submitted again is stored whole (its idempotency keys were never taken)
    monkeypatch.undo()
    ids = store.submit(jobs, now=NOW)[0]
    assert ids == [j.id for j in jobs]
    assert sum(store.r.llen(f"mxq:ready:d{d}.large.test") for d in range(10)) == 1500


def test_the_scheduler_step_removes_stale_staged_submissions(submit_redis, monkeypatch):
    """``mxq scheduler``'s tick is what calls ``Store.unstage``."""
    from mxq.tasks import scheduler
    from mxq.tasks.store import STAGE_TTL, Store, get_store

    st = get_store()
    monkeypatch.setattr(Store, "_unstage_now", lambda self, token: None)
    monkeypatch.setattr(st, "_commit", lambda *a, **kw: (_ for _ in ()).throw(SystemExit("killed")))
    jobs = _small_jobs(1200)
    with pytest.raises(SystemExit):
        st.submit(jobs, now=NOW)
    assert st.r.zcard("mxq:staging") == 1
    scheduler.tick(now=NOW + 10)
    assert st.r.zcard("mxq:staging") == 1 and st.r.exists(f"mxq:job:{jobs[0].id}") == 1
    scheduler.tick(now=NOW + STAGE_TTL + 10)
    assert st.r.zcard("mxq:staging") == 0 and st.r.keys("mxq:job:*") == []


def _items(n: int, bad: int | None = None, size: int = 0) -> list:
    body = b"".join(b"x" * 98 + b"\r\n" for _ in range(size // 100))
    return [Item(text([]).replace(b"Subject: bulk", f"Subject: m{i}".encode()) + body,
                 recipients=["not an address" if i == bad else f"u{i}@d{i % 10}.large.test"])
            for i in range(n)]


def test_a_bad_item_after_the_first_staged_calls_leaves_nothing(submit_redis):
    """submit_many of 2,500 (more than CALL_JOBS: the first 1,000 are staged while the rest is
    validated): item 2,300 is bad -- the caller gets its reason and index, and nothing is left in
    Redis (the staged calls are taken back) nor queued."""
    srv = submit_redis
    client = srv.client()
    client.config_resetstat()
    with pytest.raises(tasks.InvalidMessage, match="^item 2300: ") as info:
        tasks.submit_many(_items(2500, bad=2300))
    assert info.value.index == 2300
    staged = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()}
    assert staged.get("hset", 0) >= 1000                  # the first calls were staged meanwhile
    assert client.keys("mxq:*") == []
    assert client.llen("mxq.delivery") == 0 and client.llen("mxq.intake") == 0
    ids = tasks.submit_many(_items(2500))                   # the good batch goes in whole
    assert len(set(ids)) == 2500
    assert sum(client.llen(f"mxq:ready:d{d}.large.test") for d in range(10)) == 2500
    assert client.zcard("mxq:staging") == 0


def test_redis_full_while_a_large_batch_is_staged_as_validated_leaves_nothing(submit_redis):
    """The same streaming path, Redis reaching maxmemory at its second or third staged call: the
    error reaches the caller and nothing is left (no job, no work, no staged key)."""
    srv = submit_redis
    client = srv.client()
    full_at(client, "12mb")
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
        tasks.submit_many(_items(3000, size=10_000))     # 30 MB in calls of 1,000 (10 MB)
    assert client.keys("mxq:*") == []
    assert client.llen("mxq.delivery") == 0 and client.llen("mxq.intake") == 0


def test_recipients_per_message_are_capped(submit_redis, monkeypatch):
    srv = submit_redis
    monkeypatch.setenv("MXQ_RECIPIENT_LIMIT", "5")
    rcpts = [f"u{i}@one.large.test" for i in range(6)]
    with pytest.raises(tasks.InvalidMessage, match="6 recipients, more than the limit of 5.*MXQ_RECIPIENT_LIMIT"):
        tasks.submit(text(rcpts), recipients=rcpts)
    with pytest.raises(tasks.InvalidMessage, match="item 1: "):
        tasks.submit_many([Item(text(rcpts[:5]), recipients=rcpts[:5]), Item(text(rcpts), recipients=rcpts)])
    client = srv.client()
    assert client.keys("mxq:*") == []
    assert tasks.status(tasks.submit(text(rcpts[:5]), recipients=rcpts[:5]))["state"] == "queued"
    monkeypatch.delenv("MXQ_RECIPIENT_LIMIT")
    assert PipelineSettings.from_env() and __import__("mxq.settings").settings.value("MXQ_RECIPIENT_LIMIT") == 10000


def _megabyte_messages(n: int) -> list[Item]:
    line = b"x" * 998 + b"\r\n"
    body = line * 1048                                                    # ~1 MiB each
    return [Item(text([]) .replace(b"Subject: bulk", f"Subject: m{i}".encode()) + body,
                 recipients=[f"u{i}@d{i % 7}.large.test"]) for i in range(n)]


def test_submit_many_never_sends_more_than_the_bound_in_one_call(submit_redis):
    """96 MiB through a Redis that evicts (disconnects) any client holding more than 24 MiB of
    command arguments and buffers (``maxmemory-clients``), as Redis's 1 GB query buffer limit
    does for larger calls.  Before: one 96 MiB call, cut and resent until the retries ran out."""
    assert CALL_BYTES <= 16 * 1024 * 1024
    srv = submit_redis
    client = srv.client()
    client.config_set("maxmemory-clients", "24mb")
    items = _megabyte_messages(96)
    started = time.monotonic()
    ids = tasks.submit_many(items)
    assert time.monotonic() - started < 60
    assert len(ids) == 96 and len(set(ids)) == 96
    for i, job in enumerate(ids):
        assert tasks.status(job)["recipients"][0]["address"] == f"u{i}@d{i % 7}.large.test"
        assert client.ttl(f"mxq:job:{job}") == -1                        # committed: no staging TTL left
    assert sum(client.llen(f"mxq:ready:d{d}.large.test") for d in range(7)) == 96
    assert [k for k in client.keys("mxq:stage:*") if client.type(k) != b"string"] == []
    assert "Evicting client" not in srv.log()                          # no client was cut off


def test_a_large_submission_failing_half_way_leaves_nothing(submit_redis):
    """Redis reaches maxmemory while the batch is staged: the caller gets the error, and no job,
    work item or staged key is left (nothing was queued, so nothing half-delivered)."""
    srv = submit_redis
    client = srv.client()
    full_at(client, "40mb")
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
        tasks.submit_many(_megabyte_messages(60))
    assert client.keys("mxq:*") == []
    assert client.llen("mxq.delivery") == 0 and client.llen("mxq.intake") == 0
    client.config_set("maxmemory", "0")
    assert len(tasks.submit_many(_megabyte_messages(60))) == 60       # with memory, the same batch goes in


# ------------------------------------------------------------------ through the pipeline
IP, DNS_IP = "127.0.47.10", "127.0.47.53"


def _greets(host: str) -> bool:
    try:
        with socket.create_connection((host, 25), timeout=2) as c:
            c.settimeout(5)
            return c.recv(512).startswith(b"220")
    except OSError:
        return False


@pytest.fixture(scope="module")
def bulk_exchange():
    """The exchange of one.large.test and d0..d9999.large.test (every MX -> one host): Postfix's
    smtp-sink (C, so 10,000 sessions cost the test little), dumping every transaction with its
    RCPTs to a file; and a DNS server process of its own for those 10,002 names (kept out of the
    session's, whose zone every test's add() rewrites and reloads whole)."""
    sink_exe = shutil.which("smtp-sink", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if not sink_exe:
        pytest.skip("smtp-sink (Debian's postfix package) is not installed")
    zone = {"mx.large.test": {"A": [IP]}, "one.large.test": {"MX": [[10, "mx.large.test"]]}}
    zone.update({f"d{i}.large.test": {"MX": [[10, "mx.large.test"]]} for i in range(10000)})
    work = Path(tempfile.mkdtemp(prefix="mxq-test-bulk-"))    # pytest's basetemp is 0700: not for nobody
    os.chmod(work, 0o777)                       # smtp-sink runs as nobody and writes its dump here
    (work / "zones.json").write_text(json.dumps({"ttl": 3600, "records": zone}))
    procs = [subprocess.Popen([sys.executable, "-m", "mxq.sandbox.dns", "--zones", str(work / "zones.json"),
                               "--listen", DNS_IP, "--port", "53", "--ready-file", str(work / "ready")],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    try:
        procs.append(subprocess.Popen([sink_exe, "-u", "nobody", "-D", str(work / "dump"), f"{IP}:25", "1000"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))
        wait_until(lambda: (work / "ready").exists() and _greets(IP), 20, "the bulk DNS server and smtp-sink")
        yield work / "dump"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_ten_thousand_recipients_and_ten_thousand_domains_all_delivered(pipeline, bulk_exchange):
    """About a minute on a quiet 2-core machine: 10,000 lanes are 10,000 delivery tasks."""
    p = pipeline(MXQ_LEASE_SECONDS="30", MXQ_DNS_SERVERS=f"{DNS_IP}:53")
    p.worker(concurrency=2)
    p.beat()
    one = [f"u{i}@one.large.test" for i in range(10000)]
    many = [f"u@d{i}.large.test" for i in range(10000)]
    a = tasks.submit(text(one), recipients=one)
    b = tasks.submit(text(many), recipients=many)
    p.wait_done([a], timeout=60)
    p.wait_done([b], timeout=300)
    for job, rcpts in ((a, one), (b, many)):
        st = tasks.status(job)
        assert st["state"] == "done"
        assert {r["state"] for r in st["recipients"]} == {"delivered"}
        assert sorted(r["address"] for r in st["recipients"]) == sorted(rcpts)
    got = re.findall(rb"^X-Rcpt-Args: <([^>]*)>", bulk_exchange.read_bytes(), re.M)
    assert len(got) == 20000 and {g.decode() for g in got} == set(one) | set(many)   # each exactly once

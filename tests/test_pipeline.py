"""The distributed pipeline end to end: producer API -> Redis -> real ``celery worker`` and
``celery beat`` processes -> real SMTP servers (aiosmtpd, sandbox) found through the sandbox DNS
server process.  Nothing is mocked.

Domains (all under ``pipe.test``, servers on 127.0.3.x:25 in the test's private network namespace):

- ``hNN``   healthy: one exchange that accepts;
- ``gN``    greylisting: 450 4.7.1 on the first try of each (ip, sender, rcpt);
- ``dfN``   a dead first exchange (MX 10 refuses connections), MX 20 accepts;
- ``bN``    bouncing: recipients ``reject*`` get 550 5.1.1;
- ``nN``    null MX (RFC 7505);
- ``dead``  every exchange refuses (for expiry and relay fallback);
- ``slowN`` accepts, 20 ms before answering the final dot (for kill/restart tests);
- ``src``   the senders' domain, where delivery status reports arrive.
"""

from __future__ import annotations

import re
import base64
import collections
import threading
import time

import pytest

from mxq import tasks
from tests.fixtures_infra import wait_until
from mxq.sandbox.smtpd import Behaviour, make_tls, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.3."
HEALTHY = [f"h{i:02d}.pipe.test" for i in range(30)]
GREY = [f"g{i}.pipe.test" for i in range(5)]
DEADFIRST = [f"df{i}.pipe.test" for i in range(5)]
BOUNCE = [f"b{i}.pipe.test" for i in range(5)]
NULLMX = [f"n{i}.pipe.test" for i in range(5)]
SLOW = [f"slow{i}.pipe.test" for i in range(10)]
DEAD = "dead.pipe.test"
SENDER = "sender@src.pipe.test"
RELAY_HOST = "smtp.relay.pipe.test"
SECRET = "s3cretpass"


class Mesh:
    """The SMTP servers of this module, by role."""

    def __init__(self):
        quick = dict(keep_content=False, size_limit=None)
        self.ok = start_server(IP + "10", 25, Behaviour(hostname="mx.ok.pipe.test", **quick))
        self.grey = start_server(IP + "11", 25, Behaviour(hostname="mx.grey.pipe.test", greylist=True, **quick))
        self.ok2 = start_server(IP + "13", 25, Behaviour(hostname="mx.ok2.pipe.test", **quick))
        self.bounce = start_server(IP + "14", 25, Behaviour(hostname="mx.bounce.pipe.test", **quick))
        self.slow = start_server(IP + "15", 25, Behaviour(hostname="mx.slow.pipe.test",
                                                          delays={"data_final": 0.02}, **quick))
        self.src = start_server(IP + "20", 25, Behaviour(hostname="mx.src.pipe.test"))
        self.all = [self.ok, self.grey, self.ok2, self.bounce, self.slow, self.src]

    def clear(self):
        for s in self.all:
            s.clear()

    def stop(self):
        for s in self.all:
            s.stop()

    def accepted(self, *servers) -> collections.Counter:
        """How many times each recipient address was accepted (one count per message)."""
        c = collections.Counter()
        for s in servers or self.all:
            for m in s.messages:
                c.update(m.rcpt_tos)
        return c

    def reports(self) -> list:
        """Delivery status reports received for the senders (null reverse path)."""
        return [m for m in self.src.messages if m.mail_from == ""]


def zones() -> dict:
    z = {
        "mx.ok.pipe.test": {"A": [IP + "10"]},
        "mx.grey.pipe.test": {"A": [IP + "11"]},
        "mx.refuse.pipe.test": {"A": [IP + "12"]},      # nothing listens there
        "mx.ok2.pipe.test": {"A": [IP + "13"]},
        "mx.bounce.pipe.test": {"A": [IP + "14"]},
        "mx.slow.pipe.test": {"A": [IP + "15"]},
        "mx.src.pipe.test": {"A": [IP + "20"]},
        "mx.slowest.pipe.test": {"A": [IP + "16"]},
        "slowest.pipe.test": {"MX": [[10, "mx.slowest.pipe.test"]]},
        RELAY_HOST: {"A": [IP + "30"]},
        "src.pipe.test": {"MX": [[10, "mx.src.pipe.test"]]},
        DEAD: {"MX": [[10, "mx.refuse.pipe.test"]]},
    }
    z.update({d: {"MX": [[10, "mx.ok.pipe.test"]]} for d in HEALTHY})
    z.update({d: {"MX": [[10, "mx.grey.pipe.test"]]} for d in GREY})
    z.update({d: {"MX": [[10, "mx.refuse.pipe.test"], [20, "mx.ok2.pipe.test"]]} for d in DEADFIRST})
    z.update({d: {"MX": [[10, "mx.bounce.pipe.test"]]} for d in BOUNCE})
    z.update({d: {"MX": [[0, "."]]} for d in NULLMX})
    z.update({d: {"MX": [[10, "mx.slow.pipe.test"]]} for d in SLOW})
    return z


@pytest.fixture(scope="module")
def mesh(dns_server):
    dns_server.add(zones())
    m = Mesh()
    yield m
    m.stop()


@pytest.fixture
def sinks(mesh):
    mesh.clear()
    return mesh


def message(i: int, to: str, tag: str = "t", size: int = 1500) -> bytes:
    body = (f"message {i} of {tag}\r\n" + "x" * 70 + "\r\n") * max(1, size // 90)
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {tag} {i}\r\n"
            f"Message-ID: <{tag}.{i}@src.pipe.test>\r\n\r\n{body}").encode()


EXPECT = {}
for d in HEALTHY + GREY + DEADFIRST:
    EXPECT[d] = ("delivered", 250)
for d in BOUNCE:
    EXPECT[d] = ("bounced", 550)
for d in NULLMX:
    EXPECT[d] = ("bounced", None)


def recipient(i: int, domain: str, tag: str) -> str:
    return f"reject.{tag}.{i}@{domain}" if domain in BOUNCE else f"u.{tag}.{i}@{domain}"


def test_thousand_messages_fifty_domains(pipeline, sinks):
    p = pipeline(MXQ_INTAKE_THRESHOLD="500")
    p.worker()
    p.beat()
    domains = HEALTHY + GREY + DEADFIRST + BOUNCE + NULLMX
    assert len(domains) == 50
    rcpts = [recipient(i, domains[i % 50], "k") for i in range(1000)]
    items = [tasks.Item(message(i, r, "k"), sender=SENDER, recipients=[r]) for i, r in enumerate(rcpts)]
    started = time.monotonic()
    # The producer-side batches go first: the first one names 50 lanes with no
    # task pending yet, so its wake-ups (> FANOUT_DIRECT) always go out as one
    # mxq.fanout.  Submitted after the big batch, they could find enough tasks
    # already pending and publish directly, which made the fanout check flaky.
    ids = []
    for k in range(600, 1000, 100):                     # split producer side, one script per batch
        ids += tasks.submit_many(items[k:k + 100])
    ids = tasks.submit_many(items[:600]) + ids          # > MXQ_INTAKE_THRESHOLD: split by mxq.intake
    assert len(set(ids)) == 1000
    p.wait_done(ids, timeout=90)
    logs = p.logs()
    assert "Task mxq.intake[" in logs and "Task mxq.fanout[" in logs     # both producer paths ran
    elapsed = time.monotonic() - started

    grey_attempts = []
    for i, jid in enumerate(ids):
        st = tasks.status(jid)
        assert st["state"] == "done" and st["job"] == jid
        (r,) = st["recipients"]
        domain = domains[i % 50]
        state, code = EXPECT[domain]
        assert (r["address"], r["domain"], r["state"], r["code"]) == (rcpts[i], domain, state, code), r
        if domain in NULLMX:
            assert r["enhanced"] == "5.1.10"
        if domain in GREY:
            grey_attempts.append(r["attempts"])
        if domain in DEADFIRST:
            assert r["exchange"] == "mx.ok2.pipe.test" and r["ip"] == IP + "13"
        assert r["first_attempt"] <= r["last_attempt"] and r["next_attempt"] is None
    # greylisted recipients came back from the deferred queue: a second attempt
    assert grey_attempts and min(grey_attempts) >= 2

    # every accepted message counted exactly once at the sinks, and only those
    accepted = sinks.accepted(sinks.ok, sinks.grey, sinks.ok2, sinks.bounce)
    delivered = {r for i, r in enumerate(rcpts) if EXPECT[domains[i % 50]][0] == "delivered"}
    assert set(accepted) == delivered
    assert max(accepted.values()) == 1
    assert len(delivered) == 800
    # batching: several messages of a domain go over one connection (K = 16 per task).  Each of
    # the 30 domains may open its initial window of 5 connections at once (150) and grow it as
    # deliveries succeed, so the count depends on timing; one connection per message (600) would
    # mean no batching and no reuse.  At least 2 messages per connection on average:
    healthy = sum(1 for i in range(1000) if domains[i % 50] in HEALTHY)
    assert sinks.ok.stats["messages"] == healthy == 600
    assert sinks.ok.stats["connections"] <= healthy / 2, sinks.ok.stats

    # each of the 200 bounces gets one report to the sender (mxq.tasks.notify, delivered like any mail)
    wait_until(lambda: len(sinks.reports()) >= 200, 60, "200 bounce reports at the sender")
    time.sleep(0.5)
    reports = sinks.reports()
    assert len(reports) == 200
    assert all(m.rcpt_tos == [SENDER] for m in reports)
    print(f"1000 messages to 50 domains: all final in {elapsed:.1f} s")


def test_greylisted_retry_and_expiry_with_reports(pipeline, sinks):
    p = pipeline(MXQ_MAX_LIFETIME="3")
    p.worker()
    p.beat()
    grey = tasks.submit(message(1, "ann@g0.pipe.test", "gx"), notify=("DELAY", "FAILURE"))
    dead = tasks.submit(message(2, f"bob@{DEAD}", "gx"))
    seen_deferred = []

    def grey_deferred():
        r = tasks.status(grey)["recipients"][0]
        if r["state"] == "deferred":
            seen_deferred.append(r)
        return r["state"] != "queued"

    wait_until(grey_deferred, 20, "the first attempt at the greylisting domain")
    p.wait_done([grey, dead], timeout=30)
    g = tasks.status(grey)["recipients"][0]
    assert g["state"] == "delivered" and g["attempts"] == 2
    if seen_deferred:       # observed between the attempts: deferred with a due time
        assert seen_deferred[0]["code"] == 450 and seen_deferred[0]["next_attempt"] > seen_deferred[0]["last_attempt"]
    d = tasks.status(dead)["recipients"][0]
    assert d["state"] == "expired" and d["enhanced"].startswith("4.")
    assert d["attempts"] >= 2 and d["last_attempt"] - d["first_attempt"] < 10
    # reports: a delay notice for the greylisted one (NOTIFY=DELAY), a failure for the expired one
    wait_until(lambda: len(sinks.reports()) >= 2, 30, "two reports at the sender")
    texts = [m.email().as_string() for m in sinks.reports()]
    assert any("Action: delayed" in t and "ann@g0.pipe.test" in t for t in texts)
    assert any("Action: failed" in t and f"bob@{DEAD}" in t for t in texts)


def test_status_of_unknown_job_is_keyerror(pipeline):
    pipeline()
    with pytest.raises(KeyError):
        tasks.status("0" * 32)
    with pytest.raises(KeyError):
        tasks.status("../etc")


def test_idempotency_key_returns_same_job(pipeline, sinks):
    p = pipeline()
    a = tasks.submit(message(1, "x@h00.pipe.test", "idem"), idempotency_key="order-42")
    b = tasks.submit(message(1, "x@h00.pipe.test", "idem"), idempotency_key="order-42")
    assert a == b
    p.worker()
    p.wait_done([a], timeout=20)
    assert sinks.accepted(sinks.ok)["x@h00.pipe.test"] == 1


def test_sigkill_worker_mid_run_loses_nothing(pipeline, sinks):
    batch, concurrency = 8, 2
    p = pipeline(MXQ_BATCH_SIZE=str(batch))
    w = p.worker(concurrency=concurrency)
    p.beat()
    rcpts = [f"k{i}@{SLOW[i % len(SLOW)]}" for i in range(240)]
    ids = tasks.submit_many([tasks.Item(message(i, r, "kill"), sender=SENDER, recipients=[r])
                             for i, r in enumerate(rcpts)])
    client = p.redis.client()
    # kill while work is under lease (the check and the kill are microseconds apart)
    wait_until(lambda: len(sinks.slow.messages) >= 40 and client.zcard("mxq:lease") > 0, 30,
               "40 messages at the sink and work in flight")
    w.kill()
    killed_at = time.monotonic()
    # work items held by leased batches at the kill: the transactions that may be repeated
    in_flight = sum(len(client.get(f"mxq:batch:{t.decode()}").split(b"\n")) - 1
                    for t in client.zrange("mxq:lease", 0, -1))
    assert in_flight > 0                    # the kill did interrupt work under lease
    p.worker(concurrency=concurrency)
    p.wait_done(ids, timeout=60)
    recovered_in = time.monotonic() - killed_at
    counts = sinks.accepted(sinks.slow)
    assert set(counts) == set(rcpts)        # nothing lost
    duplicates = sum(n - 1 for n in counts.values())
    # at most the transactions that were in flight (claimed, not yet recorded) at the kill
    assert duplicates <= in_flight, (duplicates, in_flight)
    assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)
    assert recovered_in < 60
    print(f"SIGKILL: {in_flight} work items in flight, {duplicates} sent twice, all done {recovered_in:.1f} s later")
    assert re.search(r"requeued=[1-9]", p.logs())          # the scheduler put the dead worker's leases back


def test_redis_restart_with_aof_loses_nothing(pipeline, sinks):
    p = pipeline(appendonly=True)
    p.worker()
    p.beat()
    rcpts = [f"r{i}@{SLOW[i % len(SLOW)]}" for i in range(200)]
    ids = tasks.submit_many([tasks.Item(message(i, r, "aof"), sender=SENDER, recipients=[r])
                             for i, r in enumerate(rcpts)])
    wait_until(lambda: len(sinks.slow.messages) >= 30, 30, "30 messages at the sink")
    p.redis.restart()
    p.wait_done(ids, timeout=90)
    counts = sinks.accepted(sinks.slow)
    assert set(counts) == set(rcpts)
    assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)


def _dump_everything(client) -> bytes:
    """Every key and value in Redis, by type, plus DUMP of each key."""
    out = []
    for key in client.scan_iter(count=1000):
        out.append(key)
        t = client.type(key).decode()
        if t == "string":
            out.append(client.get(key) or b"")
        elif t == "hash":
            for k, v in client.hgetall(key).items():
                out += [k, v]
        elif t == "list":
            out += client.lrange(key, 0, -1)
        elif t == "zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif t == "set":
            out += list(client.smembers(key))
        out.append(client.dump(key) or b"")
    return b"\n".join(out)


def test_relay_credentials_never_leave_the_worker(pipeline, sinks, tmp_path):
    tls = make_tls(RELAY_HOST, IP + "30", directory=tmp_path)
    relay = start_server(IP + "30", 587, Behaviour(hostname=RELAY_HOST, starttls=tls.server_context,
                                                   require_starttls=True, auth={"user": SECRET},
                                                   auth_required=True))
    try:
        p = pipeline(MXQ_RELAY=f"smtp://user:{SECRET}@{RELAY_HOST}:587", MXQ_RELAY_MODE="fallback",
                     SSL_CERT_FILE=tls.ca_file)
        monitor_client = p.redis.client(socket_timeout=None)
        seen: list[bytes] = []
        done = threading.Event()

        def watch():
            with monitor_client.monitor() as m:
                for cmd in m.listen():
                    seen.append(cmd["command"].encode("utf-8", "replace") if isinstance(cmd["command"], str)
                                else cmd["command"])
                    if "mxq-monitor-end" in str(cmd["command"]):
                        done.set()
                        return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        wait_until(lambda: p.redis.client().execute_command("CLIENT", "LIST").count(b"cmd=monitor") >= 1,
                   5, "MONITOR to start")
        p.worker(loglevel="DEBUG")
        p.beat()
        relayed = [f"v{i}@{DEAD}" for i in range(10)]
        direct = [f"w{i}@h01.pipe.test" for i in range(10)]
        ids = tasks.submit_many([tasks.Item(message(i, r, "cred"), sender=SENDER, recipients=[r])
                                 for i, r in enumerate(relayed + direct)])
        client = p.redis.client()
        p.wait_done(ids, timeout=60)
        for j, r in zip(ids, relayed + direct):
            rec = tasks.status(j)["recipients"][0]
            assert rec["state"] == "delivered"
            assert rec["relay"] is (r in relayed)
        assert sorted(a for m in relay.messages for a in m.rcpt_tos) == sorted(relayed)
        assert {m.auth_user for m in relay.messages} == {"user"}     # the credentials were used...
        client.echo("mxq-monitor-end")
        assert done.wait(10)
        secrets = [SECRET.encode(), base64.b64encode(f"\0user\0{SECRET}".encode()),
                   base64.b64encode(SECRET.encode())]
        everything = _dump_everything(client)
        commands = b"\n".join(seen)                  # every command Redis received: task messages, events, state
        logs = p.logs().encode()
        assert len(commands) > 1000 and b"mxq.deliver" in commands and len(logs) > 1000
        for s in secrets:                            # ...and appear nowhere
            assert s not in everything
            assert s not in commands
            assert s not in logs
    finally:
        relay.stop()


def test_lease_is_renewed_while_a_slow_delivery_runs(pipeline, sinks):
    # The server takes 3 s to answer the final dot; the lease is 1 s.  The
    # heartbeat keeps renewing it, so the scheduler never hands the work to
    # another worker and the message is sent once.
    slow = start_server(IP + "16", 25, Behaviour(hostname="mx.slowest.pipe.test", delays={"data_final": 3.0}))
    try:
        p = pipeline(MXQ_LEASE_SECONDS="1", MXQ_DISPATCH_STALE="1", MXQ_COMMAND_TIMEOUT="10")
        p.worker()
        p.beat()
        jid = tasks.submit(message(1, "z@slowest.pipe.test", "hb"))
        p.wait_done([jid], timeout=30)
        assert tasks.status(jid)["recipients"][0]["state"] == "delivered"
        assert [m.rcpt_tos for m in slow.messages] == [["z@slowest.pipe.test"]]
        assert not re.search(r"requeued=[1-9]", p.logs())    # (the line says requeued=0 when it published)
    finally:
        slow.stop()


def test_relay_always_makes_no_mx_lookup(pipeline, sinks, dns_server, tmp_path):
    tls = make_tls(RELAY_HOST, IP + "30", directory=tmp_path)
    relay = start_server(IP + "30", 587, Behaviour(hostname=RELAY_HOST, starttls=tls.server_context,
                                                   require_starttls=True, auth={"user": SECRET},
                                                   auth_required=True))
    try:
        p = pipeline(MXQ_RELAY=f"smtp://user:{SECRET}@{RELAY_HOST}:587", MXQ_RELAY_MODE="always",
                     SSL_CERT_FILE=tls.ca_file)
        p.worker()
        before = dns_server.queries("h07.pipe.test", "MX")
        jid = tasks.submit(message(1, "ra@h07.pipe.test", "always"))
        p.wait_done([jid], timeout=30)
        r = tasks.status(jid)["recipients"][0]
        assert (r["state"], r["relay"], r["exchange"]) == ("delivered", True, RELAY_HOST)
        assert [m.rcpt_tos for m in relay.messages] == [["ra@h07.pipe.test"]]
        assert dns_server.queries("h07.pipe.test", "MX") == before      # no MX lookup at all
        assert sinks.accepted(sinks.ok) == collections.Counter()
    finally:
        relay.stop()

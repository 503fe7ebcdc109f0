"""Suppression (mxq.tasks.suppress): a recipient that bounced permanently with a 5.1.x reply is not
mailed again while its entry lives; new submissions show it ``suppressed`` (final), nothing reaches
the server, the job's other recipients go ahead, and lifting the entry lets mail through again.

Real pieces: redis-server, a ``celery worker`` process, an aiosmtpd server on 127.0.72.10:25
(``sup.test``) whose recipient rules the test changes while it runs, the session's DNS server.
"""

from __future__ import annotations

import json

import pytest

from mxq import tasks
from mxq.tasks import suppress
from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import Outcome, Store, make_client
from mxq.tasks.producer import Item, build_job
from tests.fixtures_infra import wait_until
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

DOMAIN = "sup.test"
IP = "127.0.72.10"
RULES = {"gone": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
         "policy": "550 5.7.1 <{address}>: Recipient address rejected: not allowed",
         "full": "552 5.2.2 <{address}>: Mailbox full"}


@pytest.fixture(scope="module")
def server(dns_server):
    dns_server.add({DOMAIN: {"MX": [[10, "mx." + DOMAIN]]}, "mx." + DOMAIN: {"A": [IP]}})
    rules = dict(RULES)
    srv = start_server(IP, 25, Behaviour(hostname="mx." + DOMAIN, rcpt_rules=rules))
    srv.rules = rules           # the live dict: the test changes what the server refuses
    yield srv
    srv.stop()


@pytest.fixture
def sink(server):
    server.clear()
    server.rules.clear()
    server.rules.update(RULES)
    return server


def message(to: str, tag: str) -> bytes:
    return (f"From: shop@src.sup.test\r\nTo: {to}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@src.sup.test>\r\n\r\nbody of {tag}\r\n").encode()


def received(sink) -> list[str]:
    return sorted(a for m in sink.messages for a in m.rcpt_tos)


# ------------------------------------------------------------------ the policy, pure
R = {"address": "bob@sup.test", "scope": "recipient"}


@pytest.mark.parametrize("record, expected", [
    ({"state": "bounced", "code": 550, "enhanced": "5.1.1"}, True),
    ({"state": "bounced", "code": 550, "enhanced": "5.1.1", "text": "<Bob@sup.test>: User unknown"}, True),
    ({"state": "bounced", "code": 550, "enhanced": "5.1.10", "text": "recipient has a null MX"}, True),
    ({"state": "bounced", "code": 553, "enhanced": "5.1.3"}, True),
    ({"state": "bounced", "code": 551, "enhanced": "5.1.6"}, True),
    ({"state": "bounced", "code": 550, "enhanced": "5.1.1", "scope": "message"}, False),   # MAIL/DATA, shared
    ({"state": "bounced", "code": 550, "enhanced": "5.1.1", "scope": "site"}, False),
    ({"state": "bounced", "code": 550, "enhanced": "5.1.1", "scope": None}, False),        # scope unknown
    ({"state": "bounced", "code": 550, "enhanced": "5.1.8"}, False),       # the sender's address
    ({"state": "bounced", "code": 550, "enhanced": "5.1.7"}, False),       # the sender's address syntax
    ({"state": "bounced", "code": 554, "enhanced": "5.1.0"}, False),       # other address status: whose?
    ({"state": "bounced", "code": 550, "enhanced": "5.1.2"}, False),       # the destination domain
    ({"state": "bounced", "code": 550, "enhanced": "5.1.1",                # names another address
      "text": "<shop@src.sup.test>: Sender address rejected: User unknown"}, False),
    ({"state": "bounced", "code": 550, "enhanced": "5.7.1"}, False),       # policy: not the address
    ({"state": "bounced", "code": 552, "enhanced": "5.2.2"}, False),       # mailbox full
    ({"state": "bounced", "code": 550, "enhanced": None}, False),          # no enhanced code: unsure
    ({"state": "bounced", "code": None, "enhanced": "5.1.10"}, False),     # null MX: local, domain-wide
    ({"state": "bounced", "code": None, "enhanced": "5.1.2"}, False),      # NXDOMAIN: local
    ({"state": "expired", "code": 450, "enhanced": "4.1.1"}, False),
    ({"state": "delivered", "code": 250, "enhanced": "2.1.5"}, False),
])
def test_policy(record, expected):
    assert suppress.should_suppress({**R, **record}) is expected


def test_normalisation_and_ttl_setting():
    assert suppress.normalize("Bob.Smith@Bücher.Example") == "bob.smith@xn--bcher-kva.example"
    assert suppress.key(" X@Y.test") == "mxq:suppress:x@y.test"
    assert suppress.ttl_from_env({}) == 30 * 86400
    assert suppress.ttl_from_env({"MXQ_SUPPRESS_TTL": "0"}) == 0
    assert suppress.ttl_from_env({"MXQ_SUPPRESS_TTL": "3600"}) == 3600
    for bad in ("-1", "soon", "1.5"):
        with pytest.raises(ValueError, match="MXQ_SUPPRESS_TTL"):
            suppress.ttl_from_env({"MXQ_SUPPRESS_TTL": bad})


# ------------------------------------------------------------------ the release script
def test_release_writes_the_entry_only_with_the_record(redis_server, monkeypatch):
    srv = redis_server()
    st = Store(make_client(srv.url), PipelineSettings(redis_url=srv.url, result_ttl=500))
    monkeypatch.setenv("MXQ_SUPPRESS_TTL", "1234")
    j = build_job(Item(message("Gone@SUP.test", "r1"), recipients=["Gone@SUP.test", "policy@sup.test"]),
                  max_size=10**6, now=1000.0)
    st.submit([j], now=1000.0)
    (it,) = st.claim(DOMAIN, "tok", now=1000.0)
    gone = dict(it.records[0], state="bounced", code=550, enhanced="5.1.1", text="User unknown", scope="recipient")
    policy = dict(it.records[1], state="bounced", code=550, enhanced="5.7.1", text="not allowed",
                  scope="recipient")
    st.release("tok", DOMAIN, [Outcome(it.wid, [("0", gone, ""), ("1", policy, "")])], now=1001.0)
    entry = json.loads(st.r.get("mxq:suppress:gone@sup.test"))
    assert entry == {"address": "gone@sup.test", "code": 550, "enhanced": "5.1.1", "text": "User unknown",
                     "job": j.id, "since": 1001.0, "source": "bounce"}
    assert 1200 < st.r.ttl("mxq:suppress:gone@sup.test") <= 1234
    assert st.r.keys("mxq:suppress:*") == [b"mxq:suppress:gone@sup.test"]
    # a late writer without the lease whose record is not applied writes no entry either
    st.r.delete("mxq:suppress:gone@sup.test")
    st.release("tok", DOMAIN, [Outcome(it.wid, [("0", gone, "")])], now=1002.0)
    assert st.r.keys("mxq:suppress:*") == []
    # MXQ_SUPPRESS_TTL=0: no automatic entries
    monkeypatch.setenv("MXQ_SUPPRESS_TTL", "0")
    k = build_job(Item(message("gone2@sup.test", "r2")), max_size=10**6, now=1000.0)
    st.submit([k], now=1000.0)
    (it2,) = st.claim(DOMAIN, "tok2", now=1000.0)
    st.release("tok2", DOMAIN, [Outcome(it2.wid, [("0", dict(gone, address="gone2@sup.test"), "")])], now=1003.0)
    assert st.r.keys("mxq:suppress:*") == []
    st.r.close()


# ------------------------------------------------------------------ end to end
def test_bounce_suppresses_then_remove_lets_mail_through(pipeline, sink):
    p = pipeline()
    p.worker(concurrency=1)
    first = tasks.submit(message("Gone.User@sup.test", "first"), recipients=["Gone.User@sup.test"])
    p.wait_done([first], timeout=30)
    r = tasks.status(first)["recipients"][0]
    assert (r["state"], r["code"], r["enhanced"]) == ("bounced", 550, "5.1.1")
    client = p.redis.client()
    assert 29 * 86400 < client.ttl("mxq:suppress:gone.user@sup.test") <= 30 * 86400     # default 30 days

    # A new submission: the suppressed address (in another case) is final at once and never sent;
    # the other recipient of the same job is delivered.
    second = tasks.submit(message("x@sup.test", "second"), recipients=["GONE.USER@sup.test", "ann@sup.test"])
    st = tasks.status(second)
    sup = st["recipients"][0]
    assert sup["state"] == "suppressed" and sup["enhanced"] == "5.1.1" and sup["attempts"] == 0
    assert "550 5.1.1" in sup["text"] and first in sup["text"]
    p.wait_done([second], timeout=30)
    st = tasks.status(second)
    assert st["state"] == "done"
    assert [r["state"] for r in st["recipients"]] == ["suppressed", "delivered"]
    assert received(sink) == ["ann@sup.test"]

    # Every recipient suppressed: done at submission, kept like any finished job, nothing queued.
    only = tasks.submit(message("gone.user@sup.test", "third"))
    st = tasks.status(only)
    assert st["state"] == "done" and st["recipients"][0]["state"] == "suppressed"
    assert 0 < client.ttl(f"mxq:job:{only}") <= PipelineSettings.from_env().result_ttl
    assert client.llen(f"mxq:ready:{DOMAIN}") == 0

    # The server now knows the user; the operator lifts the suppression: delivered again.
    sink.rules.pop("gone")
    assert suppress.Suppressions(client).remove("gone.user@sup.test") is True
    assert suppress.Suppressions(client).remove("gone.user@sup.test") is False
    again = tasks.submit(message("gone.user@sup.test", "fourth"))
    p.wait_done([again], timeout=30)
    assert tasks.status(again)["recipients"][0]["state"] == "delivered"
    assert received(sink) == ["ann@sup.test", "gone.user@sup.test"]


def test_other_permanent_failures_do_not_suppress(pipeline, sink):
    p = pipeline()
    p.worker(concurrency=1)
    ids = [tasks.submit(message(a, f"o{i}")) for i, a in enumerate(["policy@sup.test", "full@sup.test"])]
    p.wait_done(ids, timeout=30)
    assert [tasks.status(j)["recipients"][0]["enhanced"] for j in ids] == ["5.7.1", "5.2.2"]
    assert p.redis.client().keys("mxq:suppress:*") == []
    # resubmitted: tried again at the server (and refused again), not suppressed
    again = tasks.submit(message("policy@sup.test", "o3"))
    p.wait_done([again], timeout=30)
    assert tasks.status(again)["recipients"][0]["state"] == "bounced"
    assert sink.stats["rcpt_refused"] == 3


def test_operator_entry_and_submit_many(pipeline, sink):
    p = pipeline()
    client = p.redis.client()
    s = suppress.Suppressions(client)
    entry = s.add("Blocked@sup.test", ttl=60, text="complaint")
    assert entry["address"] == "blocked@sup.test" and 55 <= client.ttl("mxq:suppress:blocked@sup.test") <= 60
    assert [e["address"] for e in s.list()] == ["blocked@sup.test"]
    assert s.get("blocked@sup.test")["source"] == "operator"
    ids = tasks.submit_many([tasks.Item(message("blocked@sup.test", "m1")),
                             tasks.Item(message("free@sup.test", "m2")),
                             tasks.Item(message("x@sup.test", "m3"), recipients=["blocked@sup.test", "free2@sup.test"])])
    states = [[r["state"] for r in tasks.status(j)["recipients"]] for j in ids]
    assert states == [["suppressed"], ["queued"], ["suppressed", "queued"]]
    rec = tasks.status(ids[0])["recipients"][0]
    assert rec["enhanced"] == "5.7.1" and "complaint" in rec["text"]
    p.worker(concurrency=1)
    p.wait_done(ids, timeout=30)
    assert received(sink) == ["free2@sup.test", "free@sup.test"]
    wait_until(lambda: client.llen("mxq:ready:" + DOMAIN) == 0, 5, "the lane to drain")


# ------------------------------------------------------------------ only that recipient's own refusal
SENDER_IP, DOT_IP = "127.0.72.11", "127.0.72.12"


@pytest.fixture(scope="module")
def sender_trouble(dns_server):
    """snd.sup.test refuses every MAIL FROM for the sender's domain (5.1.8); its RCPT rules refuse
    'sndrcpt*' for the sender (Postfix's smtpd_delay_reject) and 'other*' naming another address;
    dot.sup.test accepts every RCPT and refuses after DATA with 5.1.1."""
    dns_server.add({"snd.sup.test": {"MX": [[10, "mx.snd.sup.test"]]}, "mx.snd.sup.test": {"A": [SENDER_IP]},
                    "rcpt.sup.test": {"MX": [[10, "mx.rcpt.sup.test"]]}, "mx.rcpt.sup.test": {"A": [IP]},
                    "dot.sup.test": {"MX": [[10, "mx.dot.sup.test"]]}, "mx.dot.sup.test": {"A": [DOT_IP]}})
    snd = start_server(SENDER_IP, 25, Behaviour(
        hostname="mx.snd.sup.test", mail_reply="553 5.1.8 <shop@src.sup.test>: Sender address rejected: "
                                               "Domain not found"))
    dot = start_server(DOT_IP, 25, Behaviour(hostname="mx.dot.sup.test",
                                             data_reply="550 5.1.1 Recipient address rejected after DATA"))
    yield snd, dot
    snd.stop()
    dot.stop()


def test_sender_and_message_refusals_never_suppress_recipients(pipeline, sink, sender_trouble):
    """MAIL FROM refused 5.1.8 (copied to every recipient), a RCPT refused about the sender (5.1.8 at
    RCPT time), a reply naming another address, a final reply shared by two recipients: all bounce,
    none is suppressed.  The final reply of a one-recipient transaction with 5.1.1 is that recipient's."""
    sink.rules.update({"sndrcpt": "550 5.1.8 <shop@src.sup.test>: Sender address rejected: Domain not found",
                       "other": "550 5.1.1 <someone.else@elsewhere.test>: Recipient address rejected"})
    p = pipeline()
    p.worker(concurrency=1)
    jobs = [tasks.submit(message("a@snd.sup.test", "s1"), recipients=["a@snd.sup.test", "b@snd.sup.test"]),
            tasks.submit(message("sndrcpt.c@sup.test", "s2"),
                         recipients=["sndrcpt.c@rcpt.sup.test", "other.d@rcpt.sup.test"]),
            tasks.submit(message("e@dot.sup.test", "s3"), recipients=["e@dot.sup.test", "f@dot.sup.test"]),
            tasks.submit(message("g@dot.sup.test", "s4"))]
    p.wait_done(jobs, timeout=30)
    recs = {r["address"]: r for j in jobs for r in tasks.status(j)["recipients"]}
    assert {a: (r["state"], r["enhanced"]) for a, r in recs.items()} == {
        "a@snd.sup.test": ("bounced", "5.1.8"), "b@snd.sup.test": ("bounced", "5.1.8"),
        "sndrcpt.c@rcpt.sup.test": ("bounced", "5.1.8"), "other.d@rcpt.sup.test": ("bounced", "5.1.1"),
        "e@dot.sup.test": ("bounced", "5.1.1"), "f@dot.sup.test": ("bounced", "5.1.1"),
        "g@dot.sup.test": ("bounced", "5.1.1")}
    client = p.redis.client()
    assert client.keys("mxq:suppress:*") == [b"mxq:suppress:g@dot.sup.test"]
    # the same recipients submitted again are tried again, not suppressed
    again = tasks.submit(message("b@snd.sup.test", "s5"), recipients=["b@snd.sup.test", "f@dot.sup.test"])
    # The worker is running: by now it may have tried them (queued or already bounced), but
    # submission never marked them suppressed.
    assert "suppressed" not in [r["state"] for r in tasks.status(again)["recipients"]]
    p.wait_done([again], timeout=30)
    final = {r["address"]: (r["state"], r["enhanced"], r["attempts"]) for r in tasks.status(again)["recipients"]}
    assert final == {"b@snd.sup.test": ("bounced", "5.1.8", 1), "f@dot.sup.test": ("bounced", "5.1.1", 1)}

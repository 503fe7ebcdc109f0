"""Event webhooks (mxq.tasks.webhooks) against a real HTTP server on loopback.

The receiver is ``http.server.ThreadingHTTPServer`` in a thread of this process, recording every
request (headers and raw body) and answering from a script: a list of statuses, or never (it holds
the request open).  Events come from real ``celery worker`` (and ``celery beat``) processes
delivering to an aiosmtpd server on 127.0.73.10:25 (``hook.test``; local parts ``reject*`` get
550 5.1.1, ``later*`` 450 4.2.0), found through the session's DNS server.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from mxq import tasks
from mxq.tasks import webhooks
from tests.fixtures_infra import wait_until
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

DOMAIN = "hook.test"
IP = "127.0.73.10"
SECRET = "whsec-test-0123456789"
PAYLOAD_KEYS = {"id", "job", "recipient", "domain", "state", "code", "enhanced", "text", "exchange", "ip",
                "relay", "attempts", "next_attempt", "timestamp"}


class Receiver:
    """A webhook endpoint: records requests; answers ``statuses`` in order (then 200), or never with ``hang``."""

    def __init__(self, statuses=(), hang: bool = False, tls=None):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        self.hang = hang
        self.released = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer.lock:
                    status = None if outer.hang else (outer.statuses.pop(0) if outer.statuses else 200)
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                           "status": status, "at": time.monotonic()})
                if status is None:
                    outer.released.wait(60)         # never answers while the test runs
                    return
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        # Bound and listening once constructed: connects succeed from here on.
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:         # an ssl.SSLContext for the server side: https
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/hooks/mxq"

    def events(self) -> list[dict]:
        with self.lock:
            return [json.loads(r["body"]) for r in self.requests]

    def stop(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(**kw) -> Receiver:
        r = Receiver(**kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


@pytest.fixture(scope="module")
def sink(dns_server):
    dns_server.add({DOMAIN: {"MX": [[10, "mx." + DOMAIN]]}, "mx." + DOMAIN: {"A": [IP]}})
    srv = start_server(IP, 25, Behaviour(hostname="mx." + DOMAIN, keep_content=False))
    yield srv
    srv.stop()


def message(to: str, tag: str) -> bytes:
    return (f"From: shop@src.hook.test\r\nTo: {to}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@src.hook.test>\r\n\r\nsecret body {tag}\r\n").encode()


# ------------------------------------------------------------------ pure parts
def test_config_from_env():
    off = webhooks.WebhookConfig.from_env({})
    assert not off.enabled and not off.wants("delivered")
    c = webhooks.WebhookConfig.from_env({"MXQ_WEBHOOK_URL": "https://h.example/x", "MXQ_WEBHOOK_SECRET": "s3cr3t-value",
                                         "MXQ_WEBHOOK_TIMEOUT": "2.5", "MXQ_WEBHOOK_RETRY_SCHEDULE": "1,5"})
    assert c.enabled and c.timeout == 2.5 and [c.backoff(n) for n in (1, 2, 3)] == [1, 5, 5]
    assert c.wants("bounced") and c.wants("suppressed") and not c.wants("deferred")
    assert c.secret == "s3cr3t-value" and "s3cr3t-value" not in repr(c)
    assert c.concurrency == 1 and webhooks.WebhookConfig.from_env({"MXQ_WEBHOOK_CONCURRENCY": "3"}).concurrency == 3
    assert webhooks.parse_events("all") == frozenset(webhooks.ALL_EVENTS)
    assert webhooks.parse_events("bounced, deferred") == {"bounced", "deferred"}
    for env, name in (({"MXQ_WEBHOOK_URL": "ftp://h.example/"}, "MXQ_WEBHOOK_URL"),
                      ({"MXQ_WEBHOOK_URL": "h.example/hook"}, "MXQ_WEBHOOK_URL"),
                      ({"MXQ_WEBHOOK_URL": "http:///nohost"}, "MXQ_WEBHOOK_URL"),
                      ({"MXQ_WEBHOOK_EVENTS": "delivered,opened"}, "MXQ_WEBHOOK_EVENTS"),
                      ({"MXQ_WEBHOOK_TIMEOUT": "0"}, "MXQ_WEBHOOK_TIMEOUT"),
                      ({"MXQ_WEBHOOK_TIMEOUT": "600"}, "MXQ_WEBHOOK_TIMEOUT"),
                      ({"MXQ_WEBHOOK_RETRY_SCHEDULE": "x"}, "MXQ_WEBHOOK_RETRY_SCHEDULE"),
                      ({"MXQ_WEBHOOK_CONCURRENCY": "0"}, "MXQ_WEBHOOK_CONCURRENCY")):
        with pytest.raises(ValueError, match=name):
            webhooks.WebhookConfig.from_env(env)
    # a password in the URL never shows in an error or a log line
    with pytest.raises(ValueError) as e:
        webhooks.WebhookConfig.from_env({"MXQ_WEBHOOK_URL": "ftp://u:hunter2@h.example/"})
    assert "hunter2" not in str(e.value)
    assert webhooks.redact("https://u:hunter2@h.example:8443/p") == "https://***@h.example:8443/p"


def test_signature_scheme():
    body = b'{"id":"x"}'
    sig = "sha256=" + webhooks.sign(SECRET, 1700000000, body)
    assert webhooks.verify(SECRET, body, "1700000000", sig, now=1700000100)
    assert not webhooks.verify(SECRET, body + b" ", "1700000000", sig, now=1700000100)     # body changed
    assert not webhooks.verify(SECRET, body, "1700000001", sig, now=1700000100)            # timestamp changed
    assert not webhooks.verify("other", body, "1700000000", sig, now=1700000100)           # wrong secret
    assert not webhooks.verify(SECRET, body, "1700000000", sig, now=1700000000 + 301)      # replayed later
    assert not webhooks.verify(SECRET, body, None, sig) and not webhooks.verify(SECRET, body, "1", "md5=x")
    # the scheme as documented, recomputed independently
    import hashlib
    import hmac
    assert sig == "sha256=" + hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()


def test_post_https_basic_auth_redirects_and_refusals(receiver, monkeypatch, tmp_path):
    from mxq.sandbox.smtpd import make_tls

    tls = make_tls("127.0.0.1", directory=tmp_path)
    hook = receiver(statuses=[204, 302, 400], tls=tls.server_context)
    url = hook.url.replace("https://", "https://ops:p%40ss@")
    cfg = webhooks.WebhookConfig.from_env({"MXQ_WEBHOOK_URL": url, "MXQ_WEBHOOK_SECRET": SECRET,
                                           "MXQ_WEBHOOK_TIMEOUT": "3"})
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca_file)        # trust the test CA (as an operator would)
    r = webhooks.post(cfg, "e1", b'{"id":"e1"}')
    assert (r.ok, r.reachable, r.detail) == (True, True, "HTTP 204")
    req = hook.requests[0]
    assert req["headers"]["Authorization"] == "Basic b3BzOnBAc3M="      # ops:p@ss, not in the Host line
    assert req["headers"]["Host"] == f"127.0.0.1:{hook.server.server_address[1]}"
    assert webhooks.verify(SECRET, req["body"], req["headers"]["X-Mxq-Timestamp"], req["headers"]["X-Mxq-Signature"])
    r = webhooks.post(cfg, "e2", b"{}")                     # 302: an answer, not followed
    assert (r.ok, r.reachable, r.detail) == (False, True, "HTTP 302") and len(hook.requests) == 2
    r = webhooks.post(cfg, "e3", b"{}")
    assert (r.ok, r.reachable, r.detail) == (False, True, "HTTP 400")
    # a certificate nobody vouches for: refused before anything is sent
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "empty"))
    r = webhooks.post(cfg, "e4", b"{}")
    assert not r.ok and not r.reachable and "CERTIFICATE" in r.detail.upper()
    assert len(hook.requests) == 3
    # nothing listening: unreachable at once
    closed = webhooks.WebhookConfig.from_env({"MXQ_WEBHOOK_URL": "http://127.0.0.1:9/x", "MXQ_WEBHOOK_TIMEOUT": "3"})
    r = webhooks.post(closed, "e5", b"{}")
    assert not r.ok and not r.reachable


# ------------------------------------------------------------------ through the pipeline
def test_delivered_bounced_and_suppressed_events_signed(pipeline, sink, receiver):
    hook = receiver()
    p = pipeline(MXQ_WEBHOOK_URL=hook.url, MXQ_WEBHOOK_SECRET=SECRET)
    p.worker(concurrency=2)
    # NOTIFY=NEVER: no bounce report (a report is a job of its own, with events of its own)
    job = tasks.submit(message("ann@hook.test", "e1"), recipients=["ann@hook.test", "reject.bob@hook.test"],
                       notify=["NEVER"])
    wait_until(lambda: len(hook.requests) >= 2, 30, "two webhook events")
    by_state = {e["state"]: e for e in hook.events()}
    assert set(by_state) == {"delivered", "bounced"}
    d, b = by_state["delivered"], by_state["bounced"]
    assert set(d) == PAYLOAD_KEYS and set(b) == PAYLOAD_KEYS
    assert (d["job"], d["recipient"], d["domain"], d["code"], d["exchange"], d["ip"], d["attempts"]) == \
        (job, "ann@hook.test", DOMAIN, 250, "mx." + DOMAIN, IP, 1)
    assert (b["job"], b["recipient"], b["code"], b["enhanced"]) == (job, "reject.bob@hook.test", 550, "5.1.1")
    assert abs(d["timestamp"] - time.time()) < 60 and d["relay"] is False
    status = {r["address"]: r for r in tasks.status(job)["recipients"]}
    assert b["text"] == status["reject.bob@hook.test"]["text"]
    for r in hook.requests:
        h = r["headers"]
        assert r["path"] == "/hooks/mxq" and h["Content-Type"] == "application/json"
        assert h["X-Mxq-Event"] == json.loads(r["body"])["id"]
        assert webhooks.verify(SECRET, r["body"], h["X-Mxq-Timestamp"], h["X-Mxq-Signature"])
        assert not webhooks.verify("wrong-secret", r["body"], h["X-Mxq-Timestamp"], h["X-Mxq-Signature"])
        assert b"secret body" not in r["body"] and b"shop@src" not in r["body"] and SECRET.encode() not in r["body"]

    # The bounce suppressed the address: a new submission makes a "suppressed" event (from the producer).
    again = tasks.submit(message("reject.bob@hook.test", "e2"))
    wait_until(lambda: len(hook.requests) >= 3, 30, "the suppressed event")
    s = hook.events()[2]
    assert (s["state"], s["job"], s["recipient"], s["code"]) == ("suppressed", again, "reject.bob@hook.test", None)
    client = p.redis.client()
    wait_until(lambda: not client.keys("mxq:hook:*"), 10, "delivered events to be deleted")
    assert client.llen("mxq:ready:!w") == 0 and client.zcard("mxq:deferred") == 0
    assert len(hook.requests) == 3           # one POST per event


def test_failed_post_is_retried_through_the_deferred_queue(pipeline, sink, receiver):
    hook = receiver(statuses=[500])
    p = pipeline(MXQ_WEBHOOK_URL=hook.url, MXQ_WEBHOOK_SECRET=SECRET, MXQ_WEBHOOK_RETRY_SCHEDULE="1")
    p.worker(concurrency=1)
    p.beat()
    job = tasks.submit(message("carl@hook.test", "r1"))
    wait_until(lambda: len(hook.requests) >= 2, 30, "the event and its retry")
    first, second = hook.requests[:2]
    assert (first["status"], second["status"]) == (500, 200)
    assert first["body"] == second["body"]                         # the same event, sent again
    assert json.loads(second["body"])["job"] == job
    assert second["at"] - first["at"] >= 0.9                       # after the 1 s back-off, not at once
    for r in (first, second):
        assert webhooks.verify(SECRET, r["body"], r["headers"]["X-Mxq-Timestamp"], r["headers"]["X-Mxq-Signature"])
    client = p.redis.client()
    wait_until(lambda: not client.keys("mxq:hook:*"), 10, "the event to be deleted after the 200")
    time.sleep(2.5)                  # two more scheduler ticks and back-off steps: nothing is sent again
    assert len(hook.requests) == 2
    assert "failed (HTTP 500)" in p.logs()


def test_hanging_endpoint_never_slows_delivery(pipeline, sink, receiver):
    hook = receiver(hang=True)
    p = pipeline(MXQ_WEBHOOK_URL=hook.url, MXQ_WEBHOOK_TIMEOUT="6", MXQ_WEBHOOK_RETRY_SCHEDULE="30")
    p.worker(concurrency=2)
    p.beat()
    # First event: its POST hangs, holding one of the worker's two processes for up to 6 s.
    first = tasks.submit(message("first@hook.test", "h-first"))
    wait_until(lambda: len(hook.requests) >= 1, 15, "the first POST to reach the hanging endpoint")
    hung_at = time.monotonic()
    # Meanwhile 40 more messages go through the other process, well within that timeout.
    rcpts = [f"u{i}@hook.test" for i in range(40)]
    ids = tasks.submit_many([tasks.Item(message(r, f"h{i}"), recipients=[r]) for i, r in enumerate(rcpts)])
    p.wait_done(ids, timeout=30)
    elapsed = time.monotonic() - hung_at
    assert elapsed < 5, f"40 deliveries took {elapsed:.1f} s while a webhook POST hung"
    assert all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in [first] + ids)
    assert [r["status"] for r in hook.requests] == [None]          # the first POST is still hanging
    client = p.redis.client()
    assert len(client.keys("mxq:hook:*")) == 41                    # every event stored, none lost
    # After the timeout the endpoint is held off for its back-off step (30 s) by every sender:
    # one POST in all, the other 40 events deferred untried.
    wait_until(lambda: client.zcard("mxq:deferred") == 41, 30, "all 41 events deferred")
    assert len(hook.requests) == 1
    assert 20 < client.pttl("mxq:webhook:down") / 1000 <= 30
    assert all(r["status"] is None for r in hook.requests)
    print(f"hanging endpoint: 40 delivered in {elapsed:.1f} s during a hung POST, {len(hook.requests)} POST(s) tried")


def test_all_events_include_deferrals_and_expiry(pipeline, sink, receiver):
    hook = receiver()
    p = pipeline(MXQ_WEBHOOK_URL=hook.url, MXQ_WEBHOOK_EVENTS="all", MXQ_MAX_LIFETIME="2")
    p.worker(concurrency=1)
    p.beat()
    job = tasks.submit(message("later.dan@hook.test", "a1"), notify=["NEVER"])
    p.wait_done([job], timeout=30)
    wait_until(lambda: any(e["state"] == "expired" for e in hook.events()), 20, "the expired event")
    states = [e["state"] for e in hook.events()]
    assert states[0] == "deferred" and states[-1] == "expired" and set(states) == {"deferred", "expired"}
    first = hook.events()[0]
    assert first["code"] == 450 and first["enhanced"] == "4.2.0" and first["next_attempt"] > first["timestamp"]
    assert len({e["id"] for e in hook.events()}) == len(states)       # one event per outcome
    assert "X-Mxq-Signature" not in hook.requests[0]["headers"]        # no secret: not signed


def test_bad_webhook_setting_refuses_submission(pipeline, monkeypatch):
    p = pipeline()
    monkeypatch.setenv("MXQ_WEBHOOK_URL", "file:///etc/passwd")
    with pytest.raises(ValueError, match="MXQ_WEBHOOK_URL"):
        tasks.submit(message("x@hook.test", "bad"))
    assert p.redis.client().dbsize() == 0

"""A worker SIGKILLed in the middle of a 64-message batch to a slow exchange (issue 9, the
test of finding 12): duplicates no more than the transactions awaiting their reply at the
kill (and any whose reply arrived in the last moments before it, not yet recorded).

Real pieces: redis-server, ``mxq worker`` and ``mxq scheduler`` processes, an aiosmtpd
exchange, the session's DNS server.  The destination is fast while mxq learns its latency
(so a connection takes the whole 64-message batch at once, ``mxq.tasks.qmgr.chunk_size``),
then answers each final dot after 0.25 s: the batch is delivered slowly over one
connection (``MXQ_SHAPING``: 1 connection), and the worker is killed a third of the way in.
"""

from __future__ import annotations

import collections
import time

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from tests.fixtures_infra import wait_until

pytest_plugins = ["tests.pipeline_fixtures"]

IP = "127.0.54.10"
DOMAIN = "kill64.test"
SENDER = "app@src.kill64.test"


@pytest.fixture
def exchange(dns_server):
    dns_server.add({DOMAIN: {"MX": [[10, f"mx.{DOMAIN}"]]}, f"mx.{DOMAIN}": {"A": [IP]}})
    srv = start_server(IP, 25, Behaviour(hostname=f"mx.{DOMAIN}", keep_content=True, size_limit=None))
    yield srv
    srv.stop()


def submit(tag: str, n: int) -> list[str]:
    items = [tasks.Item(f"From: {SENDER}\r\nTo: {tag}{i}@{DOMAIN}\r\nSubject: {tag} {i}\r\n"
                        f"Message-ID: <{tag}.{i}@src.kill64.test>\r\n\r\nbody\r\n".encode(),
                        sender=SENDER, recipients=[f"{tag}{i}@{DOMAIN}"]) for i in range(n)]
    return tasks.submit_many(items)


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_batch_resends_only_what_awaited_its_reply(pipeline, exchange):
    p = pipeline(MXQ_BATCH_SIZE="64", MXQ_SHAPING=f"{DOMAIN}=1c", MXQ_LEASE_SECONDS="3",
                 MXQ_DISPATCH_STALE="2")
    w1 = p.worker(concurrency=1)
    p.beat()
    warm = submit("w", 20)                              # the destination is fast: latency learned
    p.wait_done(warm, timeout=60)
    exchange.behaviour.delays["data_final"] = 0.25      # now each final reply takes 0.25 s
    ids = submit("k", 64)
    client = p.redis.client()

    def batch_held() -> int:
        return sum(len((client.get(b"mxq:batch:" + t) or b"").split(b"\n")) - 1
                   for t in client.zrange("mxq:lease", 0, -1))

    base = len(exchange.messages)
    wait_until(lambda: len(exchange.messages) - base >= 20, 60, "a third of the batch delivered")
    held = batch_held()
    stats = dict(exchange.stats)
    awaiting = stats.get("data", 0) - stats.get("messages", 0) - stats.get("data_refused", 0)
    w1.kill()                                           # SIGKILL: nothing recorded after this
    killed_at = time.time()
    stats = dict(exchange.stats)
    awaiting = max(awaiting, stats.get("data", 0) - stats.get("messages", 0) - stats.get("data_refused", 0))
    # replies that arrived in the moments before the kill (the recorder writes 10 ms after one)
    recent = sum(1 for m in exchange.messages if killed_at - 0.1 <= m.received_at <= killed_at)
    p.worker(concurrency=1)
    p.wait_done(ids, timeout=120)
    got = collections.Counter(m.email()["Message-ID"] for m in exchange.messages[base:])
    dups = sum(n - 1 for n in got.values())
    print(f"killed holding {held} of the batch's messages, {awaiting} awaiting their reply, {recent} replied "
          f"in the last 0.1 s: {dups} sent twice")
    assert len(got) == 64 and all(tasks.status(j)["recipients"][0]["state"] == "delivered" for j in ids)
    assert held >= 20                     # the kill did hit a large batch in the middle
    assert dups <= awaiting + recent      # only what was in flight is sent again

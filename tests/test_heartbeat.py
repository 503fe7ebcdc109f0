"""A lost heartbeat stops the batch (issue 9, finding 5): real redis-server, a scripted
aiosmtpd exchange.

- a batch's lease taken back by the scheduler (it ran out), or renewals failing for two
  thirds of a lease: the heartbeat says so (``Heartbeat.stopped``);
- the engine, given that as ``stop``, starts no new transaction once it is true (the
  delivery task passes ``stop=hb.stopped``): what it did not send comes back not attempted,
  instead of being sent by this worker while another one sends it too.
"""

from __future__ import annotations

import os
import time

import pytest

from mxq.tasks.graph import Heartbeat
from mxq.tasks.settings import PipelineSettings
from mxq.tasks.store import Store
from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, deliver_domain
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.timeouts import Timeouts
from mxq.sandbox.smtpd import Behaviour, start_server
from tests.fixtures_infra import wait_until
from tests.test_store import NOW, job

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"


def test_the_heartbeat_is_lost_when_the_lease_is_taken_back_or_cannot_be_renewed(redis_server):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    srv = redis_server()
    # no retries: a renewal against a stopped Redis fails at once (the worker's client retries ~30 s)
    client = redis.Redis.from_url(srv.url, socket_connect_timeout=0.2, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    st = Store(client, PipelineSettings(redis_url=srv.url, lease_seconds=0.9))
    st.submit([job(0), job(1)], now=NOW)
    st.claim("one.test", "kept", limit=1)
    st.claim("one.test", "taken", limit=1)
    with Heartbeat(st, "kept") as kept, Heartbeat(st, "taken") as taken:
        assert not kept.stopped() and not taken.stopped()
        st.r.zrem("mxq:lease", "taken")             # what the scheduler's tick does to a lease that ran out
        wait_until(taken.stopped, 5, "the heartbeat to notice its lease is gone")
        assert taken.lost
        time.sleep(0.9)                             # a whole lease (its own renewals, not a synchronisation)
        assert not kept.stopped() and not kept.lost   # renewed all along
        srv.stop()                                  # Redis away: renewals fail
        t = time.monotonic()
        wait_until(kept.stopped, 5, "the heartbeat to give up after two thirds of a lease without renewal")
        assert time.monotonic() - t < 0.9 and not kept.lost


@pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (port 25 on 127.0.33.x)")
def test_the_engine_starts_no_transaction_once_told_to_stop():
    srv = start_server("127.0.33.1", 25, Behaviour(hostname="mx.hb.test", delays={"mail": 0.3}))
    try:
        settings = Settings(helo_name="client.hb.test", dns_servers=parse_dns_servers("127.0.0.1:9"),
                            timeouts=Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=3,
                                              data_final=3))
        d = "[127.0.33.1]"
        envs = [Envelope(sender="a@src.hb.test", recipients=[Recipient(f"u{i}@{d}")],
                         content=f"Subject: {i}\r\n\r\nbody\r\n".encode()) for i in range(4)]
        done = []
        results = deliver_domain(d, envs, settings=settings, resolver=Resolver(settings),
                                 host_status=MemoryHostStatus(), on_done=lambda n, r: done.append(n),
                                 stop=lambda: len(done) >= 1)      # lost after the first message
        # the first message's final reply comes with the next message's replies (pipelining): that
        # one was in flight; nothing was started after
        sent = [rs[0].state for rs in results].count(State.DELIVERED)
        assert 1 <= sent <= 2
        assert [rs[0].state for rs in results[sent:]] == [State.QUEUED] * (4 - sent)
        assert all(rs[0].attempts == 0 for rs in results[sent:])
        assert len(srv.messages) == sent and srv.stats["mail"] == sent
    finally:
        srv.stop()

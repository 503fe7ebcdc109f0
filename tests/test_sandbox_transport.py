"""The sandbox's transport-security peers (mxq.sandbox.stack): MTA-STS domains served over HTTPS,
and the three relays (STARTTLS + AUTH, plain port 25, XOAUTH2) -- what a user of ``mxq up
--sandbox`` can point mxq at, checked with mxq's own settings from the sandbox's environment.

The sandbox runs on 127.0.187.x (DNS :53, SMTP :25 and :587, HTTPS :443) in the test session's
private network namespace.
"""

from __future__ import annotations

import os

import pytest

from mxq.sandbox import stack
from mxq.workers.config import Settings
from mxq.workers.delivery import deliver
from mxq.workers.message import prepare
from mxq.workers.mtasts import MTASTS, MemoryPolicyCache
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.tlsrpt import MemoryTLSReport, day_of

BASE = "127.0.187."
MESSAGE = b"From: <app@app.test>\r\nSubject: sandbox\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the sandbox binds ports 25, 53 and 443: needs root (in the test session's private netns)")
    sb = stack.start_sandbox(tmp_path_factory.mktemp("sandbox"), base_ip=BASE)
    yield sb
    sb.stop()


@pytest.fixture
def env(sandbox, monkeypatch):
    """The sandbox's environment in this process (SSL_CERT_FILE: the sandbox CA is trusted)."""
    monkeypatch.setenv("SSL_CERT_FILE", sandbox.env["SSL_CERT_FILE"])
    return dict(sandbox.env, MXQ_CONNECT_TIMEOUT="2", MXQ_COMMAND_TIMEOUT="2")


def send(settings, *rcpts, **kw):
    e = prepare(MESSAGE, sender="app@app.test", recipients=list(rcpts))
    return deliver(e, settings=settings, resolver=Resolver(settings), **kw)


def test_mta_sts_domains(sandbox, env):
    s = Settings.from_env(env)
    counts = MemoryTLSReport()
    resolver = Resolver(s)
    sts = MTASTS(resolver, MemoryPolicyCache())
    e = prepare(MESSAGE, sender="app@app.test", recipients=["a@secure.test", "b@stsmismatch.test"])
    ok, held = deliver(e, settings=s, resolver=resolver, mta_sts=sts, tls_report=counts)
    assert ok.state is State.DELIVERED and ok.exchange == "mx.secure.test"
    assert sandbox.messages("secure.test")[-1].tls
    assert held.state is State.DEFERRED and held.enhanced == "4.7.5" and "stsmismatch.test" in held.text
    assert not sandbox.messages("stsmismatch.test")
    [e1] = counts.entries(day_of(), ["secure.test"])
    assert e1["policy"]["policy-type"] == "sts" and (e1["ok"], e1["fail"]) == (1, 0)


def test_the_three_relays(sandbox, env):
    ip = f"{BASE}{stack.PLAIN_RELAY.octet}"
    plain = Settings.from_env(dict(env, MXQ_RELAY=f"smtp://{stack.PLAIN_RELAY.name}:25?tls=none",
                                   MXQ_RELAY_CLEARTEXT=ip, MXQ_RELAY_MODE="always"))
    oauth = Settings.from_env(dict(env, MXQ_RELAY=f"smtp://mxq%40relay.example@{stack.OAUTH_RELAY.name}",
                                   MXQ_RELAY_TOKEN_FILE=str(sandbox.token_file), MXQ_RELAY_MODE="always"))
    auth = Settings.from_env(dict(env, MXQ_RELAY=sandbox.relay_url, MXQ_RELAY_MODE="always"))
    for settings, name, tls, user in ((plain, stack.PLAIN_RELAY.name, False, None),
                                      (oauth, stack.OAUTH_RELAY.name, True, stack.OAUTH_USER),
                                      (auth, stack.RELAY.name, True, stack.RELAY_USER)):
        [r] = send(settings, f"someone@far-{name.split('.')[0]}.test")
        assert r.state is State.DELIVERED and r.relay and r.exchange == name, r
        m = sandbox.servers[name].messages[-1]
        assert (m.tls, m.auth_user) == (tls, user)

"""Destination policy (issue 9, item 11): mxq never connects to loopback, private, link-local, multicast
or unspecified addresses, whatever DNS or an address literal says, unless a setting allows them.

Real servers in the test's private network namespace: scripted aiosmtpd
exchanges on 127.0.0.1, on 10.0.0.1 and on 169.254.0.1 (both added to the
namespace's loopback for this module), each counting the connections it
got, and the sandbox DNS server pointing MX records at them.  The rest of
the suite sets ``MXQ_ALLOW_PRIVATE_DESTINATIONS=1`` (tests/conftest.py), so
these tests pass the policy explicitly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mxq.sandbox.smtpd import Behaviour, make_tls, start_server
from mxq.workers.config import RelayConfig, Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, deliver, deliver_domain
from mxq.workers.destinations import DestinationPolicy, refusal_kind
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.workers.timeouts import Timeouts

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
pytestmark = pytest.mark.skipif(not IN_NETNS, reason="needs the test network namespace (adds 10.0.0.1 to lo)")

ROOT = Path(__file__).resolve().parent.parent
MSG = b"From: a@src.test\r\nSubject: policy\r\n\r\nHello.\r\n"
FAST = Timeouts(connect=1, greeting=2, command=2, data_init=2, data_block=2, data_final=2, dns=3)
REFUSE = DestinationPolicy()
ALLOW = DestinationPolicy(allow_all=True)
EXTRA = ("10.0.0.1", "169.254.0.1")


@pytest.fixture(scope="module")
def addresses():
    """10.0.0.1 and 169.254.0.1 on the namespace's loopback for this module."""
    for ip in EXTRA:
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    yield
    for ip in EXTRA:
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], check=False)


@pytest.fixture
def servers():
    started = []

    def start(host, behaviour=None, port=25):
        srv = start_server(host, port, behaviour or Behaviour(hostname=f"mx.{host}"))
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


def settings_for(dns_server, policy: DestinationPolicy, **kw) -> Settings:
    return Settings(helo_name="client.policy.test", dns_servers=parse_dns_servers(dns_server.address),
                    timeouts=FAST, destinations=policy, **kw)


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="a@src.test", recipients=[Recipient(r) for r in rcpts], content=MSG)


def run(domain: str, settings: Settings, rcpt: str | None = None):
    [[r]] = deliver_domain(domain, [env(rcpt or f"u@{domain}")], settings=settings, resolver=Resolver(settings),
                           host_status=MemoryHostStatus())
    return r


@pytest.mark.parametrize("ip, kind", [("127.0.0.1", "loopback"), ("10.0.0.1", "private"),
                                      ("169.254.0.1", "link-local")])
def test_mx_pointing_at_internal_addresses_is_not_connected_to_unless_allowed(
        dns_server, servers, addresses, ip, kind):
    domain = f"{kind}.policy.test"
    dns_server.add({domain: {"MX": [[10, f"mx.{domain}"]]}, f"mx.{domain}": {"A": [ip]}})
    srv = servers(ip)
    t0 = time.monotonic()
    r = run(domain, settings_for(dns_server, REFUSE))
    assert time.monotonic() - t0 < 1.0
    assert srv.stats.get("connections", 0) == 0, "the policy must refuse before any connection"
    assert r.state is State.BOUNCED and r.enhanced == "5.4.4" and r.code is None
    assert f"mx.{domain}[{ip}] {kind}" in r.text and "MXQ_ALLOW_PRIVATE_DESTINATIONS" in r.text
    assert r.attempts == 0 and r.exchange is None
    # The one setting allows them.
    r = run(domain, settings_for(dns_server, ALLOW))
    assert r.state is State.DELIVERED and srv.stats["connections"] == 1 and len(srv.messages) == 1


def test_address_literals_are_refused_too(servers):
    srv = servers("127.0.0.1")
    s = Settings(helo_name="client.policy.test", timeouts=FAST, destinations=REFUSE)
    for rcpt, kind in [("x@[127.0.0.1]", "loopback"), ("x@[IPv6:::1]", "loopback"), ("x@[0.0.0.0]", "unspecified"),
                       ("x@[224.0.0.1]", "multicast"), ("x@[IPv6:::ffff:127.0.0.1]", "loopback")]:
        [r] = deliver(env(rcpt), settings=s)
        assert r.state is State.BOUNCED and r.enhanced == "5.4.4", (rcpt, r)
        assert f" {kind} address" in r.text and "is a" in r.text, r.text
    assert srv.stats.get("connections", 0) == 0
    [r] = deliver(env("x@[127.0.0.1]"), settings=Settings(helo_name="client.policy.test", timeouts=FAST,
                                                          destinations=ALLOW))
    assert r.state is State.DELIVERED and srv.stats["connections"] == 1


def test_refused_exchanges_are_skipped_and_allowed_networks_are_used(dns_server, servers, addresses):
    # MX 10 on loopback (refused), MX 20 on 10.0.0.1 (allowed by an allow-list of 10.0.0.0/8).
    domain = "mixed.policy.test"
    dns_server.add({domain: {"MX": [[10, f"mx1.{domain}"], [20, f"mx2.{domain}"]]},
                    f"mx1.{domain}": {"A": ["127.0.165.1"]}, f"mx2.{domain}": {"A": ["10.0.0.1"]}})
    loop, private = servers("127.0.165.1"), servers("10.0.0.1")
    policy = DestinationPolicy.parse("10.0.0.0/8")
    r = run(domain, settings_for(dns_server, policy))
    assert r.state is State.DELIVERED and r.ip == "10.0.0.1" and r.attempts == 1
    assert loop.stats.get("connections", 0) == 0 and len(private.messages) == 1
    # Without the allow-list both are refused: a bounce naming both.
    r = run(domain, settings_for(dns_server, REFUSE))
    assert r.state is State.BOUNCED and "127.0.165.1] loopback" in r.text and "10.0.0.1] private" in r.text


def test_implicit_mx_to_a_private_address_bounces(dns_server, servers, addresses):
    domain = "implicit.policy.test"
    dns_server.add({domain: {"A": ["10.0.0.1"]}})
    srv = servers("10.0.0.1")
    r = run(domain, settings_for(dns_server, REFUSE))
    assert r.state is State.BOUNCED and r.enhanced == "5.4.4" and "no MX record" in r.text and "private" in r.text
    assert srv.stats.get("connections", 0) == 0


def test_the_relay_is_the_operators_choice_and_never_refused(servers):
    # An internal relay on a private address is normal: the policy is about recipients' domains.
    bundle = make_tls("relay.policy.test", "127.0.165.5")
    relay = servers("127.0.165.5", Behaviour(starttls=bundle.server_context), port=587)
    s = Settings(helo_name="client.policy.test", timeouts=FAST, destinations=REFUSE,
                 relay=RelayConfig(host="127.0.165.5", port=587, implicit_tls=False), relay_mode="always")
    [r] = deliver(env("someone@anywhere.policy.test"), settings=s, relay_tls_context=bundle.client_context)
    assert r.state is State.DELIVERED and r.relay and len(relay.messages) == 1


def test_setting_parsing_and_the_default():
    assert Settings.from_env({}).destinations == DestinationPolicy()
    assert Settings.from_env({"MXQ_ALLOW_PRIVATE_DESTINATIONS": "1"}).destinations.allow_all
    assert Settings.from_env({"MXQ_ALLOW_PRIVATE_DESTINATIONS": "all"}).destinations.allow_all
    assert Settings.from_env({"MXQ_ALLOW_PRIVATE_DESTINATIONS": "0"}).destinations == DestinationPolicy()
    p = Settings.from_env({"MXQ_ALLOW_PRIVATE_DESTINATIONS": "10.20.0.0/16, fd00:25::/64"}).destinations
    assert p.refusal("10.20.1.2") is None and p.refusal("10.21.1.2") == "private"
    assert p.refusal("fd00:25::1") is None and p.refusal("fd00:26::1") == "private"
    assert p.refusal("127.0.0.1") == "loopback"
    with pytest.raises(ValueError, match="MXQ_ALLOW_PRIVATE_DESTINATIONS"):
        Settings.from_env({"MXQ_ALLOW_PRIVATE_DESTINATIONS": "10.0.0.0/8, intranet"})


@pytest.mark.parametrize("ip, kind", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("100.64.0.1", "shared"), ("192.0.2.1", "private"), ("255.255.255.255", "private"),
    ("::ffff:10.0.0.1", "private"), ("2002:a00:1::1", "private"), ("64:ff9b::7f00:1", "loopback"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("64:ff9b::808:808", None),
])
def test_refusal_kinds(ip, kind):
    assert refusal_kind(ip) == kind


def test_mxq_deliver_bounces_with_the_reason_by_default(dns_server, servers, tmp_path):
    domain = "cli.policy.test"
    dns_server.add({domain: {"MX": [[10, f"mx.{domain}"]]}, f"mx.{domain}": {"A": ["127.0.165.9"]}})
    srv = servers("127.0.165.9")
    path = tmp_path / "m.eml"
    path.write_bytes(b"From: a@src.test\nTo: b@" + domain.encode() + b"\nSubject: x\n\nhello\n")
    e = dict(os.environ, PYTHONPATH=str(ROOT), MXQ_CONNECT_TIMEOUT="1", MXQ_COMMAND_TIMEOUT="2")
    e.pop("MXQ_ALLOW_PRIVATE_DESTINATIONS", None)
    for k in ("MXQ_RELAY", "MXQ_RELAY_MODE", "MXQ_REDIS_URL"):
        e.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "deliver", str(path)], capture_output=True,
                       env=e, cwd=ROOT, timeout=30)
    assert p.returncode == 69, p.stderr
    assert b"bounced" in p.stdout and b"loopback" in p.stdout
    assert srv.stats.get("connections", 0) == 0
    e["MXQ_ALLOW_PRIVATE_DESTINATIONS"] = "1"
    p = subprocess.run([sys.executable, "-m", "mxq.tasks.cli", "deliver", str(path)], capture_output=True,
                       env=e, cwd=ROOT, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(srv.messages) == 1

"""deliver() / deliver_domain() against real servers: the sandbox DNS server and scripted aiosmtpd MXs.

Every domain is under ``dlv.test``; every test uses its own 127.0.1.x
addresses, so servers of different tests never meet.  Timeouts are short
(connect 1 s, greeting 1.5 s) so the "never answers" cases stay quick.
"""

from __future__ import annotations

import logging
import re
import time

import pytest

from mxq.workers.config import RelayConfig, Settings, parse_dns_servers
from mxq.workers.delivery import MemoryHostStatus, deliver, deliver_domain
from mxq.workers.envelope import Envelope, Recipient
from mxq.workers.message import prepare
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.sandbox.smtpd import Behaviour, make_tls, start_server, start_silent_server
from mxq.workers.timeouts import Timeouts

FAST = Timeouts(connect=1, greeting=1.5, command=2, data_init=2, data_block=2, data_final=2)
MESSAGE = b"From: Sender <sender@src.test>\r\nSubject: hello\r\n\r\nHello there.\r\n"


@pytest.fixture
def servers():
    """``servers(host, behaviour)`` starts a scripted server on host:25 (or ``port=``); all stop at teardown."""
    started = []

    def start(host, behaviour=None, port=25):
        srv = start_server(host, port, behaviour or Behaviour(hostname=f"mx.{host}"))
        started.append(srv)
        return srv

    def silent(host, mode="greeting", port=25):
        srv = start_silent_server(host, port, mode)
        started.append(srv)
        return srv

    start.silent = silent
    yield start
    for s in started:
        s.stop()


@pytest.fixture
def settings(dns_server):
    return Settings(helo_name="client.dlv.test", dns_servers=parse_dns_servers(dns_server.address),
                    timeouts=FAST)


@pytest.fixture
def resolver(settings):
    return Resolver(settings)


def env(*recipients, sender="sender@src.test", id=None, content=MESSAGE):
    e = prepare(content, sender=sender, recipients=list(recipients))
    e.id = id
    return e


def mx_domain(dns_server, domain, *mxs):
    """Serve ``domain`` with MX records ``(preference, name, ip)``."""
    records = {domain: {"MX": [[p, n] for p, n, _ in mxs]}}
    for _, name, ip in mxs:
        records.setdefault(name, {"A": []})["A"].append(ip)
    dns_server.add(records)


def by_address(results):
    return {r.address: r for r in results}


# -- the retry chain --------------------------------------------------------------------------------

def test_preference_order_first_exchange_delivers(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "pref.dlv.test", (20, "mx2.pref.dlv.test", "127.0.1.2"),
              (10, "mx1.pref.dlv.test", "127.0.1.1"))
    mx1, mx2 = servers("127.0.1.1"), servers("127.0.1.2")
    [r] = deliver(env("bob@pref.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED
    assert (r.exchange, r.ip, r.relay, r.attempts) == ("mx1.pref.dlv.test", "127.0.1.1", False, 1)
    assert r.code == 250 and r.enhanced == "2.0.0"
    assert [m.rcpt_tos for m in mx1.messages] == [["bob@pref.dlv.test"]]
    assert mx2.stats["connections"] == 0


def test_first_refuses_second_accepts(dns_server, servers, settings, resolver):
    # Nothing listens on 127.0.1.3: connection refused at once.
    mx_domain(dns_server, "refused.dlv.test", (10, "mx1.refused.dlv.test", "127.0.1.3"),
              (20, "mx2.refused.dlv.test", "127.0.1.4"))
    mx2 = servers("127.0.1.4")
    [r] = deliver(env("bob@refused.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED
    assert (r.exchange, r.ip, r.attempts) == ("mx2.refused.dlv.test", "127.0.1.4", 2)
    assert len(mx2.messages) == 1


def test_first_never_answers_second_accepts(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "silent.dlv.test", (10, "mx1.silent.dlv.test", "127.0.1.5"),
              (20, "mx2.silent.dlv.test", "127.0.1.6"))
    servers.silent("127.0.1.5", mode="greeting")
    mx2 = servers("127.0.1.6")
    t0 = time.monotonic()
    [r] = deliver(env("bob@silent.dlv.test"), settings=settings, resolver=resolver)
    elapsed = time.monotonic() - t0
    assert r.state is State.DELIVERED and r.exchange == "mx2.silent.dlv.test" and r.attempts == 2
    assert FAST.greeting <= elapsed < FAST.greeting + 3     # waited for the greeting timeout, once
    assert len(mx2.messages) == 1


def test_first_greets_421_second_accepts(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "busy.dlv.test", (10, "mx1.busy.dlv.test", "127.0.1.7"),
              (20, "mx2.busy.dlv.test", "127.0.1.8"))
    mx1 = servers("127.0.1.7", Behaviour(greeting_code=421))
    mx2 = servers("127.0.1.8")
    [r] = deliver(env("bob@busy.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.exchange == "mx2.busy.dlv.test"
    assert mx1.stats["connections"] == 1 and not mx1.messages and len(mx2.messages) == 1


def test_5xx_greeting_skipped_unless_final(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "g554.dlv.test", (10, "mx1.g554.dlv.test", "127.0.1.9"),
              (20, "mx2.g554.dlv.test", "127.0.1.10"))
    servers("127.0.1.9", Behaviour(greeting_code=554))
    mx2 = servers("127.0.1.10")
    [r] = deliver(env("bob@g554.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.exchange == "mx2.g554.dlv.test" and len(mx2.messages) == 1
    # The only (so final) exchange greets 554: bounced.
    mx_domain(dns_server, "g554only.dlv.test", (10, "mx1.g554only.dlv.test", "127.0.1.9"))
    [r] = deliver(env("bob@g554only.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.BOUNCED and r.code == 554


def test_greylisted_at_first_delivered_by_second(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "grey.dlv.test", (10, "mx1.grey.dlv.test", "127.0.1.11"),
              (20, "mx2.grey.dlv.test", "127.0.1.12"))
    mx1 = servers("127.0.1.11", Behaviour(greylist=True))
    mx2 = servers("127.0.1.12")
    [r] = deliver(env("bob@grey.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.exchange == "mx2.grey.dlv.test" and r.attempts == 2
    assert mx1.stats["greylisted"] == 1 and not mx1.messages
    assert len(mx2.messages) == 1


def test_mixed_recipient_replies_in_one_transaction(dns_server, servers, settings, resolver):
    # mx1 has the default rules (reject* 550, later* 450); mx2 accepts everyone.
    mx_domain(dns_server, "mixed.dlv.test", (10, "mx1.mixed.dlv.test", "127.0.1.13"),
              (20, "mx2.mixed.dlv.test", "127.0.1.14"))
    mx1 = servers("127.0.1.13")
    mx2 = servers("127.0.1.14", Behaviour(rcpt_rules={}))
    results = deliver(env("ok@mixed.dlv.test", "reject1@mixed.dlv.test", "later1@mixed.dlv.test"),
                      settings=settings, resolver=resolver)
    assert [r.address for r in results] == ["ok@mixed.dlv.test", "reject1@mixed.dlv.test", "later1@mixed.dlv.test"]
    ok, rej, later = results
    assert ok.state is State.DELIVERED and ok.exchange == "mx1.mixed.dlv.test" and ok.attempts == 1
    assert rej.state is State.BOUNCED and rej.code == 550 and rej.enhanced == "5.1.1" and rej.attempts == 1
    assert later.state is State.DELIVERED and later.exchange == "mx2.mixed.dlv.test" and later.attempts == 2
    assert [m.rcpt_tos for m in mx1.messages] == [["ok@mixed.dlv.test"]]
    assert [m.rcpt_tos for m in mx2.messages] == [["later1@mixed.dlv.test"]]   # the bounced one never went on


def test_mixed_replies_single_exchange_450_ends_deferred(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "mixed1.dlv.test", (10, "mx1.mixed1.dlv.test", "127.0.1.15"))
    servers("127.0.1.15")
    ok, rej, later = deliver(env("ok@mixed1.dlv.test", "reject1@mixed1.dlv.test", "later1@mixed1.dlv.test"),
                             settings=settings, resolver=resolver)
    assert (ok.state, rej.state, later.state) == (State.DELIVERED, State.BOUNCED, State.DEFERRED)
    assert later.code == 450 and later.enhanced == "4.2.0" and "try again later" in later.text
    assert later.exchange == "mx1.mixed1.dlv.test" and later.ip == "127.0.1.15"


def test_452_too_many_recipients_two_transactions_one_connection(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "limit.dlv.test", (10, "mx1.limit.dlv.test", "127.0.1.16"))
    mx = servers("127.0.1.16", Behaviour(rcpt_limit=3))
    rcpts = [f"user{i}@limit.dlv.test" for i in range(5)]
    results = deliver(env(*rcpts), settings=settings, resolver=resolver)
    assert [r.state for r in results] == [State.DELIVERED] * 5
    assert all(r.attempts == 1 for r in results)
    assert [m.rcpt_tos for m in mx.messages] == [rcpts[:3], rcpts[3:]]
    assert mx.stats["connections"] == 1
    assert mx.stats["rset"] == 0       # a completed transaction needs no RSET


def test_max_recipients_splits_transactions(dns_server, servers, settings, resolver):
    from dataclasses import replace
    mx_domain(dns_server, "maxr.dlv.test", (10, "mx1.maxr.dlv.test", "127.0.1.17"))
    mx = servers("127.0.1.17")
    rcpts = [f"user{i}@maxr.dlv.test" for i in range(5)]
    results = deliver(env(*rcpts), settings=replace(settings, max_recipients=2), resolver=resolver)
    assert all(r.state is State.DELIVERED for r in results)
    assert [len(m.rcpt_tos) for m in mx.messages] == [2, 2, 1]
    assert mx.stats["connections"] == 1


def test_rejection_after_data_bounces(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "afterdata.dlv.test", (10, "mx1.afterdata.dlv.test", "127.0.1.18"),
              (20, "mx2.afterdata.dlv.test", "127.0.1.19"))
    servers("127.0.1.18", Behaviour(data_reply="554 5.6.0 Message rejected: spam"))
    mx2 = servers("127.0.1.19")
    a, b = deliver(env("a@afterdata.dlv.test", "b@afterdata.dlv.test"), settings=settings, resolver=resolver)
    for r in (a, b):
        assert r.state is State.BOUNCED and r.code == 554 and r.enhanced == "5.6.0"
        assert "spam" in r.text and r.exchange == "mx1.afterdata.dlv.test"
    assert mx2.stats["connections"] == 0     # a hard refusal is final


def test_4xx_after_data_goes_to_next_exchange(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "soft.dlv.test", (10, "mx1.soft.dlv.test", "127.0.1.20"),
              (20, "mx2.soft.dlv.test", "127.0.1.21"))
    servers("127.0.1.20", Behaviour(data_reply="451 4.3.0 Try again"))
    mx2 = servers("127.0.1.21")
    [r] = deliver(env("a@soft.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.exchange == "mx2.soft.dlv.test" and r.attempts == 2
    assert len(mx2.messages) == 1


def test_dropped_mid_data_is_deferred_never_delivered(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "drop.dlv.test", (10, "mx1.drop.dlv.test", "127.0.1.22"))
    mx = servers("127.0.1.22", Behaviour(drop_mid_data=20))
    big = MESSAGE + b"line of text\r\n" * 2000
    a, b = deliver(env("a@drop.dlv.test", "b@drop.dlv.test", content=big), settings=settings, resolver=resolver)
    for r in (a, b):
        assert r.state is State.DEFERRED and r.code is None and r.enhanced.startswith("4.")
        assert "lost connection" in r.text
    assert mx.stats["dropped"] == 1 and mx.messages == []


def test_null_mx_bounces_without_connection(dns_server, servers, settings, resolver):
    dns_server.add({"nullmx.dlv.test": {"MX": [[0, "."]], "A": ["127.0.1.23"]}})
    srv = servers("127.0.1.23")
    [r] = deliver(env("a@nullmx.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.BOUNCED and r.enhanced == "5.1.10" and r.attempts == 0 and r.exchange is None
    assert srv.stats["connections"] == 0


def test_nxdomain_bounces(dns_server, settings, resolver):
    [r] = deliver(env("a@nowhere.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.BOUNCED and r.enhanced == "5.1.2" and r.attempts == 0


def test_servfail_defers(dns_server, settings, resolver):
    dns_server.add({"servfail.dlv.test": {"SERVFAIL": True}})
    [r] = deliver(env("a@servfail.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DEFERRED and r.enhanced == "4.4.3" and r.attempts == 0


def test_implicit_mx(dns_server, servers, settings, resolver):
    dns_server.add({"implicit.dlv.test": {"A": ["127.0.1.24"]}})
    srv = servers("127.0.1.24")
    [r] = deliver(env("a@implicit.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.exchange == "implicit.dlv.test" and r.ip == "127.0.1.24"
    assert len(srv.messages) == 1


def test_address_literal(servers, settings, resolver):
    srv = servers("127.0.1.25")
    [r] = deliver(env("a@[127.0.1.25]"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.ip == "127.0.1.25" and r.domain == "[127.0.1.25]"
    assert srv.messages[0].rcpt_tos == ["a@[127.0.1.25]"]


def test_idn_domain(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "bücher.dlv.test", (10, "mx.bücher.dlv.test", "127.0.1.26"))
    srv = servers("127.0.1.26")
    [r] = deliver(env("anna@Bücher.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.domain == "bücher.dlv.test"
    assert r.exchange == "mx.xn--bcher-kva.dlv.test"
    assert srv.messages[0].rcpt_tos == ["anna@xn--bcher-kva.dlv.test"]
    assert "SMTPUTF8" not in srv.messages[0].mail_params   # an IDN domain alone needs no SMTPUTF8


def test_smtputf8_local_part(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "utf8.dlv.test", (10, "mx.utf8.dlv.test", "127.0.1.27"))
    srv = servers("127.0.1.27")
    [r] = deliver(env("jörg@utf8.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED
    m = srv.messages[0]
    assert m.rcpt_tos == ["jörg@utf8.dlv.test"] and "SMTPUTF8" in m.mail_params


def test_smtputf8_needed_but_not_offered_bounces(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "noutf8.dlv.test", (10, "mx.noutf8.dlv.test", "127.0.1.28"))
    srv = servers("127.0.1.28", Behaviour(smtputf8=False))
    [r] = deliver(env("jörg@noutf8.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.BOUNCED and r.enhanced == "5.6.7"
    assert srv.messages == []


def test_opportunistic_starttls(dns_server, servers, settings, resolver):
    tls = make_tls("mx.tls.dlv.test")
    mx_domain(dns_server, "tls.dlv.test", (10, "mx.tls.dlv.test", "127.0.1.29"))
    srv = servers("127.0.1.29", Behaviour(starttls=tls.server_context))
    [r] = deliver(env("a@tls.dlv.test"), settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED
    assert srv.messages[0].tls and srv.stats["starttls"] == 1


# -- relay ------------------------------------------------------------------------------------------

def relay_settings(settings, host, port=587, mode="always", user="relayuser", password="s3cret pw"):
    from dataclasses import replace
    return replace(settings, relay=RelayConfig(host, port, False, user, password), relay_mode=mode)


@pytest.mark.parametrize("mechanism,ip", [("PLAIN", "127.0.1.30"), ("LOGIN", "127.0.1.31")])
def test_relay_always_with_auth_over_starttls(dns_server, servers, settings, mechanism, ip, monkeypatch, caplog):
    name = f"relay{mechanism.lower()}.dlv.test"
    tls = make_tls(name)
    dns_server.add({name: {"A": [ip]}})
    relay = servers(ip, Behaviour(starttls=tls.server_context, require_starttls=True,
                                  auth={"relayuser": "s3cret pw"}, auth_mechanisms=(mechanism,),
                                  auth_required=True), port=587)
    # The relay certificate is checked against the trust store: SSL_CERT_FILE names our test CA.
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca_file)
    s = relay_settings(settings, name)
    resolver = Resolver(s)
    caplog.set_level(logging.INFO, logger="mxq.delivery")
    [r] = deliver(env(f"a@{mechanism.lower()}-norelaymx.dlv.test"), settings=s, resolver=resolver)
    assert r.state is State.DELIVERED and r.relay and r.exchange == name and r.ip == ip
    m = relay.messages[0]
    assert m.tls and m.auth_user == "relayuser"
    assert relay.sessions[0].auth_mechanism == mechanism
    assert dns_server.queries(f"{mechanism.lower()}-norelaymx.dlv.test", "MX") == 0   # no MX lookup at all
    assert "s3cret" not in caplog.text


def test_relay_smtps_implicit_tls(dns_server, servers, settings):
    from dataclasses import replace
    tls = make_tls("smtps.dlv.test")
    dns_server.add({"smtps.dlv.test": {"A": ["127.0.1.57"]}})
    relay = servers("127.0.1.57", Behaviour(implicit_tls=tls.server_context, auth={"relayuser": "s3cret pw"}),
                    port=465)
    s = replace(settings, relay=RelayConfig.parse("smtps://relayuser:s3cret%20pw@smtps.dlv.test"),
                relay_mode="always")
    [r] = deliver(env("a@viasmtps.dlv.test"), settings=s, resolver=Resolver(s), relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and r.relay and r.ip == "127.0.1.57"
    m = relay.messages[0]
    assert m.tls and m.auth_user == "relayuser"


def test_relay_unverified_certificate_defers(dns_server, servers, settings):
    tls = make_tls("badrelay.dlv.test")           # the client does not trust this CA
    dns_server.add({"badrelay.dlv.test": {"A": ["127.0.1.32"]}})
    relay = servers("127.0.1.32", Behaviour(starttls=tls.server_context, auth={"relayuser": "s3cret pw"}), port=587)
    s = relay_settings(settings, "badrelay.dlv.test")
    [r] = deliver(env("a@x.dlv.test"), settings=s, resolver=Resolver(s))
    assert r.state is State.DEFERRED and r.enhanced.startswith("4.7") and r.relay
    assert relay.messages == [] and relay.stats["auth_ok"] == 0


def test_relay_context_argument_and_wrong_password_defers(dns_server, servers, settings):
    tls = make_tls("ctxrelay.dlv.test")
    dns_server.add({"ctxrelay.dlv.test": {"A": ["127.0.1.33"]}})
    relay = servers("127.0.1.33", Behaviour(starttls=tls.server_context, auth={"relayuser": "other"}), port=587)
    s = relay_settings(settings, "ctxrelay.dlv.test")
    [r] = deliver(env("a@y.dlv.test"), settings=s, resolver=Resolver(s), relay_tls_context=tls.client_context)
    # A 535 from the relay is our configuration problem: deferred, never bounced.
    assert r.state is State.DEFERRED and r.code == 435 and r.relay
    assert relay.stats["auth_failed"] == 1 and relay.messages == []


def test_relay_fallback_when_every_exchange_is_silent(dns_server, servers, settings):
    mx_domain(dns_server, "fallback.dlv.test", (10, "mx1.fallback.dlv.test", "127.0.1.34"),
              (20, "mx2.fallback.dlv.test", "127.0.1.35"))
    servers.silent("127.0.1.34", mode="connect")
    servers.silent("127.0.1.35", mode="greeting")
    tls = make_tls("fbrelay.dlv.test")
    dns_server.add({"fbrelay.dlv.test": {"A": ["127.0.1.36"]}})
    relay = servers("127.0.1.36", Behaviour(starttls=tls.server_context, auth={"relayuser": "s3cret pw"}), port=587)
    s = relay_settings(settings, "fbrelay.dlv.test", mode="fallback")
    [r] = deliver(env("a@fallback.dlv.test"), settings=s, resolver=Resolver(s),
                  relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and r.relay and r.exchange == "fbrelay.dlv.test" and r.attempts == 3
    assert relay.messages[0].rcpt_tos == ["a@fallback.dlv.test"]


def test_bounced_recipient_is_not_relayed(dns_server, servers, settings):
    mx_domain(dns_server, "norelay.dlv.test", (10, "mx1.norelay.dlv.test", "127.0.1.37"))
    servers("127.0.1.37")
    tls = make_tls("nrrelay.dlv.test")
    dns_server.add({"nrrelay.dlv.test": {"A": ["127.0.1.38"]}})
    relay = servers("127.0.1.38", Behaviour(starttls=tls.server_context, auth={"relayuser": "s3cret pw"},
                                          rcpt_rules={}), port=587)
    s = relay_settings(settings, "nrrelay.dlv.test", mode="fallback")
    ok, rej, later = deliver(env("ok@norelay.dlv.test", "reject@norelay.dlv.test", "later@norelay.dlv.test"),
                             settings=s, resolver=Resolver(s), relay_tls_context=tls.client_context)
    assert ok.state is State.DELIVERED and not ok.relay
    assert rej.state is State.BOUNCED and not rej.relay
    assert later.state is State.DELIVERED and later.relay          # deferred at the MX: relayed
    assert [m.rcpt_tos for m in relay.messages] == [["later@norelay.dlv.test"]]


def test_servfail_with_fallback_relay_uses_relay(dns_server, servers, settings):
    dns_server.add({"sfrelay-dom.dlv.test": {"SERVFAIL": True}, "sfrelay.dlv.test": {"A": ["127.0.1.39"]}})
    tls = make_tls("sfrelay.dlv.test")
    relay = servers("127.0.1.39", Behaviour(starttls=tls.server_context, auth={"relayuser": "s3cret pw"}), port=587)
    s = relay_settings(settings, "sfrelay.dlv.test", mode="fallback")
    [r] = deliver(env("a@sfrelay-dom.dlv.test"), settings=s, resolver=Resolver(s),
                  relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and r.relay and len(relay.messages) == 1


# -- failure memory, connection reuse, results, log ---------------------------------------------------

def test_host_marked_down_is_skipped_on_the_next_delivery(dns_server, servers, settings, resolver, caplog):
    # Two domains share a dead primary MX (connect timeout) and a working backup.
    for d in ("down1.dlv.test", "down2.dlv.test"):
        mx_domain(dns_server, d, (10, "dead.down.dlv.test", "127.0.1.40"), (20, "backup.down.dlv.test", "127.0.1.41"))
    servers.silent("127.0.1.40", mode="connect")
    backup = servers("127.0.1.41")
    status = MemoryHostStatus()
    t0 = time.monotonic()
    [r1] = deliver(env("a@down1.dlv.test"), settings=settings, resolver=resolver, host_status=status)
    first = time.monotonic() - t0
    assert r1.state is State.DELIVERED and r1.attempts == 2
    assert status.is_down("127.0.1.40", 25) and not status.is_down("127.0.1.41", 25)
    caplog.set_level(logging.INFO, logger="mxq.delivery")
    t0 = time.monotonic()
    [r2] = deliver(env("b@down2.dlv.test"), settings=settings, resolver=resolver, host_status=status)
    second = time.monotonic() - t0
    assert r2.state is State.DELIVERED and r2.exchange == "backup.down.dlv.test"
    assert r2.attempts == 1                       # the dead host was not tried again
    assert first >= FAST.connect and second < FAST.connect
    assert "dead.down.dlv.test[127.0.1.40]:25 is marked down" in caplog.text
    assert len(backup.messages) == 2


def test_memory_host_status_expires():
    now = [100.0]
    hs = MemoryHostStatus(clock=lambda: now[0])
    hs.mark_down("127.0.0.9", 25, 60, "Connection refused")
    assert hs.is_down("127.0.0.9", 25) and hs.reason("127.0.0.9", 25) == "Connection refused"
    assert not hs.is_down("127.0.0.9", 587)
    now[0] += 61
    assert not hs.is_down("127.0.0.9", 25) and hs.reason("127.0.0.9", 25) is None


def test_multiple_envelopes_over_one_connection(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "batch.dlv.test", (10, "mx.batch.dlv.test", "127.0.1.42"))
    mx = servers("127.0.1.42", Behaviour(mail_reply=None))
    envs = [env("a@batch.dlv.test", sender="s1@src.test"),
            env("b@batch.dlv.test", "reject@batch.dlv.test", sender="s2@src.test"),
            env("c@batch.dlv.test", sender="")]
    results = deliver_domain("batch.dlv.test", envs, settings=settings, resolver=resolver)
    assert [[r.state for r in rs] for rs in results] == [
        [State.DELIVERED], [State.DELIVERED, State.BOUNCED], [State.DELIVERED]]
    assert mx.stats["connections"] == 1
    assert [(m.mail_from, m.rcpt_tos) for m in mx.messages] == [
        ("s1@src.test", ["a@batch.dlv.test"]), ("s2@src.test", ["b@batch.dlv.test"]), ("", ["c@batch.dlv.test"])]


def test_envelope_whose_recipients_all_fail_then_next_envelope_on_same_connection(dns_server, servers, settings,
                                                                                  resolver):
    mx_domain(dns_server, "rset.dlv.test", (10, "mx.rset.dlv.test", "127.0.1.43"))
    mx = servers("127.0.1.43")
    results = deliver_domain("rset.dlv.test", [env("reject@rset.dlv.test"), env("ok@rset.dlv.test")],
                             settings=settings, resolver=resolver)
    assert [[r.state for r in rs] for rs in results] == [[State.BOUNCED], [State.DELIVERED]]
    assert mx.stats["connections"] == 1 and mx.stats["rset"] == 1    # the aborted transaction was reset


def test_mail_from_refused(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "mailhard.dlv.test", (10, "mx.mailhard.dlv.test", "127.0.1.44"))
    servers("127.0.1.44", Behaviour(mail_reply="553 5.7.1 Sender rejected"))
    a, b = deliver(env("a@mailhard.dlv.test", "b@mailhard.dlv.test"), settings=settings, resolver=resolver)
    assert a.state is b.state is State.BOUNCED and a.code == 553
    mx_domain(dns_server, "mailsoft.dlv.test", (10, "mx.mailsoft.dlv.test", "127.0.1.45"))
    servers("127.0.1.45", Behaviour(mail_reply="451 4.3.0 Try later"))
    [c] = deliver(env("c@mailsoft.dlv.test"), settings=settings, resolver=resolver)
    assert c.state is State.DEFERRED and c.code == 451


def test_several_domains_results_in_recipient_order(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "one.dlv.test", (10, "mx.one.dlv.test", "127.0.1.46"))
    mx_domain(dns_server, "two.dlv.test", (10, "mx.two.dlv.test", "127.0.1.47"))
    one, two = servers("127.0.1.46"), servers("127.0.1.47")
    rcpts = ["a@one.dlv.test", "b@two.dlv.test", "c@ONE.dlv.test", "d@nxd.dlv.test"]
    results = deliver(env(*rcpts), settings=settings, resolver=resolver)
    assert [r.address for r in results] == ["a@one.dlv.test", "b@two.dlv.test", "c@one.dlv.test", "d@nxd.dlv.test"]
    assert [r.state for r in results] == [State.DELIVERED, State.DELIVERED, State.DELIVERED, State.BOUNCED]
    assert [m.rcpt_tos for m in one.messages] == [["a@one.dlv.test", "c@one.dlv.test"]]
    assert len(two.messages) == 1
    d = results[0].to_dict()
    assert set(d) == {"address", "domain", "state", "code", "enhanced", "text", "exchange", "ip", "relay",
                      "attempts", "scope"} and d["state"] == "delivered"


def test_dsn_parameters_reach_the_server(dns_server, servers, settings, resolver):
    from mxq.workers.envelope import DSN
    mx_domain(dns_server, "dsn.dlv.test", (10, "mx.dsn.dlv.test", "127.0.1.48"))
    srv = servers("127.0.1.48")
    e = prepare(MESSAGE, sender="s@src.test", recipients=["A@dsn.dlv.test"], notify=("SUCCESS", "FAILURE"),
                dsn=DSN(ret="HDRS", envid="ENV1"))
    [r] = deliver(e, settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED
    m = srv.messages[0]
    assert m.mail_params["RET"] == "HDRS" and m.mail_params["ENVID"] == "ENV1"
    assert m.rcpt_params[0]["NOTIFY"] == "SUCCESS,FAILURE" and m.rcpt_params[0]["ORCPT"] == "rfc822;A@dsn.dlv.test"


def test_file_content_sent_to_second_exchange_whole(dns_server, servers, settings, resolver, tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(b"From: s@src.test\nTo: a@file.dlv.test\nSubject: file\n\n" + b"body line\n" * 5000)
    mx_domain(dns_server, "file.dlv.test", (10, "mx1.file.dlv.test", "127.0.1.49"),
              (20, "mx2.file.dlv.test", "127.0.1.50"))
    servers("127.0.1.49", Behaviour(drop_mid_data=5000))
    mx2 = servers("127.0.1.50")
    e = prepare(path)
    [r] = deliver(e, settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and r.exchange == "mx2.file.dlv.test"
    assert mx2.messages[0].content == b"".join(e.content)


def test_message_file_gone_before_delivery_is_deferred_locally(dns_server, servers, settings, resolver, tmp_path):
    path = tmp_path / "gone.eml"
    path.write_bytes(b"From: s@src.test\nTo: a@gone.dlv.test\nSubject: gone\n\nbody\n")
    mx_domain(dns_server, "gone.dlv.test", (10, "mx1.gone.dlv.test", "127.0.1.55"),
              (20, "mx2.gone.dlv.test", "127.0.1.56"))
    mx1, mx2 = servers("127.0.1.55"), servers("127.0.1.56")
    e = prepare(path)
    path.unlink()
    [r] = deliver(e, settings=settings, resolver=resolver)
    assert r.state is State.DEFERRED and r.enhanced == "4.3.0" and "cannot read" in r.text
    assert mx1.messages == [] and mx1.stats["dropped"] == 0
    assert mx2.stats["connections"] == 0       # no other server can help with a local problem


def test_generator_content_is_resent_whole(dns_server, servers, settings, resolver):
    mx_domain(dns_server, "gen.dlv.test", (10, "mx1.gen.dlv.test", "127.0.1.51"),
              (20, "mx2.gen.dlv.test", "127.0.1.52"))
    servers("127.0.1.51", Behaviour(data_reply="451 4.3.0 later"))
    mx2 = servers("127.0.1.52")
    chunks = [MESSAGE[:10], MESSAGE[10:]]
    e = Envelope("s@src.test", [Recipient("a@gen.dlv.test")], (c for c in chunks))
    [r] = deliver(e, settings=settings, resolver=resolver)
    assert r.state is State.DELIVERED and mx2.messages[0].content == MESSAGE


def test_recipient_outside_domain_refused(settings, resolver):
    with pytest.raises(ValueError, match="not in domain"):
        deliver_domain("a.dlv.test", [env("x@b.dlv.test")], settings=settings, resolver=resolver)


def test_log_lines_postfix_format(dns_server, servers, settings, resolver, caplog):
    mx_domain(dns_server, "log.dlv.test", (10, "mx1.log.dlv.test", "127.0.1.53"),
              (20, "mx2.log.dlv.test", "127.0.1.54"))
    servers("127.0.1.54")          # nothing listens on 127.0.1.53
    caplog.set_level(logging.INFO, logger="mxq.delivery")
    deliver(env("ok@log.dlv.test", "reject@log.dlv.test", id="Q1ABC"), settings=settings, resolver=resolver)
    lines = [r.getMessage() for r in caplog.records if r.name == "mxq.delivery"]
    assert len(lines) == 4     # two recipients, two attempts each
    assert re.fullmatch(r"Q1ABC: to=<ok@log\.dlv\.test>, relay=none, delay=\d+\.\d\d, dsn=4\.4\.1, "
                        r"status=deferred \(connect to mx1\.log\.dlv\.test\[127\.0\.1\.53\]:25: Connection refused\)",
                        lines[0]), lines[0]
    assert re.fullmatch(r"Q1ABC: to=<ok@log\.dlv\.test>, relay=mx2\.log\.dlv\.test\[127\.0\.1\.54\]:25, "
                        r"delay=\d+\.\d\d, dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as \w+\)",
                        lines[3] if "ok@" in lines[3] else lines[2]), lines
    bounced = [line for line in lines if "reject@" in line and "bounced" in line]
    assert len(bounced) == 1 and re.search(
        r"relay=mx2\.log\.dlv\.test\[127\.0\.1\.54\]:25, delay=\d+\.\d\d, dsn=5\.1\.1, status=bounced "
        r"\(host mx2\.log\.dlv\.test\[127\.0\.1\.54\] said: 550 5\.1\.1 <reject@log\.dlv\.test>", bounced[0])

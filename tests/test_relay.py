"""The relay (smarthost) as corporate networks run it: MXQ_RELAY's TLS policies, AUTH only with
credentials, clear text only to addresses the operator names, XOAUTH2 with a refreshable token.

Servers: scripted aiosmtpd relays on 127.0.182.x (ports 25 and 587) and the sandbox DNS server, in
the test session's private network namespace.  Names are under ``rly.test``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat

import pytest

from mxq.sandbox.smtpd import Behaviour, make_tls, start_server
from mxq.workers.config import RelayConfig, Settings, parse_dns_servers
from mxq.workers.delivery import deliver
from mxq.workers.message import prepare
from mxq.workers.mx import Resolver
from mxq.workers.oauth2 import TokenError, TokenSource
from mxq.workers.results import State
from mxq.workers.timeouts import Timeouts

IP = "127.0.182."
FAST = Timeouts(connect=1, greeting=2, command=2, data_init=2, data_block=2, data_final=2)
MESSAGE = b"From: Sender <sender@src.rly.test>\r\nSubject: relayed\r\n\r\nHello.\r\n"


@pytest.fixture
def servers():
    started = []

    def start(host, behaviour, port=25):
        srv = start_server(host, port, behaviour)
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


def relay_settings(dns_server, url, *, env=None, mode="always"):
    """Settings as ``Settings.from_env`` builds them from MXQ_RELAY (and ``env``)."""
    e = {"MXQ_RELAY": url, "MXQ_RELAY_MODE": mode, "MXQ_DNS_SERVERS": dns_server.address,
         "MXQ_HELO_NAME": "client.rly.test", "MXQ_MTA_STS": "off"}
    e.update(env or {})
    return dataclasses.replace(Settings.from_env(e), timeouts=FAST)


def send(settings, *rcpts, **kw):
    env = prepare(MESSAGE, sender="sender@src.rly.test", recipients=list(rcpts) or ["bob@far.rly.test"])
    return deliver(env, settings=settings, resolver=Resolver(settings), **kw)


# -- parsing ----------------------------------------------------------------------------------------

def test_relay_url_forms():
    r = RelayConfig.parse("smtp://relay.corp.test")
    assert (r.host, r.port, r.tls, r.implicit_tls, r.username, r.has_credentials) == (
        "relay.corp.test", 587, "required", False, None, False)
    r = RelayConfig.parse("smtp://me%40corp.test:p%40ss@relay.corp.test:2525?tls=opportunistic")
    assert (r.port, r.tls, r.username, r.password, r.has_credentials) == (2525, "opportunistic", "me@corp.test",
                                                                          "p@ss", True)
    assert "p@ss" not in repr(r)
    r = RelayConfig.parse("smtps://u:p@relay.corp.test")
    assert (r.port, r.implicit_tls, session_tls_of(r)) == (465, True, "implicit")
    r = RelayConfig.parse("smtp://10.1.2.3:25?tls=none")                     # an address: named by the operator
    assert r.tls == "none" and r.cleartext_allowed("10.1.2.3") and not r.cleartext_allowed("10.1.2.4")
    r = RelayConfig.parse("smtp://relay.corp.test:25?tls=none", cleartext="10.0.0.0/8, 192.0.2.7")
    assert r.cleartext_allowed("10.9.9.9") and r.cleartext_allowed("192.0.2.7") and not r.cleartext_allowed("192.0.2.8")
    r = RelayConfig.parse("smtp://bot@relay.corp.test", token_file="/run/token")
    assert r.has_credentials and r.token is not None and "TokenSource" not in repr(r)


def session_tls_of(relay):
    from mxq.workers.relay import session_tls
    return session_tls(relay)


@pytest.mark.parametrize("url, env, message", [
    ("smtp://relay.corp.test:25?tls=none", {}, "MXQ_RELAY_CLEARTEXT"),       # a name in clear text: refused
    ("smtp://relay.corp.test?tls=maybe", {}, "tls"),
    ("smtp://relay.corp.test?auth=plain", {}, "unknown parameter"),
    ("smtps://relay.corp.test?tls=none", {}, "smtps"),
    ("smtp://user@relay.corp.test", {}, "without a password"),
    ("smtp://u:p@relay.corp.test", {"MXQ_RELAY_TOKEN_FILE": "/t"}, "no password"),
    ("smtp://relay.corp.test", {"MXQ_RELAY_TOKEN_FILE": "/t"}, "user name"),
    ("smtp://u@relay.corp.test", {"MXQ_RELAY_TOKEN_FILE": "/t", "MXQ_RELAY_TOKEN_COMMAND": "x"}, "not both"),
    ("smtp://relay.corp.test:25?tls=none", {"MXQ_RELAY_CLEARTEXT": "10.0.0.300"}, "MXQ_RELAY_CLEARTEXT"),
    ("smtp://:secretpw@relay.corp.test", {}, "without a user name"),      # was: no AUTH, silently
    ("smtp://relay.corp.test:0", {}, "port"),                              # was: port 587, silently
])
def test_relay_settings_refused_with_a_clear_error(url, env, message):
    with pytest.raises(ValueError) as e:
        Settings.from_env({"MXQ_RELAY": url, **env})
    assert message in str(e.value)
    assert "secret" not in str(e.value)


# -- a plain port-25 relay without AUTH -------------------------------------------------------------

def test_plain_port_25_relay_without_auth_by_address(dns_server, servers):
    relay = servers(IP + "10", Behaviour(hostname="relay.rly.test", auth=None))
    s = relay_settings(dns_server, f"smtp://{IP}10:25?tls=none")
    [r] = send(s, "bob@far.rly.test")
    assert r.state is State.DELIVERED and r.relay and r.ip == IP + "10"
    m = relay.messages[0]
    assert m.rcpt_tos == ["bob@far.rly.test"] and not m.tls and m.auth_user is None
    assert not any(c.startswith(("AUTH", "STARTTLS")) for c in relay.sessions[-1].commands)
    assert dns_server.queries("far.rly.test", "MX") == 0          # always mode: no MX lookup


def test_plain_relay_by_name_only_to_named_addresses(dns_server, servers):
    relay = servers(IP + "11", Behaviour(hostname="corp.rly.test"))
    dns_server.add({"corp.rly.test": {"A": [IP + "11"]}})
    ok = relay_settings(dns_server, "smtp://corp.rly.test:25?tls=none", env={"MXQ_RELAY_CLEARTEXT": IP + "0/24"})
    [r] = send(ok, "amy@far.rly.test")
    assert r.state is State.DELIVERED and r.relay and len(relay.messages) == 1
    # The same name, but its address is not one the operator named: nothing goes there.
    elsewhere = relay_settings(dns_server, "smtp://corp.rly.test:25?tls=none",
                               env={"MXQ_RELAY_CLEARTEXT": "10.0.0.0/8"})
    [r] = send(elsewhere, "ann@far.rly.test")
    assert r.state is State.DEFERRED and r.enhanced == "4.7.0" and "MXQ_RELAY_CLEARTEXT" in r.text
    assert relay.stats["connections"] == 1


def test_opportunistic_relay_without_starttls_or_credentials(dns_server, servers):
    relay = servers(IP + "12", Behaviour(hostname="opp.rly.test"))
    dns_server.add({"opp.rly.test": {"A": [IP + "12"]}})
    s = relay_settings(dns_server, "smtp://opp.rly.test:25?tls=opportunistic")
    [r] = send(s)
    assert r.state is State.DELIVERED and not relay.messages[0].tls


def test_credentials_only_when_the_relay_offers_auth(dns_server, servers):
    """Credentials configured, but this relay asks for no authentication: mail goes without AUTH (Postfix too)."""
    tls = make_tls("noauth.rly.test")
    relay = servers(IP + "13", Behaviour(hostname="noauth.rly.test", starttls=tls.server_context), port=587)
    dns_server.add({"noauth.rly.test": {"A": [IP + "13"]}})
    s = relay_settings(dns_server, "smtp://u:secretpw@noauth.rly.test")
    [r] = send(s, relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and relay.messages[0].tls and relay.messages[0].auth_user is None


def test_credentials_never_in_clear_text_unless_named(dns_server, servers, caplog):
    relay = servers(IP + "14", Behaviour(hostname="clear.rly.test", auth={"u": "secretpw"}, auth_require_tls=False))
    dns_server.add({"clear.rly.test": {"A": [IP + "14"]}})
    caplog.set_level(logging.DEBUG)
    s = relay_settings(dns_server, "smtp://u:secretpw@clear.rly.test:25?tls=opportunistic")
    [r] = send(s, "dan@far.rly.test")
    assert r.state is State.DEFERRED and r.enhanced == "4.7.0" and "without TLS" in r.text
    assert relay.stats["auth_ok"] + relay.stats["auth_failed"] == 0 and not relay.messages
    # Named by the operator: AUTH in clear text is allowed there.
    s = relay_settings(dns_server, "smtp://u:secretpw@clear.rly.test:25?tls=opportunistic",
                       env={"MXQ_RELAY_CLEARTEXT": IP + "14"})
    [r] = send(s, "dan@far.rly.test")
    assert r.state is State.DELIVERED and relay.messages[0].auth_user == "u"
    assert "secretpw" not in caplog.text and "secretpw" not in r.text


# -- a STARTTLS relay with PLAIN --------------------------------------------------------------------

def test_starttls_relay_with_plain(dns_server, servers, monkeypatch, caplog):
    tls = make_tls("smart.rly.test")
    relay = servers(IP + "20", Behaviour(hostname="smart.rly.test", starttls=tls.server_context,
                                         require_starttls=True, auth={"me@corp": "pw with spaces"},
                                         auth_mechanisms=("PLAIN",), auth_required=True), port=587)
    dns_server.add({"smart.rly.test": {"A": [IP + "20"]}})
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca_file)       # the relay certificate is verified (tls=required)
    caplog.set_level(logging.DEBUG)
    s = relay_settings(dns_server, "smtp://me%40corp:pw%20with%20spaces@smart.rly.test")
    [r] = send(s, "eve@far.rly.test")
    assert r.state is State.DELIVERED and r.relay and r.exchange == "smart.rly.test"
    assert relay.messages[0].tls and relay.messages[0].auth_user == "me@corp"
    assert relay.sessions[-1].auth_mechanism == "PLAIN"
    assert "pw with spaces" not in caplog.text
    # The same relay with a certificate for another name: deferred, no credentials sent.
    dns_server.add({"other.rly.test": {"A": [IP + "20"]}})
    s = relay_settings(dns_server, "smtp://me%40corp:pw%20with%20spaces@other.rly.test")
    [r] = send(s, "fay@far.rly.test")
    assert r.state is State.DEFERRED and r.enhanced.startswith("4.7") and relay.stats["auth_ok"] == 1


# -- an XOAUTH2 relay -------------------------------------------------------------------------------

def xoauth2_relay(servers, dns_server, ip, token):
    tls = make_tls("oauth.rly.test")
    relay = servers(ip, Behaviour(hostname="oauth.rly.test", starttls=tls.server_context,
                                  oauth2_tokens={"bot@corp.test": token}, auth_required=True), port=587)
    dns_server.add({"oauth.rly.test": {"A": [ip]}})
    return relay, tls


def test_xoauth2_token_from_a_file_refreshed_when_it_changes(dns_server, servers, tmp_path, caplog):
    relay, tls = xoauth2_relay(servers, dns_server, IP + "30", "ya29.first-token")
    token = tmp_path / "token"
    token.write_text("ya29.first-token\n")
    token.chmod(stat.S_IRUSR)
    caplog.set_level(logging.DEBUG)
    s = relay_settings(dns_server, "smtp://bot%40corp.test@oauth.rly.test", env={"MXQ_RELAY_TOKEN_FILE": str(token)})
    [r] = send(s, "gus@far.rly.test", relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and relay.messages[0].auth_user == "bot@corp.test"
    assert relay.sessions[-1].auth_mechanism == "XOAUTH2"
    # The refresher writes a new token; the server now wants it.
    relay.behaviour.oauth2_tokens["bot@corp.test"] = "ya29.second-token"
    token.chmod(stat.S_IRUSR | stat.S_IWUSR)
    token.write_text('{"access_token": "ya29.second-token", "expires_in": 3599}\n')
    [r] = send(s, "hal@far.rly.test", relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and len(relay.messages) == 2
    assert "ya29." not in caplog.text and "ya29." not in r.text
    # The token never appears in the relay's view of our commands either (its record redacts AUTH).
    assert s.relay.token.refreshes == 2


def test_xoauth2_token_from_a_command_refreshed_after_a_refusal(dns_server, servers, tmp_path, caplog):
    relay, tls = xoauth2_relay(servers, dns_server, IP + "31", "tok-2")
    counter = tmp_path / "n"
    counter.write_text("0")
    script = tmp_path / "get-token"
    script.write_text(f'#!/bin/sh\nn=$(($(cat {counter}) + 1)); echo $n > {counter}\n'
                      'printf \'{"access_token": "tok-%s", "expires_in": 3600}\' "$n"\n')
    script.chmod(0o755)
    caplog.set_level(logging.DEBUG)
    s = relay_settings(dns_server, "smtp://bot%40corp.test@oauth.rly.test",
                       env={"MXQ_RELAY_TOKEN_COMMAND": str(script)})
    # tok-1 is refused (535); the source is invalidated, the command runs again, tok-2 is accepted.
    [r] = send(s, "ida@far.rly.test", relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and relay.messages[0].auth_user == "bot@corp.test"
    assert [(m, ok) for m, _, ok, _ in relay.sessions[-1].auth_log] == [("XOAUTH2", False), ("XOAUTH2", True)]
    assert counter.read_text().strip() == "2"
    # Cached until it expires: the next delivery runs no command.
    [r] = send(s, "jo@far.rly.test", relay_tls_context=tls.client_context)
    assert r.state is State.DELIVERED and counter.read_text().strip() == "2"
    assert "tok-1" not in caplog.text and "tok-2" not in caplog.text


def test_xoauth2_without_a_token_defers(dns_server, servers, tmp_path):
    relay, tls = xoauth2_relay(servers, dns_server, IP + "32", "whatever")
    s = relay_settings(dns_server, "smtp://bot%40corp.test@oauth.rly.test",
                       env={"MXQ_RELAY_TOKEN_FILE": str(tmp_path / "missing")})
    [r] = send(s, "kim@far.rly.test", relay_tls_context=tls.client_context)
    assert r.state is State.DEFERRED and r.enhanced == "4.7.0" and "token" in r.text and not relay.messages
    # A command that fails: exit status, never its output.
    s = relay_settings(dns_server, "smtp://bot%40corp.test@oauth.rly.test",
                       env={"MXQ_RELAY_TOKEN_COMMAND": "echo hush-secret >&2; exit 3"})
    [r] = send(s, "lee@far.rly.test", relay_tls_context=tls.client_context)
    assert r.state is State.DEFERRED and "exit status 3" in r.text and "hush" not in r.text


def test_token_source_formats(tmp_path):
    f = tmp_path / "t"
    for text, want in (("abc.def\n", "abc.def"), ('{"accessToken": "az-1"}', "az-1"), ("  t0k  ", "t0k")):
        f.write_text(text)
        assert TokenSource(file=str(f)).get() == want
    for bad in ("", "{}", "{not json", "two words"):
        f.write_text(bad)
        with pytest.raises(TokenError):
            TokenSource(file=str(f)).get()
    now = [0.0]
    src = TokenSource(command="echo t-$$", lifetime=300, clock=lambda: now[0])
    first = src.get()
    assert src.get() == first
    now[0] = 301
    assert src.get() != first and src.refreshes == 2
    assert os.environ.get("MXQ_RELAY_TOKEN_FILE") is None

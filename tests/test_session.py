"""SMTPSession against real scripted aiosmtpd servers (mxq.sandbox.smtpd) on loopback.

Inside the test network namespace every server listens on 127.0.30.x:25;
outside it (non-root) on free ports.  Timeouts are short so failure paths
stay fast; every server has a readiness check and is stopped by the fixture.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxq.workers.envelope import DSN, Recipient
from mxq.workers.errors import (
    InvalidAddress,
    InvalidMessage,
    SMTPAuthError,
    SMTPConnectError,
    SMTPGreetingError,
    SMTPHeloError,
    SMTPNotSupported,
    SMTPProtocolError,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
    SMTPTLSError,
    Scope,
    classify,
)
from mxq.sandbox.smtpd import Behaviour, SilentServer, make_tls, start_server, xtext_decode
from mxq.workers.session import DotStuffer, SMTPSession, xtext
from mxq.workers.timeouts import Timeouts

IN_NETNS = os.environ.get("MXQ_IN_TEST_NETNS") == "1"
PORT = 25 if IN_NETNS else 0
HOST = "127.0.30.1" if IN_NETNS else "127.0.0.1"
HOST2 = "127.0.30.2" if IN_NETNS else "127.0.0.1"
FAST = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=5, data_final=5)
MSG = b"From: a@a.test\r\nTo: b@b.test\r\nSubject: test\r\n\r\nHello.\r\n"


@pytest.fixture
def serve():
    """Factory: start a scripted server; all are stopped after the test."""
    handles = []

    def _serve(behaviour: Behaviour | None = None, host: str = HOST, port: int = PORT):
        h = start_server(host, port, behaviour or Behaviour())
        handles.append(h)
        return h

    yield _serve
    for h in handles:
        h.stop()


@pytest.fixture(scope="module")
def tls():
    """A CA and a certificate for mx.sandbox.test and the test addresses."""
    return make_tls("mx.sandbox.test", HOST, HOST2)


@pytest.fixture(scope="module")
def other_ca():
    """A second, unrelated CA (the client must not trust the first one's certificates)."""
    return make_tls("mx.sandbox.test", HOST)


def session(srv, **kw) -> SMTPSession:
    kw.setdefault("timeouts", FAST)
    return SMTPSession(srv.host, srv.port, **kw)


# ----------------------------------------------------------------------------- connect, EHLO

def test_connect_and_ehlo(serve):
    srv = serve()
    assert srv.sessions == []          # readiness connections are not recorded
    s = session(srv, tls="none")
    greeting = s.connect()
    try:
        assert greeting.code == 220 and "mx.sandbox.test" in greeting.text
        assert s.esmtp and s.connected and not s.tls_active
        for ext in ("size", "8bitmime", "smtputf8", "dsn", "pipelining"):
            assert ext in s.extensions
        assert s.extensions["size"] == "52428800"
        assert s.peer == (srv.host, srv.port)
        assert s.connect() is greeting   # idempotent while connected
    finally:
        s.disconnect()
    rec = srv.sessions[0]
    assert rec.ehlo_name == os.environ["MXQ_HELO_NAME"] == "client.mxq.test"
    assert rec.esmtp and rec.commands == ["EHLO client.mxq.test", "QUIT"]
    assert srv.stats["quit"] == 1 and not s.connected


def test_helo_fallback(serve):
    srv = serve(Behaviour(ehlo=False))
    with session(srv, helo_name="helo.client.test") as s:
        assert not s.esmtp and s.extensions == {}
        result = s.send_message("a@a.test", ["b@b.test"], MSG)
    assert result.reply.code == 250
    (msg,) = srv.messages
    assert msg.ehlo_name == "helo.client.test" and msg.esmtp is False
    assert msg.mail_options == []     # no ESMTP parameters to a HELO server
    assert srv.sessions[0].commands[:2] == ["EHLO helo.client.test", "HELO helo.client.test"]


def test_helo_refused_too(serve):
    srv = serve(Behaviour(ehlo=False, helo_reply="550 5.7.1 not you"))
    with pytest.raises(SMTPHeloError) as ei:
        session(srv).connect()
    assert ei.value.code == 550 and ei.value.is_permanent() and ei.value.scope == Scope.SITE


def test_greeting_421_is_transient(serve):
    srv = serve(Behaviour(greeting_code=421))
    s = session(srv)
    with pytest.raises(SMTPGreetingError) as ei:
        s.connect()
    assert ei.value.code == 421 and ei.value.enhanced == "4.3.2"
    assert ei.value.is_transient() and classify(ei.value).try_next_exchange
    assert not s.connected


def test_connection_refused():
    if IN_NETNS:
        host, port = "127.0.0.9", 25
    else:
        from tests.fixtures_infra import free_port
        host, port = "127.0.0.1", free_port()
    s = SMTPSession(host, port, server_hostname="mx9.b.test", timeouts=FAST)
    t0 = time.monotonic()
    with pytest.raises(SMTPConnectError) as ei:
        s.connect()
    assert time.monotonic() - t0 < 1.5
    e = ei.value
    assert isinstance(e, ConnectionError) and e.is_transient()
    assert e.reply.code is None and e.enhanced == "4.4.1"
    assert e.text == f"connect to mx9.b.test[{host}]:{port}: Connection refused"


def test_server_that_never_greets_times_out():
    with SilentServer(HOST2, PORT, mode="greeting") as silent:
        s = SMTPSession(silent.host, silent.port, timeouts=Timeouts(connect=2, greeting=0.4))
        t0 = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as ei:
            s.connect()
        elapsed = time.monotonic() - t0
    assert 0.3 < elapsed < 2.0
    assert isinstance(ei.value, TimeoutError) and ei.value.enhanced == "4.4.2"
    assert "greeting" in ei.value.text and ei.value.is_transient()
    assert not s.connected


def test_connect_timeout_when_backlog_is_full():
    with SilentServer(HOST2, PORT, mode="connect") as silent:
        s = SMTPSession(silent.host, silent.port, timeouts=Timeouts(connect=0.4, greeting=5))
        t0 = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as ei:
            s.connect()
    assert time.monotonic() - t0 < 2.0
    assert ei.value.enhanced == "4.4.1" and "timed out" in ei.value.text


# ----------------------------------------------------------------------------- TLS

def test_opportunistic_starttls(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context))
    with session(srv) as s:           # default policy: opportunistic, certificate not checked
        assert s.tls_active and s.tls_fallback is None
        assert "starttls" not in s.extensions   # the EHLO after STARTTLS
        s.send_message("a@a.test", ["b@b.test"], MSG)
    (msg,) = srv.messages
    assert msg.tls and msg.tls_version.startswith("TLS")
    assert srv.sessions[0].commands[:3] == ["EHLO client.mxq.test", "STARTTLS", "EHLO client.mxq.test"]


def test_opportunistic_falls_back_to_clear_text_after_failed_handshake(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context, broken_starttls=True))
    with session(srv) as s:
        assert not s.tls_active and "handshake" in s.tls_fallback
        result = s.send_message("a@a.test", ["b@b.test"], MSG)
    assert result.reply.code == 250
    assert len(srv.sessions) == 2      # exactly one reconnect
    assert "STARTTLS" not in srv.sessions[1].commands
    assert srv.messages[0].tls is False and srv.messages[0].session_id == 1


def test_opportunistic_continues_in_clear_after_starttls_refusal(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context, starttls_reply="454 4.7.0 TLS not available"))
    with session(srv) as s:
        assert not s.tls_active and "454" in s.tls_fallback
        assert s.send_message("a@a.test", ["b@b.test"], MSG).reply.code == 250
    assert len(srv.sessions) == 1


def test_required_tls_verified(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context))
    with session(srv, tls="required", tls_context=tls.client_context, server_hostname="mx.sandbox.test") as s:
        assert s.tls_active
        s.send_message("a@a.test", ["b@b.test"], MSG)
    assert srv.messages[0].tls


def test_required_tls_uses_ssl_cert_file(serve, tls, monkeypatch):
    srv = serve(Behaviour(starttls=tls.server_context))
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca_file)
    with session(srv, tls="required") as s:   # host name = the IP, in the certificate's SANs
        assert s.tls_active


def test_required_tls_wrong_ca(serve, tls, other_ca):
    srv = serve(Behaviour(starttls=tls.server_context))
    s = session(srv, tls="required", tls_context=other_ca.client_context)
    with pytest.raises(SMTPTLSError) as ei:
        s.connect()
    assert ei.value.enhanced == "4.7.5" and "CERTIFICATE_VERIFY_FAILED" in ei.value.text
    assert isinstance(ei.value, ConnectionError) and not s.connected
    assert srv.messages == [] and srv.stats["mail"] == 0


def test_required_tls_wrong_host_name(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context))
    s = session(srv, tls="required", tls_context=tls.client_context, server_hostname="other.sandbox.test")
    with pytest.raises(SMTPTLSError) as ei:
        s.connect()
    assert "other.sandbox.test" in ei.value.text or "match" in ei.value.text.lower()


def test_required_tls_not_offered(serve):
    srv = serve(Behaviour())
    with pytest.raises(SMTPTLSError) as ei:
        session(srv, tls="required").connect()
    assert ei.value.enhanced == "4.7.4" and "not offered" in ei.value.text


def test_implicit_tls(serve, tls, other_ca):
    srv = serve(Behaviour(implicit_tls=tls.server_context), port=465 if IN_NETNS else 0)
    with session(srv, tls="implicit", tls_context=tls.client_context) as s:
        assert s.tls_active and "starttls" not in s.extensions
        s.send_message("a@a.test", ["b@b.test"], MSG)
    assert srv.messages[0].tls
    with pytest.raises(SMTPTLSError):
        session(srv, tls="implicit", tls_context=other_ca.client_context).connect()


# ----------------------------------------------------------------------------- AUTH

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_auth_mechanisms_over_starttls(serve, tls, mechanism):
    srv = serve(Behaviour(starttls=tls.server_context, auth={"alice": "s3cret"}))
    with session(srv) as s:
        reply = s.authenticate("alice", "s3cret", mechanism=mechanism)
        assert reply.code == 235
        s.send_message("a@a.test", ["b@b.test"], MSG)
    rec = srv.sessions[0]
    assert rec.auth_mechanism == mechanism and rec.auth_user == "alice"
    assert srv.messages[0].auth_user == "alice"
    assert not any("s3cret" in c for c in rec.commands)


def test_auth_prefers_cram_md5_and_rejects_wrong_password(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context, auth={"alice": "s3cret"}))
    with session(srv) as s:
        with pytest.raises(SMTPAuthError) as ei:
            s.authenticate("alice", "wrong")
        assert ei.value.code == 535 and ei.value.enhanced == "5.7.8"
        assert s.authenticate("alice", "s3cret").code == 235
    assert [e[0] for e in srv.sessions[0].auth_log] == ["CRAM-MD5", "CRAM-MD5"]
    assert [e[2] for e in srv.sessions[0].auth_log] == [False, True]


def test_auth_not_offered(serve, tls):
    # AUTH only under TLS: over a clear-text session nothing is offered.
    srv = serve(Behaviour(starttls=tls.server_context, auth={"alice": "s3cret"}))
    with session(srv, tls="none") as s:
        with pytest.raises(SMTPAuthError) as ei:
            s.authenticate("alice", "s3cret")
    assert ei.value.enhanced == "5.7.4" and ei.value.code is None
    assert srv.stats["auth_ok"] == srv.stats["auth_failed"] == 0


def test_auth_xoauth2_wire_format(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context, oauth2_tokens={"bob@a.test": "ya29.token"}))
    with session(srv) as s:
        assert s.authenticate("bob@a.test", oauth2_token="ya29.token").code == 235
    # The server accepts only base64("user=U\x01auth=Bearer T\x01\x01") exactly.
    assert srv.sessions[0].auth_log == [("XOAUTH2", "bob@a.test", True, "ok")]
    with session(srv) as s:
        with pytest.raises(SMTPAuthError) as ei:
            s.authenticate("bob@a.test", oauth2_token="expired")
        assert ei.value.code == 535
        assert s.noop().code == 250       # the session survives the failed AUTH
    assert srv.sessions[1].auth_log == [("XOAUTH2", "bob@a.test", False, "bad token")]


# ----------------------------------------------------------------------------- transactions

def test_send_message_mixed_recipients(serve):
    srv = serve()
    with session(srv) as s:
        result = s.send_message("sender@a.test", ["ok1@b.test", "reject.me@b.test", "later1@b.test", "ok2@b.test"], MSG)
    r = result.recipients
    assert [r[a].code for a in ("ok1@b.test", "reject.me@b.test", "later1@b.test", "ok2@b.test")] == [250, 550, 450, 250]
    assert r["reject.me@b.test"].enhanced == "5.1.1" and r["later1@b.test"].is_transient()
    assert result.reply.code == 250 and result.delivered == ["ok1@b.test", "ok2@b.test"]
    (msg,) = srv.messages
    assert msg.mail_from == "sender@a.test" and msg.rcpt_tos == ["ok1@b.test", "ok2@b.test"]
    assert msg.content == MSG


def test_staged_transaction(serve):
    srv = serve()
    with session(srv) as s:
        assert s.create_message("", size=100).code == 250           # null sender
        assert s.add_recipient("b@b.test").code == 250
        assert s.add_recipient(Recipient("c@b.test")).code == 250
        assert s.accepted == ["b@b.test", "c@b.test"]
        s.append_message(b"Subject: staged\r\n\r\nfirst part, ")
        s.append_message([b"second ", b"part\n", b".leading dot"])   # no final line end
        reply = s.close_message()
    assert reply.code == 250 and reply.enhanced == "2.0.0"
    (msg,) = srv.messages
    assert msg.mail_from == "" and msg.mail_options == ["SIZE=100"]
    assert msg.content == b"Subject: staged\r\n\r\nfirst part, second part\r\n.leading dot\r\n"


def test_out_of_order_use_is_refused(serve):
    srv = serve()
    with session(srv) as s:
        with pytest.raises(SMTPProtocolError):
            s.add_recipient("b@b.test")
        s.create_message("a@a.test")
        with pytest.raises(SMTPProtocolError):
            s.create_message("a@a.test")        # nested MAIL
        assert s.add_recipient("reject@b.test").code == 550
        with pytest.raises(SMTPProtocolError):
            s.append_message(MSG)               # no accepted recipient: no DATA
        assert s.reset().code == 250
    assert "DATA" not in srv.sessions[0].commands


def test_all_recipients_refused_means_no_data(serve):
    srv = serve()
    with session(srv) as s:
        result = s.send_message("a@a.test", ["reject1@b.test", "later2@b.test"], MSG)
        assert result.reply is None and result.accepted == []
        assert s.send_message("a@a.test", ["b@b.test"], MSG).reply.code == 250   # RSET made it reusable
    cmds = srv.sessions[0].commands
    assert "DATA" in cmds and cmds.index("RSET") < cmds.index("DATA")
    assert srv.stats["data"] == 1


def test_invalid_address_sends_nothing(serve):
    srv = serve()
    with session(srv) as s:
        with pytest.raises(InvalidAddress):
            s.send_message("a@a.test", ["b@b.test", "x@y.test>\r\nRCPT TO:<evil@y.test"], MSG)
        with pytest.raises(InvalidAddress):
            s.create_message("no-at-sign")
        s.create_message("a@a.test")
        with pytest.raises(InvalidAddress):
            s.add_recipient("b@b.test\r\nDATA")
        assert s.add_recipient("b@b.test").code == 250
    assert srv.sessions[0].commands[1:] == ["MAIL FROM:<a@a.test>", "RCPT TO:<b@b.test>", "QUIT"]


def test_sender_refused(serve):
    srv = serve(Behaviour(mail_reply="553 5.7.1 <{address}>: Sender address rejected"))
    with session(srv) as s:
        with pytest.raises(SMTPSenderRefused) as ei:
            s.send_message("a@a.test", ["b@b.test"], MSG)
    assert ei.value.code == 553 and ei.value.scope == Scope.MESSAGE and ei.value.is_permanent()


def test_452_stops_adding_recipients(serve):
    srv = serve(Behaviour(rcpt_limit=2))
    rcpts = [f"r{i}@b.test" for i in range(5)]
    with session(srv) as s:
        result = s.send_message("a@a.test", rcpts, MSG)
        assert [result.recipients[a].code for a in rcpts] == [250, 250, 452, 452, 452]
        assert result.recipients["r4@b.test"].enhanced == "4.5.3"
        assert result.reply.code == 250
        rest = [a for a, r in result.recipients.items() if r.code == 452]
        assert s.send_message("a@a.test", rest, MSG).delivered == ["r2@b.test", "r3@b.test"]
    assert [m.rcpt_tos for m in srv.messages] == [["r0@b.test", "r1@b.test"], ["r2@b.test", "r3@b.test"]]
    # the client stopped at the first 452: r3 and r4 were not tried in the first transaction
    assert sum(c.startswith("RCPT") for c in srv.sessions[0].commands) == 3 + 3


def test_greylisting_then_accepted(serve):
    srv = serve(Behaviour(greylist=True))
    with session(srv) as s:
        first = s.send_message("a@a.test", ["b@b.test"], MSG)
        assert first.recipients["b@b.test"].code == 450 and first.reply is None
        second = s.send_message("a@a.test", ["b@b.test"], MSG)
        assert second.reply.code == 250
    assert srv.stats["greylisted"] == 1 and len(srv.messages) == 1


def test_rejection_after_data_is_returned(serve):
    srv = serve(Behaviour(data_reply="554 5.6.0 rejected after DATA"))
    with session(srv) as s:
        result = s.send_message("a@a.test", ["b@b.test"], MSG)
        assert result.reply.code == 554 and result.reply.enhanced == "5.6.0" and result.reply.is_permanent()
        assert result.delivered == []
        s.create_message("a@a.test")           # the connection is still usable
        s.add_recipient("b@b.test")
        s.append_message(MSG)
        assert s.close_message().code == 554
    assert srv.messages == [] and srv.stats["data_refused"] == 2


def test_data_command_refused(serve):
    srv = serve(Behaviour(data_init_reply="451 4.3.0 not now"))
    with session(srv) as s:
        result = s.send_message("a@a.test", ["b@b.test"], MSG)
        assert result.reply.code == 451
        assert s.send_message("a@a.test", ["c@b.test"], MSG).reply.code == 451   # after RSET
    assert "RSET" in srv.sessions[0].commands


def test_connection_dropped_mid_data(serve):
    srv = serve(Behaviour(drop_mid_data=50_000))
    body = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    with session(srv) as s:
        with pytest.raises(SMTPServerDisconnected) as ei:
            s.send_message("a@a.test", ["b@b.test"], body * 3000)
        assert not s.connected
        s.disconnect()                          # harmless after the fact
    assert ei.value.enhanced == "4.4.2" and classify(ei.value).try_next_exchange
    assert srv.messages == [] and srv.stats["dropped"] == 1


def test_connection_dropped_at_final_dot(serve):
    srv = serve(Behaviour(drop_after_data=True))
    with session(srv) as s:
        with pytest.raises(SMTPServerDisconnected):
            s.send_message("a@a.test", ["b@b.test"], MSG)


def test_failing_content_source_never_completes_a_message(serve):
    srv = serve()

    def chunks():
        yield b"Subject: partial\r\n\r\nfirst line\r\n"
        raise RuntimeError("disk gone")

    with session(srv) as s:
        with pytest.raises(RuntimeError):
            s.send_message("a@a.test", ["b@b.test"], chunks())
        assert not s.connected
    assert "DATA" in srv.sessions[0].commands   # DATA started, but no end of data
    assert srv.messages == [] and srv.stats["data"] == 0


def test_missing_file_fails_before_anything_is_sent(serve, tmp_path):
    srv = serve()
    with session(srv) as s:
        with pytest.raises(InvalidMessage):
            s.send_message("a@a.test", ["b@b.test"], tmp_path / "nope.eml")
    assert not any(c.startswith("MAIL") for c in srv.sessions[0].commands)


# ----------------------------------------------------------------------------- extensions

def test_dsn_parameters_as_the_server_saw_them(serve):
    srv = serve()
    rcpts = [Recipient("b@b.test", notify=("SUCCESS", "FAILURE"), orcpt="b+tag=1@b.test"),
             Recipient("c@b.test", notify=("NEVER",))]
    with session(srv) as s:
        s.send_message("a@a.test", rcpts, MSG, dsn=DSN(ret="hdrs", envid="Q1 id=+x"))
    (msg,) = srv.messages
    assert msg.mail_options == ["SIZE=%d" % len(MSG), "RET=HDRS", "ENVID=Q1+20id+3D+2Bx"]
    assert xtext_decode(msg.mail_params["ENVID"]) == "Q1 id=+x"
    assert msg.rcpt_options == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b+2Btag+3D1@b.test"], ["NOTIFY=NEVER"]]


def test_dsn_parameters_not_sent_without_dsn(serve):
    srv = serve(Behaviour(dsn=False))     # this server would refuse them with 555
    with session(srv) as s:
        assert "dsn" not in s.extensions
        result = s.send_message("a@a.test", [Recipient("b@b.test", notify=("FAILURE",), orcpt="b@b.test")],
                                MSG, dsn=DSN(ret="FULL", envid="x"))
    assert result.reply.code == 250
    assert srv.messages[0].mail_options == ["SIZE=%d" % len(MSG)] and srv.messages[0].rcpt_options == [[]]


def test_xtext():
    assert xtext("abc+=d e") == "abc+2B+3Dd+20e"
    assert xtext("\u00e9") == "+C3+A9"


def test_size_limit_fails_early(serve):
    srv = serve(Behaviour(size_limit=1000))
    with session(srv) as s:
        with pytest.raises(SMTPNotSupported) as ei:
            s.send_message("a@a.test", ["b@b.test"], MSG + b"x" * 5000)
        assert ei.value.enhanced == "5.3.4" and ei.value.is_permanent() and ei.value.scope == Scope.MESSAGE
        assert s.send_message("a@a.test", ["b@b.test"], MSG).reply.code == 250
    assert srv.sessions[0].commands.count(f"MAIL FROM:<a@a.test> SIZE={len(MSG)}") == 1
    assert srv.stats["mail"] == 1


def test_no_size_parameter_when_not_advertised(serve):
    srv = serve(Behaviour(size_limit=None))
    with session(srv) as s:
        assert "size" not in s.extensions
        s.send_message("a@a.test", ["b@b.test"], MSG)
    assert srv.messages[0].mail_options == []


def test_8bitmime(serve):
    body = "From: a@a.test\r\nSubject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    srv = serve()
    with session(srv) as s:
        s.send_message("a@a.test", ["b@b.test"], body)
    assert "BODY=8BITMIME" in srv.messages[0].mail_options and srv.messages[0].content == body
    srv7 = serve(Behaviour(eightbitmime=False), host=HOST2)
    with session(srv7) as s:
        assert s.send_message("a@a.test", ["b@b.test"], body).reply.code == 250   # sent anyway
    assert srv7.messages[0].mail_options == [f"SIZE={len(body)}"]


def test_smtputf8_local_part(serve):
    srv = serve()
    rcpt = "\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae@b.test"
    with session(srv) as s:
        result = s.send_message("a@a.test", [rcpt], MSG)
    assert result.reply.code == 250
    (msg,) = srv.messages
    assert msg.rcpt_tos == [rcpt] and "SMTPUTF8" in msg.mail_options


def test_smtputf8_not_offered(serve):
    srv = serve(Behaviour(smtputf8=False))
    with session(srv) as s:
        with pytest.raises(SMTPNotSupported) as ei:
            s.send_message("a@a.test", ["\u00fcser@b.test"], MSG)
        with pytest.raises(SMTPNotSupported):
            s.create_message("j\u00f6rg@a.test")
    assert ei.value.enhanced == "5.6.7" and ei.value.is_permanent()
    assert ei.value.text.startswith("SMTPUTF8 required but not offered")
    assert not any(c.startswith("MAIL") for c in srv.sessions[0].commands)


# ----------------------------------------------------------------------------- streaming

def _reference_data(message: bytes) -> bytes:
    """What must go on the wire: CRLF line ends, dot-stuffed, final CRLF, then '.'."""
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


TRICKY = [
    b"", b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.\r\n", b"a\r\rb\n\nc", b"a\r\n.b\r.c\n.d",
    b"line\r", b"\r\n..\r\n.", b"x" * 20 + b"\r\n." + b"y" * 5, b"end\r\n.\r\n.\r\n",
]


@pytest.mark.parametrize("message", TRICKY)
def test_dot_stuffing_across_chunk_boundaries(message):
    for size in range(1, 9):
        stuffer = DotStuffer()
        out = b"".join(stuffer.feed(message[i:i + size]) for i in range(0, len(message), size))
        out += stuffer.finish()
        assert out == _reference_data(message), (message, size)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"a", b"b"]), max_size=60).map(b"".join),
       st.lists(st.integers(1, 7), min_size=1, max_size=20))
def test_dot_stuffing_property(message, cuts):
    stuffer, out, i, k = DotStuffer(), b"", 0, 0
    while i < len(message):
        step = cuts[k % len(cuts)]
        out += stuffer.feed(message[i:i + step])
        i, k = i + step, k + 1
    assert out + stuffer.finish() == _reference_data(message)


def test_tricky_content_through_a_real_server_with_tiny_chunks(serve):
    srv = serve()
    message = b"Subject: dots\n\n.\n..two\r\n.\r\nbare\rcr\r\n\r\n.end"
    with session(srv, chunk_size=3) as s:
        assert s.send_message("a@a.test", ["b@b.test"], message).reply.code == 250
    assert srv.messages[0].content == b"Subject: dots\r\n\r\n.\r\n..two\r\n.\r\nbare\r\ncr\r\n\r\n.end\r\n"


def test_str_file_object_and_path_content(serve, tmp_path):
    srv = serve()
    path = tmp_path / "m.eml"
    path.write_bytes(MSG)
    with session(srv) as s:
        s.send_message("a@a.test", ["b@b.test"], MSG.decode().replace("\r\n", "\n"))
        with open(path, "rb") as f:
            s.send_message("a@a.test", ["b@b.test"], f)
        s.send_message("a@a.test", ["b@b.test"], path)
    assert [m.content for m in srv.messages] == [MSG] * 3
    assert srv.messages[2].mail_options == [f"SIZE={len(MSG)}"]   # size from the file


def test_20mb_file_is_streamed(serve, tmp_path):
    srv = serve(Behaviour(keep_content=False))
    # 400-byte lines with bare LF ends, some starting with a dot.
    block = b"".join((b"." if i % 7 == 0 else b"") + (b"%04d " % i) + b"z" * 390 + b"\n" for i in range(100))
    path = tmp_path / "big.eml"
    expected = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(b"Subject: big\n\n")
        expected.update(b"Subject: big\r\n\r\n")
        crlf_block = block.replace(b"\n", b"\r\n")
        for _ in range(20 * 1024 * 1024 // len(block)):
            f.write(block)
            expected.update(crlf_block)
    size = path.stat().st_size
    assert size > 20_000_000
    with session(srv) as s:
        tracemalloc.start()
        try:
            result = s.send_message("a@a.test", ["b@b.test"], path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert result.reply.code == 250
    print(f"tracemalloc peak {peak} bytes while sending a {size}-byte file")
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while sending a {size}-byte file"
    (msg,) = srv.messages
    assert msg.content is None and msg.sha256 == expected.hexdigest()
    assert msg.mail_options == [f"SIZE={size}"]


# ----------------------------------------------------------------------------- connection reuse, teardown

def test_reset_reuses_the_connection(serve):
    srv = serve()
    with session(srv) as s:
        s.create_message("a@a.test")
        s.add_recipient("b@b.test")
        assert s.reset().code == 250 and s.accepted == []
        assert s.send_message("a@a.test", ["c@b.test"], MSG).reply.code == 250
        assert s.send_message("a@a.test", ["d@b.test"], MSG).reply.code == 250
    assert len(srv.sessions) == 1 and srv.stats["rset"] == 1
    assert [m.rcpt_tos for m in srv.messages] == [["c@b.test"], ["d@b.test"]]
    assert {m.session_id for m in srv.messages} == {0}


def test_disconnect_tolerates_a_dead_peer(serve):
    srv = serve()
    s = session(srv)
    s.connect()
    srv.stop()                                  # the server closes every connection
    s.disconnect()                              # no exception
    s.disconnect()
    assert not s.connected
    s2 = session(serve(host=HOST2))
    with s2:
        pass
    with pytest.raises(SMTPProtocolError):
        s2.reset()                              # not connected any more


def test_dead_peer_is_reported_on_next_command(serve):
    srv = serve()
    s = session(srv)
    s.connect()
    srv.stop()
    with pytest.raises(SMTPServerDisconnected) as ei:
        s.send_message("a@a.test", ["b@b.test"], MSG)
    assert "MAIL FROM" in ei.value.text and not s.connected


# ----------------------------------------------------------------------------- per-phase timeouts

def test_command_timeout_applies_to_rcpt(serve):
    srv = serve(Behaviour(delays={"rcpt": 1.0}))
    with session(srv, timeouts=Timeouts(connect=2, greeting=2, command=0.3)) as s:
        s.create_message("a@a.test")
        t0 = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as ei:
            s.add_recipient("b@b.test")
        assert time.monotonic() - t0 < 0.9
        assert not s.connected
    assert "RCPT TO" in ei.value.text


def test_data_final_has_its_own_timeout(serve):
    srv = serve(Behaviour(delays={"data_final": 0.6}))
    t = Timeouts(connect=2, greeting=2, command=0.3, data_init=2, data_block=2, data_final=3)
    with session(srv, timeouts=t) as s:
        assert s.send_message("a@a.test", ["b@b.test"], MSG).reply.code == 250
    t_short = Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2, data_final=0.3)
    with session(srv, timeouts=t_short) as s:
        with pytest.raises(SMTPTimeoutError) as ei:
            s.send_message("a@a.test", ["b@b.test"], MSG)
    assert "end of data" in ei.value.text


def test_mxq_command_timeout_from_env(serve, monkeypatch):
    monkeypatch.setenv("MXQ_COMMAND_TIMEOUT", "0.3")
    monkeypatch.setenv("MXQ_CONNECT_TIMEOUT", "2")
    srv = serve(Behaviour(delays={"mail": 1.0}))
    s = SMTPSession(srv.host, srv.port)          # timeouts default to Timeouts.from_env()
    assert s.timeouts.command == 0.3 and s.timeouts.data_final == 0.3 and s.timeouts.connect == 2
    with s:
        t0 = time.monotonic()
        with pytest.raises(SMTPTimeoutError):
            s.create_message("a@a.test")
        assert time.monotonic() - t0 < 0.9


# ----------------------------------------------------------------------------- the server library itself

def test_server_spool_dir_and_wait_for_messages(serve, tmp_path):
    srv = serve(Behaviour(spool_dir=tmp_path / "spool"))
    with session(srv) as s:
        s.send_message("a@a.test", ["b@b.test"], MSG)
    (msg,) = srv.wait_for_messages(1, timeout=5)
    assert msg.path == tmp_path / "spool" / f"{msg.id}.eml" and msg.path.read_bytes() == MSG
    meta = (tmp_path / "spool" / f"{msg.id}.json").read_text()
    assert '"rcpt_tos"' in meta and "b@b.test" in meta
    assert not list((tmp_path / "spool").glob(".incoming-*"))
    with pytest.raises(TimeoutError):
        srv.wait_for_messages(2, timeout=0.2)
    srv.clear()
    assert srv.messages == [] and srv.sessions == [] and srv.stats["messages"] == 0


def test_disconnect_during_data_discards_the_message(serve):
    srv = serve()
    s = session(srv)
    s.connect()
    s.create_message("a@a.test")
    s.add_recipient("b@b.test")
    s.append_message(MSG)
    s.disconnect()                              # no QUIT: it would become message text
    assert not s.connected
    with session(srv) as s2:                    # the server is fine and took nothing
        assert s2.noop().code == 250
    assert srv.messages == [] and "QUIT" not in srv.sessions[0].commands


def test_server_requiring_starttls_refuses_clear_text_mail(serve, tls):
    srv = serve(Behaviour(starttls=tls.server_context, require_starttls=True))
    with session(srv, tls="none") as s:
        with pytest.raises(SMTPSenderRefused) as ei:
            s.create_message("a@a.test")
    assert ei.value.code == 530
    with session(srv) as s:                     # opportunistic TLS satisfies it
        assert s.send_message("a@a.test", ["b@b.test"], MSG).reply.code == 250


def test_421_to_rcpt_is_a_site_failure(serve):
    srv = serve(Behaviour(rcpt_rules={"bye": "421 4.3.2 shutting down"}))
    with session(srv) as s:
        with pytest.raises(SMTPServerDisconnected) as ei:
            s.send_message("a@a.test", ["ok@b.test", "bye@b.test", "c@b.test"], MSG)
        assert not s.connected
    assert ei.value.code == 421 and ei.value.scope == Scope.SITE and classify(ei.value).try_next_exchange
    assert srv.messages == [] and "DATA" not in srv.sessions[0].commands


def test_custom_protocol_subclass():
    from mxq.sandbox.smtpd import ScriptedSMTP

    class Chatty(ScriptedSMTP):
        async def smtp_NOOP(self, arg):
            await self.push("250 2.0.0 custom noop")

    with start_server(HOST2, PORT, protocol=Chatty) as srv:
        with session(srv) as s:
            assert s.noop().text == "custom noop"

"""Interoperability with a real MTA: mxq's client against Postfix 3.7 from Debian.

The ``postfix`` fixture (tests/fixtures_infra.py) runs a private Postfix whose
smtpd listens on 127.0.0.20:25, offers STARTTLS with a certificate for
``mx.postfix.test``, and delivers ``postfix.test`` mail to Maildirs (users
alice, bob, carol; anyone else is refused at RCPT with 550 5.1.1).  The
``dns_server`` fixture publishes ``postfix.test MX 10 mx.postfix.test`` and
``mx.postfix.test A 127.0.0.20``, so every test reaches Postfix through MX
resolution, never by a hard-coded address.

A few tests use Postfix's ``smtp-sink`` (a fast C test server) for failure
modes a full Postfix does not produce on demand.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import uuid

import pytest

from tests.fixtures_infra import _missing, _which, wait_until
from mxq.workers.config import Settings
from mxq.workers.envelope import DSN, Envelope, Recipient
from mxq.workers.errors import SMTPServerDisconnected
from mxq.workers.mx import Resolver
from mxq.workers.session import SMTPSession
from mxq.workers.timeouts import Timeouts

pytestmark = pytest.mark.postfix

FAST = Timeouts(connect=5, greeting=10, command=10, data_init=10, data_block=10, data_final=20)
SENDER = "app@sender.test"


@pytest.fixture(scope="module")
def postfix_mx(dns_server, postfix):
    """Publish Postfix as the MX of postfix.test; return (settings, postfix)."""
    dns_server.add({
        postfix.domain: {"MX": [[10, postfix.hostname]]},
        postfix.hostname: {"A": [postfix.host]},
    })
    return Settings.from_env(), postfix


def resolve(settings: Settings, domain: str):
    """The first exchange of ``domain`` and its first address, through mxq's resolver."""
    exchanges = Resolver(settings).exchanges(domain)
    assert exchanges, f"no exchange for {domain}"
    x = exchanges[0]
    return x.name, x.addresses[0]


def message(marker: str, body: str = "Hello from mxq.\r\n", extra_headers: str = "") -> bytes:
    """A small RFC 5322 message carrying ``marker`` in a header and the subject."""
    return (f"From: App <{SENDER}>\r\nTo: alice@postfix.test\r\nSubject: interop {marker}\r\n"
            f"Message-ID: <{marker}@sender.test>\r\nX-Mxq-Marker: {marker}\r\n{extra_headers}"
            f"\r\n{body}").encode("utf-8")


def body_of(stored: bytes) -> bytes:
    """The body of a stored (Maildir, LF line ends) message."""
    return stored.split(b"\n\n", 1)[1]


def test_mx_resolution_finds_postfix(postfix_mx):
    settings, postfix = postfix_mx
    assert resolve(settings, postfix.domain) == (postfix.hostname, postfix.host)


def test_delivery_over_starttls_lands_in_maildir(postfix_mx):
    settings, postfix = postfix_mx
    name, ip = resolve(settings, postfix.domain)
    marker = uuid.uuid4().hex
    with SMTPSession(ip, 25, helo_name="client.mxq.test", server_hostname=name, timeouts=FAST) as s:
        greeting = s.connect()
        assert greeting.code == 220 and postfix.hostname in greeting.text
        assert s.tls_active, "Postfix offers STARTTLS; opportunistic TLS must use it"
        result = s.send_message(SENDER, ["alice@postfix.test"], message(marker))
    assert result.recipients["alice@postfix.test"].code == 250
    assert result.reply.code == 250 and result.reply.enhanced == "2.0.0"
    assert "queued as" in result.reply.text
    assert result.delivered == ["alice@postfix.test"]

    stored = postfix.wait_for_message("alice", marker.encode())
    assert f"Subject: interop {marker}".encode() in stored
    assert body_of(stored) == b"Hello from mxq.\n"
    # Postfix's Received: header says the hop was ESMTPS, and its log names the TLS session.
    assert b"with ESMTPS id" in stored
    postfix.wait_for_log(r"smtpd\[\d+\]: Anonymous TLS connection established from \S+\[127\.0\.0\.1\]: TLSv1\.[23]")
    postfix.wait_for_log(rf"to=<alice@postfix\.test>, relay=virtual.*status=sent \(delivered to maildir\)")


def test_required_tls_verifies_postfix_certificate(postfix_mx):
    settings, postfix = postfix_mx
    name, ip = resolve(settings, postfix.domain)
    ctx = ssl.create_default_context(cafile=str(postfix.ca_file))
    marker = uuid.uuid4().hex
    with SMTPSession(ip, 25, helo_name="client.mxq.test", tls="required", tls_context=ctx,
                     server_hostname=name, timeouts=FAST) as s:
        result = s.send_message(SENDER, ["bob@postfix.test"], message(marker))
        assert s.tls_active
    assert result.reply.code == 250
    assert marker.encode() in postfix.wait_for_message("bob", marker.encode())


def test_unknown_user_refused_known_user_delivered(postfix_mx):
    settings, postfix = postfix_mx
    name, ip = resolve(settings, postfix.domain)
    marker = uuid.uuid4().hex
    with SMTPSession(ip, 25, helo_name="client.mxq.test", server_hostname=name, timeouts=FAST) as s:
        result = s.send_message(SENDER, ["nobody@postfix.test", "carol@postfix.test"], message(marker))
    refused = result.recipients["nobody@postfix.test"]
    assert refused.code == 550 and refused.enhanced == "5.1.1" and refused.is_permanent()
    assert "User unknown in virtual mailbox table" in refused.text
    assert result.delivered == ["carol@postfix.test"]
    assert marker.encode() in postfix.wait_for_message("carol", marker.encode())
    postfix.wait_for_log(r"NOQUEUE: reject: RCPT from .*550 5\.1\.1 <nobody@postfix\.test>")


def test_dot_stuffing_8bit_and_several_transactions_on_one_connection(postfix_mx):
    """Lines starting with '.', a lone '.', a 998-octet line, UTF-8 text; three messages on one connection."""
    settings, postfix = postfix_mx
    name, ip = resolve(settings, postfix.domain)
    body = ".leading dot\r\n.\r\n..two dots\r\nnaïve café ✓\r\n" + "x" * 998 + "\r\n"
    markers = [uuid.uuid4().hex for _ in range(3)]
    with SMTPSession(ip, 25, helo_name="client.mxq.test", server_hostname=name, timeouts=FAST) as s:
        for m in markers:
            result = s.send_message(SENDER, ["alice@postfix.test"],
                                    message(m, body, "MIME-Version: 1.0\r\nContent-Type: text/plain; "
                                                     "charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"))
            assert result.reply.code == 250, result.reply
    for m in markers:
        stored = postfix.wait_for_message("alice", m.encode())
        assert body_of(stored) == body.replace("\r\n", "\n").encode("utf-8")
    # All three went through one connection (Postfix's per-session command counts).
    postfix.wait_for_log(r"disconnect from .* ehlo=2 starttls=1 mail=3 rcpt=3 data=3 quit=1")


def test_smtputf8_sender_and_dsn_parameters_accepted(postfix_mx):
    settings, postfix = postfix_mx
    name, ip = resolve(settings, postfix.domain)
    marker = uuid.uuid4().hex
    with SMTPSession(ip, 25, helo_name="client.mxq.test", server_hostname=name, timeouts=FAST) as s:
        s.connect()
        assert "smtputf8" in s.extensions and "dsn" in s.extensions
        assert s.create_message("josé@sender.test", dsn=DSN(ret="HDRS", envid=marker)).code == 250
        reply = s.add_recipient(Recipient("alice@postfix.test", notify=("FAILURE", "DELAY"),
                                          orcpt="alice@postfix.test"))
        assert reply.code == 250, reply
        s.append_message(message(marker))
        final = s.close_message()
    assert final.code == 250, final
    stored = postfix.wait_for_message("alice", marker.encode())
    # virtual(8) writes the envelope sender as Return-Path: the UTF-8 address arrived intact.
    assert "Return-Path: <josé@sender.test>".encode() in stored


def test_deliver_reports_per_recipient_outcomes(postfix_mx):
    """The engine's deliver(): MX lookup, STARTTLS, delivered + bounced results from Postfix."""
    delivery = pytest.importorskip("mxq.workers.delivery", reason="mxq.workers.delivery has not landed yet")
    settings, postfix = postfix_mx
    marker = uuid.uuid4().hex
    envelope = Envelope(sender=SENDER, recipients=[Recipient("alice@postfix.test"),
                                                    Recipient("nobody@postfix.test")],
                        content=message(marker), id=marker)
    results = {r.address: r for r in delivery.deliver(envelope, settings=settings, resolver=Resolver(settings))}
    ok, bad = results["alice@postfix.test"], results["nobody@postfix.test"]
    assert ok.state.value == "delivered" and ok.code == 250
    assert ok.exchange == postfix.hostname and ok.ip == postfix.host
    assert bad.state.value == "bounced" and bad.code == 550 and bad.enhanced == "5.1.1"
    assert marker.encode() in postfix.wait_for_message("alice", marker.encode())


# --------------------------------------------------------------------------- smtp-sink

SINK_HOST = "127.0.0.21"


@pytest.fixture
def smtp_sink():
    """Factory: ``smtp_sink(*flags) -> (host, port)``; a running smtp-sink on 127.0.0.21, stopped after."""
    binary = _which("smtp-sink")
    if not binary:
        _missing("smtp-sink", "Postfix's smtp-sink was not found")
    procs = []

    def start(*flags: str):
        port = 25
        p = subprocess.Popen([binary, "-u", "nobody", *flags, f"{SINK_HOST}:{port}", "16"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)

        def greets():
            if p.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {p.stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection((SINK_HOST, port), timeout=1) as c:
                    c.settimeout(2)
                    return c.recv(64).startswith(b"220")
            except OSError:
                return False
        wait_until(greets, 10, "smtp-sink to greet")
        return SINK_HOST, port

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_connection_dropped_after_final_dot_is_never_a_success(smtp_sink):
    host, port = smtp_sink("-q", ".")            # read the message, then hang up without a reply
    with SMTPSession(host, port, helo_name="client.mxq.test", timeouts=FAST) as s:
        s.connect()
        s.create_message(SENDER)
        assert s.add_recipient("someone@sink.test").code == 250
        s.append_message(b"Subject: dropped\r\n\r\nbody\r\n")
        with pytest.raises(SMTPServerDisconnected) as info:
            s.close_message()
    assert info.value.is_transient()


def test_soft_and_hard_rcpt_refusals_are_returned_not_raised(smtp_sink):
    host, port = smtp_sink("-r", "RCPT")          # every RCPT gets a 4xx
    with SMTPSession(host, port, helo_name="client.mxq.test", timeouts=FAST) as s:
        result = s.send_message(SENDER, ["a@sink.test", "b@sink.test"], b"Subject: x\r\n\r\ny\r\n")
    assert {a: r.code // 100 for a, r in result.recipients.items()} == {"a@sink.test": 4, "b@sink.test": 4}
    assert result.reply is None and result.delivered == []

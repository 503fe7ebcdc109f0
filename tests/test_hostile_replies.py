"""Remote replies in UTF-8 and with control characters (issue 9, finding 6).

A server's reply text is the server's to choose: UTF-8 (a German "Benutzer
unbekannt: Jürgen"), and from a hostile or broken one ESC sequences that
would repaint an operator's terminal, NUL, BEL, C1 controls, bidi overrides.
What mxq does with them: every control character is replaced (``?``) where
the reply is parsed, so none is stored, logged, printed by ``mxq status`` or
sent in a webhook; the RFC 3464 report is always built -- RFC 6533's
``message/global-delivery-status`` when the diagnostic is not ASCII.

Real peers: the session's DNS server process, scripted aiosmtpd servers, a
redis-server, a Celery worker and beat, an HTTP webhook receiver.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mxq import tasks
from mxq.sandbox.smtpd import Behaviour, start_server
from mxq.workers.reply import Reply, printable
from tests.fixtures_infra import wait_until
from tests.test_webhooks import Receiver

pytest_plugins = ["tests.pipeline_fixtures"]

DOMAIN = "hostile.test"
SRC = "src.hostile.test"
IP, SRC_IP = "127.0.46.10", "127.0.46.20"
MXQ = str(Path(sys.executable).with_name("mxq"))

#: The hostile reply to RCPT for local parts starting "nobody": multi-line, UTF-8, an ANSI
#: clear-screen and an OSC title sequence ending in BEL, a NUL, a C1 CSI, a bidi override.
HOSTILE = ("550-5.1.1 <{address}>: Benutzer unbekannt (J\u00fcrgen) \x1b[2J\x1b]0;pwned\x07\r\n"
           "550 5.1.1 nul\x00 c1\x9b31m rtl\u202egnp.exe")
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202e]")


def status_blocks(raw: bytes) -> list[dict]:
    """The header blocks of a report's message/global-delivery-status part, parsed from the
    wire bytes (the stdlib parses only message/delivery-status into blocks)."""
    part = raw.split(b"Content-Type: message/global-delivery-status", 1)[1]
    body = part.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    blocks = []
    for block in body.decode("utf-8").strip("\r\n").split("\r\n\r\n"):
        parsed = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(block + "\r\n")
        blocks.append({k: re.sub(r"\r?\n(?=[ \t])", "", v) for k, v in parsed.items()})   # unfolded
    return blocks


@pytest.fixture(scope="module")
def servers(dns_server):
    dns_server.add({DOMAIN: {"MX": [[10, "mx." + DOMAIN]]}, "mx." + DOMAIN: {"A": [IP]},
                    SRC: {"MX": [[10, "mx." + SRC]]}, "mx." + SRC: {"A": [SRC_IP]}})
    hostile = start_server(IP, 25, Behaviour(hostname="mx." + DOMAIN, rcpt_rules={"nobody": HOSTILE}))
    src = start_server(SRC_IP, 25, Behaviour(hostname="mx." + SRC))
    yield hostile, src
    hostile.stop()
    src.stop()


def test_printable_replaces_every_control_character():
    assert printable("plain ASCII, unchanged") == "plain ASCII, unchanged"
    assert printable("J\u00fcrgen \u65e5\u672c") == "J\u00fcrgen \u65e5\u672c"          # UTF-8 text stays
    assert printable("a\x1b[2Jb\x00c\x07d\x7fe\x9bf\u202eg\u2028h") == "a?[2Jb?c?d?e?f?g?h"
    assert printable("one\r\ntwo\tthree\nfour") == "one two three four"
    assert printable("one\r\ntwo\x1b", keep_newlines=True) == "one\ntwo?"
    # as smtplib hands a multi-line reply over: the lines without their "550-" / "550 ", joined by \n
    text = "\n".join(line[4:] for line in HOSTILE.replace("{address}", "x@y.test").split("\r\n"))
    r = Reply.parse(550, text.encode())
    assert r.enhanced == "5.1.1" and "\n" in r.text and not CONTROL.search(r.text)
    assert "J\u00fcrgen" in r.text and "?[2J?]0;pwned?" in r.text


def test_engine_results_and_log_lines_hold_no_control_character(servers, caplog):
    from mxq.workers.config import Settings
    from mxq.workers.delivery import deliver
    from mxq.workers.envelope import Envelope, Recipient

    env = Envelope(sender="alice@" + SRC, recipients=[Recipient("nobody@" + DOMAIN), Recipient("ok@" + DOMAIN)],
                   content=b"Subject: x\r\n\r\nhi\r\n")
    with caplog.at_level(logging.INFO, logger="mxq.delivery"):
        results = {r.address: r for r in deliver(env, settings=Settings.from_env())}
    bad = results["nobody@" + DOMAIN]
    assert (bad.state.value, bad.code, bad.enhanced) == ("bounced", 550, "5.1.1")
    assert "Benutzer unbekannt (J\u00fcrgen)" in bad.text and "\n" not in bad.text
    assert not CONTROL.search(bad.text)
    assert results["ok@" + DOMAIN].state.value == "delivered"
    lines = [r.getMessage() for r in caplog.records if "nobody@" in r.getMessage()]
    assert lines and all(not CONTROL.search(line) for line in lines)


def test_utf8_and_esc_reply_gives_a_valid_report_and_nothing_raw_anywhere(pipeline, servers):
    """The 5xx bounces; the sender gets a valid RFC 3464/6533 report; record, ``mxq status``,
    webhook and worker log carry no control character."""
    _, src = servers
    src.clear()
    hook = Receiver()
    try:
        p = pipeline(MXQ_WEBHOOK_URL=hook.url)
        worker = p.worker()
        job = tasks.submit(f"From: alice@{SRC}\r\nTo: nobody@{DOMAIN}\r\nSubject: hi\r\n\r\nhello\r\n")

        def report():
            got = [m for m in src.messages if m.mail_from == ""]
            return got[0] if got else None
        m = wait_until(report, 40, "the non-delivery report at the sender's exchange", interval=0.1)
        assert m.rcpt_tos == [f"alice@{SRC}"]
        assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", m.content)    # nothing raw on the wire
        msg = email.message_from_bytes(m.content, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "global-delivery-status"       # RFC 6533: a UTF-8 diagnostic
        human, status, original = list(msg.iter_parts())
        assert status.get_content_type() == "message/global-delivery-status"
        per_message, per_recipient = status_blocks(m.content)
        assert per_message["Reporting-MTA"] == f"dns; {p.env['MXQ_HELO_NAME']}"
        assert per_recipient["Final-Recipient"] == f"rfc822;nobody@{DOMAIN}"
        assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
        diag = per_recipient["Diagnostic-Code"]
        assert diag.startswith("smtp; 550 5.1.1 ") and "Benutzer unbekannt (J\u00fcrgen)" in diag
        assert "?[2J?]0;pwned?" in diag and not CONTROL.search(diag)
        assert "J\u00fcrgen" in human.get_content()
        assert original.get_content_type() == "text/rfc822-headers"

        st = tasks.status(job)["recipients"][0]
        assert st["state"] == "bounced" and "J\u00fcrgen" in st["text"] and not CONTROL.search(st["text"])
        out = subprocess.run([MXQ, "status", job], capture_output=True, timeout=60, env=dict(os.environ))
        assert out.returncode == 0, out.stderr
        assert "J\u00fcrgen".encode() in out.stdout and not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]", out.stdout)
        wait_until(lambda: any(e["state"] == "bounced" for e in hook.events()), 30, "the bounce's webhook event")
        event = next(e for e in hook.events() if e["state"] == "bounced")
        assert "J\u00fcrgen" in event["text"] and not CONTROL.search(event["text"])
        log = worker.log()
        assert "nobody@" + DOMAIN in log and "J\u00fcrgen" in log
        assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x9b]", log)
    finally:
        hook.stop()

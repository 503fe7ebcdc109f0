"""prepare(): envelope defaults from the headers, Bcc removal, added headers, and refusal of bad input."""

from __future__ import annotations

import email
import email.policy
import tracemalloc
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from mxq.workers.envelope import DSN, Recipient
from mxq.workers.errors import InvalidAddress, InvalidInput, InvalidMessage
from mxq.workers.message import (DEFAULT_MAX_MESSAGE_SIZE, FileContent, max_message_size_from_env, prepare)


def content_bytes(env) -> bytes:
    c = env.content
    return c if isinstance(c, bytes) else b"".join(c)


def headers_of(env) -> email.message.Message:
    return email.message_from_bytes(content_bytes(env), policy=email.policy.default)


SIMPLE = (b"From: Alice <alice@a.test>\n"
          b"To: Bob <bob@b.test>, carol@C.test\n"
          b"Cc: dave@b.test\n"
          b"Bcc: secret@hidden.test\n"
          b"Subject: hello\n"
          b"\n"
          b"Hi there.\n")


def test_defaults_from_to_cc_bcc_and_from():
    env = prepare(SIMPLE)
    assert env.sender == "alice@a.test"
    assert [r.address for r in env.recipients] == ["bob@b.test", "carol@c.test", "dave@b.test",
                                                   "secret@hidden.test"]
    assert all(r.notify is None and r.orcpt is None for r in env.recipients)
    assert not env.eightbit and not env.smtputf8
    assert env.size == len(content_bytes(env))


def test_bcc_removed_from_content_and_never_leaked():
    raw = SIMPLE.replace(b"Bcc: secret@hidden.test\n", b"Bcc: secret@hidden.test,\n  other@hidden.test\n")
    env = prepare(raw)
    data = content_bytes(env)
    assert b"hidden.test" not in data
    assert b"Bcc" not in data
    assert {"secret@hidden.test", "other@hidden.test"} <= {r.address for r in env.recipients}
    # The rest of the header block is byte-for-byte what was given, with CRLF.
    assert data.startswith(b"From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>, carol@C.test\r\n"
                           b"Cc: dave@b.test\r\nSubject: hello\r\n")
    assert data.endswith(b"\r\n\r\nHi there.\r\n")


def test_resent_bcc_removed_too():
    env = prepare(SIMPLE.replace(b"Subject", b"Resent-Bcc: x@hidden.test\nSubject"))
    assert b"hidden.test" not in content_bytes(env)


def test_sender_header_wins_over_from():
    env = prepare(b"From: a@a.test\nSender: list@lists.test\nTo: b@b.test\n\nx\n")
    assert env.sender == "list@lists.test"


def test_explicit_sender_and_recipients_override():
    env = prepare(SIMPLE, sender="bounce@a.test", recipients=["Only@Only.Test"])
    assert env.sender == "bounce@a.test"
    assert [r.address for r in env.recipients] == ["Only@only.test"]
    # The header Bcc is still removed even though it did not give the recipients.
    assert b"secret" not in content_bytes(env)


@pytest.mark.parametrize("null", ["", "<>"])
def test_null_sender(null):
    assert prepare(SIMPLE, sender=null).sender == ""


def test_duplicates_removed_in_order():
    env = prepare(b"From: a@a.test\nTo: b@b.test, b@B.TEST\nCc: b@b.test, c@c.test\n\nx\n")
    assert [r.address for r in env.recipients] == ["b@b.test", "c@c.test"]


def test_group_syntax_and_undisclosed_recipients():
    env = prepare(b"From: a@a.test\nTo: undisclosed-recipients:;\nCc: Team: x@b.test, y@b.test;\n\nx\n")
    assert [r.address for r in env.recipients] == ["x@b.test", "y@b.test"]


def test_date_and_message_id_added_when_missing():
    msg = headers_of(prepare(SIMPLE))
    assert msg["Date"] is not None and msg["Date"].datetime is not None
    assert msg["Message-ID"].endswith("@a.test>")


def test_date_and_message_id_kept_when_present():
    raw = SIMPLE.replace(b"Subject", b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <x@y.test>\nSubject")
    data = content_bytes(prepare(raw))
    assert data.count(b"Date:") == 1 and data.count(b"Message-ID:") == 1
    assert b"<x@y.test>" in data


def test_line_endings_normalized_to_crlf():
    env = prepare(b"From: a@a.test\rTo: b@b.test\n\nline1\nline2\rline3\r\n" .replace(b"\rTo", b"\nTo"))
    data = content_bytes(env)
    assert b"line1\r\nline2\r\nline3\r\n" in data
    assert data.count(b"\n") == data.count(b"\r\n")


def test_email_message_object():
    m = EmailMessage()
    m["From"] = "Alice <alice@a.test>"
    m["To"] = "bob@b.test"
    m["Bcc"] = "hidden@h.test"
    m["Subject"] = "héllo"
    m.set_content("body\n")
    env = prepare(m)
    assert [r.address for r in env.recipients] == ["bob@b.test", "hidden@h.test"]
    data = content_bytes(env)
    assert b"hidden" not in data
    assert data.isascii()  # the non-ASCII subject is RFC 2047 encoded: no SMTPUTF8 needed
    assert not env.smtputf8


def test_smtputf8_local_part_and_idn_domain():
    m = EmailMessage()
    m["From"] = "alice@a.test"
    m["To"] = "jörg@bücher.test"
    m.set_content("hi\n")
    env = prepare(m)
    assert env.recipients[0].address == "jörg@bücher.test"
    assert env.smtputf8 and env.eightbit
    assert "jörg@bücher.test".encode() in content_bytes(env)


def test_eightbit_body_without_smtputf8():
    env = prepare("From: a@a.test\nTo: b@b.test\nContent-Type: text/plain; charset=utf-8\n"
                  "Content-Transfer-Encoding: 8bit\n\nGrüße\n")
    assert env.eightbit and not env.smtputf8


def test_dsn_notify_and_orcpt():
    env = prepare(SIMPLE, recipients=["<Bob@B.test>", Recipient("x@x.test", notify=("NEVER",))],
                  notify=("SUCCESS", "FAILURE"), dsn=DSN(ret="HDRS", envid="E1"))
    r0, r1 = env.recipients
    assert r0.notify == ("SUCCESS", "FAILURE") and r0.orcpt == "Bob@B.test"
    assert r1.notify == ("NEVER",)
    assert env.dsn.ret == "HDRS" and env.dsn.envid == "E1"


# -- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,reason", [
    (dict(sender="a@b.test\r\nRCPT TO:<x@y.test>"), InvalidAddress, "CR or LF"),
    (dict(recipients=["x@y.test\nDATA"]), InvalidAddress, "CR or LF"),
    (dict(recipients=["x\x01@y.test"]), InvalidAddress, "control character"),
    (dict(recipients=["no-at-sign"]), InvalidAddress, "local part and a domain"),
    (dict(recipients=["a@-bad-.test"]), InvalidAddress, "malformed domain"),
    (dict(recipients=[]), InvalidMessage, "no recipients"),
    (dict(notify=("SOMETIMES",)), InvalidMessage, "NOTIFY"),
])
def test_bad_envelope_arguments(kwargs, exc, reason):
    with pytest.raises(exc) as ei:
        prepare(SIMPLE, **kwargs)
    assert reason in ei.value.reason


@pytest.mark.parametrize("raw,reason", [
    (b"From: a@a.test\nTo: b@b.test\nthis is not a header\n\nbody\n", "malformed header line 3"),
    (b" leading continuation\nFrom: a@a.test\nTo: b@b.test\n\nx\n", "continuation"),
    (b"From: a@a.test\nTo: b@b.test\nSubject: a\rBcc: x@x.test\n\nx\n", "CR that does not end a line"),
    (b"From: a@a.test\nTo: b@b.test\nSubject: a\0b\n\nx\n", "NUL"),
    (b"From: a@a.test\nTo: b@b.test\n\nbody\0\n", "NUL"),
    (b"From: a@a.test\nTo: b@b.test\nSubject: " + b"x" * 1000 + b"\n\nx\n", "longer than 998"),
    (b"From: a@a.test\nTo: b@b.test\n\n" + b"y" * 999 + b"\n", "body line 1 is longer than 998"),
    (b"From: a@a.test\nTo: b@b.test\nSubject: caf\xe9\n\nx\n", "not UTF-8"),
    (b"From: a@a.test\nTo: b@b.test, broken\n\nx\n", "recipient from the To header"),
    (b"From: bad address\nTo: b@b.test\n\nx\n", "sender from the From header"),
    (b"To: b@b.test\n\nx\n", "no sender"),
    (b"From: a@a.test\nSubject: none\n\nx\n", "no recipients"),
])
def test_bad_messages_refused_with_reason(raw, reason):
    with pytest.raises(InvalidInput) as ei:
        prepare(raw)
    assert reason in ei.value.reason


def test_body_line_of_exactly_998_is_fine():
    env = prepare(b"From: a@a.test\nTo: b@b.test\n\n" + b"y" * 998 + b"\n")
    assert env.size > 998


def test_header_injection_through_message_object_refused():
    m = Message()  # compat32 lets the value in; serialization refuses it
    m["From"] = "a@a.test"
    m["To"] = "b@b.test"
    m["Subject"] = "hi\nBcc: evil@evil.test"
    with pytest.raises(InvalidMessage) as ei:
        prepare(m)
    assert "embedded header" in ei.value.reason or "injection" in ei.value.reason


def test_header_injection_through_set_raw_refused():
    m = EmailMessage()
    m["From"] = "a@a.test"
    m["To"] = "b@b.test"
    m.set_raw("Subject", "hi\r\nX-Injected: yes")
    m.set_content("x\n")
    with pytest.raises(InvalidMessage):
        prepare(m)


def test_email_message_refuses_injection_at_assignment():
    # The default policy refuses the value outright; document that nothing reaches prepare().
    m = EmailMessage()
    with pytest.raises(ValueError):
        m["Subject"] = "hi\r\nBcc: x@x.test"


def test_too_large_refused():
    with pytest.raises(InvalidMessage) as ei:
        prepare(SIMPLE + b"z" * 5000, max_size=1000)
    assert "larger than the limit" in ei.value.reason


def test_unsupported_content_type():
    with pytest.raises(InvalidMessage):
        prepare(12345)


def test_max_size_from_env():
    assert max_message_size_from_env({}) == DEFAULT_MAX_MESSAGE_SIZE
    assert max_message_size_from_env({"MXQ_MAX_MESSAGE_SIZE": "1000"}) == 1000
    with pytest.raises(ValueError, match="MXQ_MAX_MESSAGE_SIZE"):
        max_message_size_from_env({"MXQ_MAX_MESSAGE_SIZE": "big"})


# -- files -----------------------------------------------------------------------------------------

def test_path_content_streams_a_20mb_file_without_reading_it_whole(tmp_path: Path):
    path = tmp_path / "big.eml"
    line = b"0123456789" * 7 + b"\n"      # LF endings: the stream must turn them into CRLF
    with open(path, "wb") as f:
        f.write(b"From: a@a.test\nTo: b@b.test\nBcc: hidden@h.test\nSubject: big\n\n")
        for _ in range(20 * 1024 * 1024 // len(line)):
            f.write(line)
    raw_size = path.stat().st_size
    assert raw_size > 20_000_000

    tracemalloc.start()
    try:
        env = prepare(path)
        _, peak_prepare = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total, chunks, biggest = 0, 0, 0
        head = b""
        for chunk in env.content:
            total += len(chunk)
            chunks += 1
            biggest = max(biggest, len(chunk))
            if len(head) < 200:
                head += chunk[:200]
        _, peak_stream = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(env.content, FileContent)
    assert peak_prepare < 2_000_000 and peak_stream < 2_000_000   # never the whole 20 MB
    assert biggest < 300_000 and chunks > 100
    assert total == env.size
    lines = raw_size - len(b"From: a@a.test\nTo: b@b.test\nBcc: hidden@h.test\nSubject: big\n\n")
    assert env.size > raw_size + lines // len(line)   # every LF became CRLF
    assert b"hidden" not in head and head.startswith(b"From: a@a.test\r\nTo: b@b.test\r\nSubject: big\r\n")
    assert [r.address for r in env.recipients] == ["b@b.test", "hidden@h.test"]
    # Re-iterable: a second pass yields the same bytes (a second exchange gets the whole message).
    assert sum(len(c) for c in env.content) == total


def test_path_crlf_split_across_chunks(tmp_path: Path):
    from mxq.workers import message
    path = tmp_path / "m.eml"
    header = b"From: a@a.test\r\nTo: b@b.test\r\n\r\n"
    # Put a CRLF exactly on the chunk boundary of the body.
    full, rest = divmod(message.CHUNK_SIZE - 1, 99)
    body = (b"b" * 97 + b"\r\n") * full + b"a" * rest + b"\r\n" + b"tail\r\n"
    assert body[message.CHUNK_SIZE - 1:message.CHUNK_SIZE + 1] == b"\r\n"
    path.write_bytes(header + body)
    env = prepare(path)
    data = b"".join(env.content)
    assert data.endswith(b"\r\n\r\n" + body)
    assert env.size == len(data)


def test_path_errors(tmp_path: Path):
    with pytest.raises(InvalidMessage, match="cannot read"):
        prepare(tmp_path / "missing.eml")
    big = tmp_path / "big.eml"
    big.write_bytes(SIMPLE + b"x\n" * 1000)
    with pytest.raises(InvalidMessage, match="larger than the limit"):
        prepare(big, max_size=500)
    bad = tmp_path / "bad.eml"
    bad.write_bytes(b"From: a@a.test\nTo: b@b.test\n\n" + b"q" * 2000 + b"\n")
    with pytest.raises(InvalidMessage, match="longer than 998"):
        prepare(bad)


def test_str_is_message_text_not_a_path(tmp_path: Path):
    p = tmp_path / "x.eml"
    p.write_bytes(SIMPLE)
    with pytest.raises(InvalidMessage):
        prepare(str(p))   # a str is message text: this one has no header block

"""Property tests (hypothesis): bad input never crashes mxq and never reaches the wire.

- ``parse_address`` on any text raises only ``InvalidAddress``, refuses every
  CR, LF, NUL and control character, and what it accepts round-trips;
- ``prepare()`` on any bytes, text or header values raises only
  ``InvalidInput``, and an envelope it returns never carries CR/LF in an
  address nor a header field that was not in the input;
- the command lines an ``SMTPSession`` sends for accepted addresses, as a
  real aiosmtpd server records them, never contain a stray CR or LF.
"""

from __future__ import annotations

import email.message
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mxq.workers.address import parse_address, parse_sender
from mxq.workers.errors import InvalidAddress, InvalidInput
from mxq.workers.message import prepare

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------------

_atext = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-éü中"
local_parts = st.lists(st.text(alphabet=_atext, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
quoted_locals = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e,
                                               blacklist_characters='"\\'), max_size=10).map(lambda s: f'"{s}"')
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
idn_labels = st.text(alphabet="abcdéüßж中", min_size=1, max_size=6)
domains = st.lists(st.one_of(labels, idn_labels), min_size=1, max_size=4).map(".".join)
literals = st.ip_addresses(v=4).map(lambda ip: f"[{ip}]")
good_addresses = st.builds(lambda l, d: f"{l}@{d}", st.one_of(local_parts, quoted_locals), st.one_of(domains, literals))


def _insert(args):
    text, pos, junk = args
    pos %= len(text) + 1
    return text[:pos] + junk + text[pos:]


nasty = st.sampled_from(["\r", "\n", "\r\n", "\0", "\x01", "\x1b", "\x7f", "\t", " ", "<", ">", "@", '"', "\\",
                         "\r\nRCPT TO:<evil@evil.test>", "\nDATA\n", "\u2028", "\udcff"])
mutated_addresses = st.tuples(good_addresses, st.integers(0, 200), st.one_of(nasty, st.text(max_size=3))).map(_insert)
any_address_text = st.one_of(st.text(max_size=40), good_addresses, mutated_addresses)

# -- parse_address -------------------------------------------------------------------------------------


@QUICK
@given(any_address_text)
def test_parse_address_only_raises_invalid_address(text):
    try:
        parse_address(text)
    except InvalidAddress as e:
        assert e.reason


@QUICK
@given(st.one_of(mutated_addresses, st.text(max_size=40)))
def test_parse_address_refuses_control_characters(text):
    assume(CONTROL.search(text))
    with pytest.raises(InvalidAddress):
        parse_address(text)
    if text.strip(" \t") not in ("", "<>"):   # blanks around "<>" are still the null sender
        with pytest.raises(InvalidAddress):
            parse_sender(text)


@QUICK
@given(st.one_of(good_addresses, mutated_addresses))
def test_accepted_addresses_round_trip_and_are_wire_safe(text):
    try:
        a = parse_address(text)
    except InvalidAddress:
        return
    wire = a.smtp()
    assert not CONTROL.search(wire) and not CONTROL.search(str(a))
    if not a.local.startswith('"'):
        # An unquoted path has no blank and no angle bracket that could end "<...>" early.
        assert not re.search(r"[\s<>]", wire)
    else:
        # A quoted local part may hold blanks, but the domain never does.
        assert not re.search(r"[\s<>]", a.ascii_domain)
    assert wire.isascii() or a.needs_smtputf8
    again = parse_address(str(a))
    assert (again.local, again.ascii_domain) == (a.local, a.ascii_domain)
    again = parse_address(f"<{wire}>")
    assert (again.local, again.ascii_domain, again.literal) == (a.local, a.ascii_domain, a.literal)


# -- prepare() ---------------------------------------------------------------------------------------

header_names = st.one_of(st.sampled_from(["From", "To", "Cc", "Bcc", "Subject", "Sender", "Date", "Message-ID"]),
                         st.text(min_size=0, max_size=10))
header_values = st.one_of(any_address_text, st.text(max_size=60),
                          st.lists(any_address_text, max_size=3).map(", ".join))
eols = st.sampled_from(["\r\n", "\n", "\r"])


@st.composite
def raw_messages(draw):
    fields = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    eol = draw(eols)
    body = draw(st.text(max_size=80))
    text = "".join(f"{n}: {v}{eol}" for n, v in fields) + eol + body
    return text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text


def _field_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].decode().lower() for line in head.split(b"\r\n")
            if line and line[:1] not in (b" ", b"\t")]


def _content(env) -> bytes:
    return env.content if isinstance(env.content, bytes) else b"".join(env.content)


def _check_envelope(env):
    for addr in [env.sender] + [r.address for r in env.recipients]:
        assert not CONTROL.search(addr)
    for r in env.recipients:
        parse_address(r.address)   # every recipient is a valid address
    data = _content(env)
    assert b"\0" not in data
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", data)   # CRLF only
    names = _field_names(data)
    assert "bcc" not in names
    assert env.size == len(data)
    return names


@QUICK
@given(st.one_of(st.binary(max_size=300), raw_messages()))
def test_prepare_on_arbitrary_input_only_raises_invalid_input(raw):
    try:
        env = prepare(raw)
    except InvalidInput as e:
        assert e.reason
        return
    names = _check_envelope(env)
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    given_names = {n.lower() for n in re.findall(rb"(?m)^([\x21-\x39\x3b-\x7e]+)[ \t]*:", data)
                   for n in [n.decode()]}
    # Nothing appears in the header block that the input did not have, except what prepare() adds.
    assert set(names) <= given_names | {"date", "message-id"}


@QUICK
@given(st.lists(st.tuples(st.sampled_from(["Subject", "To", "Cc", "Bcc", "X-Note", "Reply-To"]), header_values),
                max_size=5),
       st.one_of(good_addresses, mutated_addresses), st.booleans())
def test_prepare_message_object_never_gains_headers(fields, sender, compat):
    msg = email.message.Message() if compat else email.message.EmailMessage()
    msg["From"] = "sender@from.test"
    for name, value in fields:
        try:
            msg[name] = value
        except Exception:   # the email package refuses (or trips over) some values at assignment
            if not compat:
                msg.set_raw(name, value)   # force the raw value in: prepare() must still be safe
    try:
        env = prepare(msg, recipients=["rcpt@to.test"], sender=sender)
    except InvalidInput as e:
        assert e.reason
        return
    names = _check_envelope(env)
    expected = [k.lower() for k in msg.keys() if k.lower() != "bcc"]
    assert names[:len(expected)] == expected
    assert set(names[len(expected):]) <= {"date", "message-id"}


# -- the wire: command lines a real server records ------------------------------------------------------

@pytest.fixture(scope="module")
def recorder():
    """One scripted aiosmtpd server that accepts every recipient and records every command line."""
    from mxq.sandbox.smtpd import Behaviour, start_server
    srv = start_server("127.0.3.1", 25, Behaviour(rcpt_rules={}, hostname="recorder.prop.test"))
    yield srv
    srv.stop()


def _accepted(text):
    try:
        return parse_address(text)
    except InvalidAddress:
        return None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.one_of(good_addresses, mutated_addresses), st.one_of(good_addresses, mutated_addresses))
def test_command_lines_from_accepted_addresses_are_single_lines(recorder, sender_text, rcpt_text):
    from mxq.workers.session import SMTPSession
    from mxq.workers.timeouts import Timeouts
    sender, rcpt = _accepted(sender_text), _accepted(rcpt_text)
    assume(sender is not None and rcpt is not None)
    before = len(recorder.sessions)
    with SMTPSession("127.0.3.1", 25, helo_name="client.prop.test", tls="none",
                     timeouts=Timeouts(connect=2, greeting=2, command=2, data_init=2, data_block=2,
                                       data_final=2)) as s:
        s.send_message(sender_text, [rcpt_text], b"Subject: property\r\n\r\nhello\r\n")
    [record] = recorder.sessions[before:]
    commands = record.commands
    verbs = [c.split(" ", 1)[0].upper() for c in commands]
    # Exactly one MAIL and one RCPT: nothing in an address became a command of its own.
    assert verbs.count("MAIL") == 1 and verbs.count("RCPT") == 1, commands
    assert set(verbs) <= {"EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT"}, commands
    assert all("\r" not in c and "\n" not in c for c in commands)
    mail = commands[verbs.index("MAIL")]
    rcpt_line = commands[verbs.index("RCPT")]
    assert mail.split(" ", 1)[1].startswith(f"FROM:<{sender.smtp()}>")
    assert rcpt_line.split(" ", 1)[1].startswith(f"TO:<{rcpt.smtp()}>")

"""The producer's fast paths give exactly what the general code gives (hypothesis and fixed cases).

``prepare()`` and the Django backend take shortcuts for the common case (issue
8: a 2 KB Django ``EmailMessage`` cost ~250-400 us of producer CPU).  Each
shortcut must be invisible: the same stored bytes, the same fields, the
same errors.  Checked here against the general code for arbitrary input:

- ``flatten`` (compat32 header fields written as they are when folding
  would not change them; body lines joined before writing) against the
  standard library's ``BytesGenerator``;
- ``normalize_eols``'s two C fast paths against the regular expression;
- the body scan (line lengths by ``bytes.split``) against the line-by-line
  count it replaced, in any chunking;
- the one-field-per-line header parser against the general line parser;
- the Django backend's plain-address shortcut against ``email.utils``, and
  its rendering against Django's own ``as_bytes``.
"""

from __future__ import annotations

import email.generator
import email.message
import email.policy
import io
import re
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxq.workers import message as M
from mxq.workers.errors import InvalidInput, InvalidMessage

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stdlib_bytes(msg, linesep=None) -> bytes:
    buf = io.BytesIO()
    email.generator.BytesGenerator(buf, mangle_from_=False).flatten(msg, linesep=linesep)
    return buf.getvalue()


# -- flatten ------------------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
# Printable ASCII and blanks (the fast path), plus what must take the general path: non-ASCII,
# controls that str.splitlines() breaks on, CR/LF, encoded words, and long values.
values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=90),
    st.text(alphabet=" \t=?;,abcQ", max_size=40),
    st.text(alphabet="abc \téü中\x0b\x0c\x1c\x85", max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=70, max_size=200),
    st.sampled_from(["", " ", "\t", "  two  spaces  ", "=?utf-8?q?caf=C3=A9?=", "a\n b", "x" * 77]),
)
bodies = st.text(alphabet="ab \r\n\té", max_size=300)


@SETTINGS
@given(st.lists(st.tuples(names, values), max_size=8), bodies, st.sampled_from([None, "\n", "\r\n"]))
def test_flatten_is_the_standard_generator_for_compat32(fields, body, linesep):
    msg = MIMEText(body, "plain", "utf-8")
    for name, value in fields:
        msg[name] = value
    try:
        want = stdlib_bytes(msg, linesep)
    except Exception as e:                       # the standard generator refuses: flatten must too
        with pytest.raises(type(e)):
            M.flatten(msg, linesep)
        return
    assert M.flatten(msg, linesep) == want


@pytest.mark.parametrize("linesep", [None, "\r\n"])
def test_flatten_multipart_and_other_policies(linesep):
    outer = MIMEMultipart("mixed")
    outer["Subject"] = "a subject " * 12                         # folded by the policy
    outer["From"] = "Ünïcode Näme <a@b.example>"
    outer["X-Short"] = "plain value"
    alt = MIMEMultipart("alternative")
    alt.attach(MIMEText("text part\nwith lines\n", "plain", "utf-8"))
    alt.attach(MIMEText("<p>html</p>", "html", "utf-8"))
    outer.attach(alt)
    outer.attach(MIMEApplication(b"\x00\x01binary" * 50, Name="f.bin"))
    assert M.flatten(outer, linesep) == stdlib_bytes(outer, linesep)
    modern = email.message.EmailMessage()                     # default policy: the general path
    modern["Subject"] = "modern " * 15
    modern["To"] = "x@y.example"
    modern.set_content("body\n")
    assert M.flatten(modern, linesep) == stdlib_bytes(modern, linesep)


# -- normalize_eols -----------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=200).map(lambda b: bytes(c for c in b if c not in b"\r\n")) | st.text(
    alphabet="ab\r\n", max_size=200).map(str.encode))
def test_normalize_eols_fast_paths(data):
    assert M.normalize_eols(data) == re.sub(rb"\r\n|\n|\r", b"\r\n", data)


# -- body scan ----------------------------------------------------------------------------------------


def reference_scan(chunks: list[bytes]) -> tuple[int, bool, int | None]:
    """The line-by-line scan ``_BodyScan.feed`` replaced: (size, eightbit, first long line)."""
    size, eightbit, line, line_no, long_line = 0, False, 0, 1, None
    for c in chunks:
        size += len(c)
        eightbit = eightbit or not c.isascii()
        if long_line is not None:
            continue
        parts = c.split(b"\r\n")
        for i, part in enumerate(parts):
            line += len(part)
            if line > M.MAX_LINE_LENGTH:
                long_line = line_no
                break
            if i < len(parts) - 1:
                line = 0
                line_no += 1
    return size, eightbit, long_line


line_lengths = st.lists(st.one_of(st.integers(0, 80), st.integers(990, 1010)), min_size=1, max_size=12)


@SETTINGS
@given(line_lengths, st.lists(st.integers(1, 3000), max_size=6), st.booleans())
def test_body_scan_matches_the_line_by_line_count(lengths, cuts, eight):
    body = b"\r\n".join((b"\xc3\xa9" if eight and k == 1 else b"") + b"x" * n for k, n in enumerate(lengths))
    # Chunks as _normalized_chunks makes them: never a CRLF split in two.
    chunks, pos = [], 0
    for cut in sorted(cuts):
        cut = min(cut, len(body))
        if cut > pos and body[cut - 1:cut] != b"\r":
            chunks.append(body[pos:cut])
            pos = cut
    chunks.append(body[pos:])
    scan = M._BodyScan()
    for c in chunks:
        scan.feed(c)
    assert (scan.size, scan.eightbit, scan.long_line) == reference_scan(chunks)


# -- header block -------------------------------------------------------------------------------------

header_lines = st.one_of(
    st.builds(lambda n, v: n + b": " + v, st.sampled_from([b"From", b"To", b"Subject", b"X-A", b"Bcc"]),
              st.text(alphabet="ab <>@.,é", max_size=30).map(str.encode)),
    st.sampled_from([b" continued", b"\tcontinued", b"   ", b"no colon", b"Bad Name: x", b"X-Latin: \xe9",
                     b"X-Long: " + b"y" * 995, b"From mbox line", b"Name:value", b"Name \t: value",
                     b"X-Edge: " + b"y" * 990, b"X-Edge: " + b"y" * 991,      # 998 and 999 octets
                     b"X-Ctl: a\x0b\x0cb\x1c\x1d\x1e" + "\x85\u2028".encode()]),   # not line ends in bytes
)


@SETTINGS
@given(st.lists(header_lines, max_size=8), st.sampled_from([b"\n", b"\r\n"]))
def test_header_fast_path_matches_the_line_parser(lines, eol):
    raw = b"".join(line + eol for line in lines)
    try:
        want = M._parse_header_lines(_strip_lines(raw))
    except InvalidMessage as e:
        with pytest.raises(InvalidMessage) as got:
            M._parse_header_block(raw)
        assert got.value.reason == e.reason
        return
    assert M._parse_header_block(raw) == want


def _strip_lines(raw: bytes) -> list[bytes]:
    """The lines ``_parse_header_block`` hands its parsers (CR stripped, mbox "From " line dropped)."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    return lines[1:] if lines and lines[0].startswith(b"From ") else lines


# -- prepare: addresses parsed once -------------------------------------------------------------------


def test_prepare_with_addresses_returns_the_envelope_recipients_parsed():
    raw = (b"From: S <s@Sender.Example>\r\nTo: a@B.example, b@xn--bcher-kva.example\r\nCc: c@b\xc3\xbccher.example\r\n"
           b"Date: Sat, 01 Jan 2000 00:00:00 +0000\r\nMessage-ID: <1@x.example>\r\nSubject: x\r\n\r\nbody\r\n")
    env, addrs = M.prepare_with_addresses(raw)
    assert env == M.prepare(raw)
    assert [str(a) for a in addrs] == [r.address for r in env.recipients]
    assert [a.ascii_domain for a in addrs] == ["b.example", "xn--bcher-kva.example", "xn--bcher-kva.example"]
    assert env.sender == "s@sender.example"
    with pytest.raises(InvalidInput):
        M.prepare_with_addresses(raw, recipients=["not an address"])


# -- parse_address: valid addresses remembered ----------------------------------------------------------


@SETTINGS
@given(st.one_of(st.from_regex(r"[a-z.]{1,12}@[a-zé.-]{1,12}\.(test|example)", fullmatch=True),
                 st.text(alphabet="ab.@<> \t\"é\r\n\x00[]:", max_size=30)))
def test_parse_address_cache_is_invisible(text):
    from mxq.workers import address as A
    try:
        want = A._parse(text)
    except InvalidInput as e:
        for _ in range(2):                       # refused each time, with the same reason
            with pytest.raises(InvalidInput) as got:
                A.parse_address(text)
            assert got.value.reason == e.reason
        return
    assert A.parse_address(text) == want
    assert A.parse_address(text) is A.parse_address(text)       # the second from the cache


def test_domain_cache_keeps_the_reason_naming_the_address():
    from mxq.workers import address as A
    for text in ("a@bad..example", "b@bad..example", "c@-x.example"):
        for _ in range(2):
            with pytest.raises(InvalidInput) as got:
                A.parse_address(text)
            assert repr(text) in got.value.reason or text in got.value.reason
    assert A.parse_address("x@Bücher.Example").ascii_domain == "xn--bcher-kva.example"
    assert A.parse_address("y@Bücher.Example").domain == "bücher.example"
    assert A.normalize_domain("Bücher.Example") == "xn--bcher-kva.example"

"""Turning a message (.eml file, ``EmailMessage``, bytes or text) into an ``Envelope``.

``prepare()`` is mxq's submission service (RFC 6409): it validates
everything before anything is sent, and refuses bad input with an
``InvalidMessage`` or ``InvalidAddress`` (both ``InvalidInput``) whose
``reason`` says what is wrong.

Content forms:

- ``email.message.EmailMessage`` / ``Message``: serialized with CRLF line
  endings (``SMTPUTF8`` policy when an address header holds a non-ASCII
  address, so the address survives; otherwise RFC 2047 encoding).
- ``bytes``: the message as it would be sent (any line endings).
- ``str``: message *text* (encoded as UTF-8), never a file name: a one-line
  ``"/etc/passwd"`` is refused as a malformed message, not read.
- an opened file (binary or text mode; anything with ``read()``): read here,
  at most ``max_size`` octets (one more and it is refused as too large).
- ``os.PathLike`` (``pathlib.Path``): a file.  Only the header block is read
  into memory; the body is scanned once in chunks (size, 8-bit data, NUL,
  line length) and streamed from the file at every delivery attempt, so a
  20 MB file is never held in memory whole.

What ``prepare()`` does to the content (and nothing else):

- line endings become CRLF (lone CR or LF, as ``smtplib`` does);
- ``Bcc:`` and ``Resent-Bcc:`` fields are removed, so blind recipients are
  never disclosed to anyone;
- ``Date:`` and ``Message-ID:`` are appended when missing (RFC 6409 section
  8.2 and 8.3: a submission service may add them, and mail without them is
  often scored as spam);
- a leading mbox ``From `` separator line is dropped.

What it refuses (``InvalidMessage``): a header block that does not parse
(a line that is neither ``Name: value`` nor a continuation), a lone CR in
the header block, a header value that would inject a line break (an
``EmailMessage`` whose serialization yields other fields than it holds),
8-bit header data that is not UTF-8, NUL anywhere, any line longer than
998 octets (RFC 5322 section 2.1.1; mxq refuses rather than folds, because
folding the body would change the message: encode long lines with
quoted-printable or base64), a header block over ``MAX_HEADER_SIZE``, a
message over ``max_size`` (default ``DEFAULT_MAX_MESSAGE_SIZE``, or
``MXQ_MAX_MESSAGE_SIZE``), and a message without recipients or sender.

Envelope defaults: recipients are the addresses in ``To``, ``Cc`` and ``Bcc``
(deduplicated, in order); the sender is the first address of ``Sender``,
else of ``From``.  Explicit ``sender``/``recipients`` override them;
``""`` or ``"<>"`` is the null sender.  Every address goes through
``mxq.workers.address.parse_address`` (so no CR, LF or control character can reach
the wire).
"""

from __future__ import annotations

import email.generator
import email.message
import email.policy
import email.utils
import io
import os
import re
import time
from email._policybase import Compat32
from typing import Iterable, Iterator, NamedTuple

from mxq import settings as registry

from .address import Address, parse_address, parse_sender
from .envelope import DSN, Envelope, Recipient
from .errors import InvalidAddress, InvalidInput, InvalidMessage

#: Default largest message mxq accepts, in octets (Gmail's and Postfix-like limits are 25-35 MB).
DEFAULT_MAX_MESSAGE_SIZE = 35 * 1024 * 1024
#: Largest header block read into memory, in octets.
MAX_HEADER_SIZE = 1024 * 1024
#: RFC 5322 section 2.1.1: lines are at most 998 characters, excluding the CRLF.
MAX_LINE_LENGTH = 998
#: Chunk size for scanning and streaming file content.
CHUNK_SIZE = 64 * 1024

_ADDRESS_HEADERS = ("from", "sender", "reply-to", "to", "cc", "bcc")
_RECIPIENT_HEADERS = ("to", "cc", "bcc")
_STRIPPED_HEADERS = ("bcc", "resent-bcc")
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)", re.S)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LONE_CR = re.compile(rb"\r(?!\n)")
# A header block of one-line fields, each ended by LF (what email's generators write with "\n").
_LF_FIELDS = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\n]*\n)*")
_EOL = re.compile(rb"\r\n|\n|\r")
# A header value compat32 writes as it is when it fits on the line: printable ASCII, blanks.
_PLAIN_VALUE = re.compile(r"[\x20-\x7e\t]*")


def max_message_size_from_env(env=None) -> int:
    """``MXQ_MAX_MESSAGE_SIZE`` (octets, ``mxq.settings``) or ``DEFAULT_MAX_MESSAGE_SIZE``; ValueError when malformed."""
    return registry.value("MXQ_MAX_MESSAGE_SIZE", env)


def normalize_eols(data: bytes) -> bytes:
    """Every CRLF, lone LF and lone CR as CRLF (what ``smtplib`` sends)."""
    # The two common cases in C, without the regular expression: already CRLF throughout, or
    # LF only (what Python's email package writes by default).
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _EOL.sub(b"\r\n", data)


class _Field(NamedTuple):
    name: str          # as written
    raw: bytes         # the whole field, CRLF line endings, including continuation lines
    value: str         # unfolded, decoded value
    key: str           # name in lower case


class FileContent:
    """Re-iterable message content: a prepared header block, then a file's body streamed in chunks.

    Every ``iter()`` starts again at the first byte (so the message can go to
    several exchanges), reads the file ``CHUNK_SIZE`` octets at a time and
    yields the body with CRLF line endings.  ``size`` is the number of octets
    it yields.  The file must not change between ``prepare()`` and delivery.
    """

    def __init__(self, header: bytes, path: os.PathLike, body_offset: int, size: int):
        self.header = header
        self.path = os.fspath(path)
        self.body_offset = body_offset
        self.size = size

    def __iter__(self) -> Iterator[bytes]:
        yield self.header
        try:
            f = open(self.path, "rb")
        except OSError as e:   # the file went away after prepare(): bad input, not a network error
            raise InvalidMessage(f"cannot read {self.path!r}: {e.strerror or e}") from None
        with f:
            f.seek(self.body_offset)
            yield from _normalized_chunks(f)

    def __bytes__(self) -> bytes:
        """The whole content in memory (for small messages and tests only)."""
        return b"".join(self)

    def __repr__(self) -> str:
        return f"FileContent({self.path!r}, size={self.size})"


def _normalized_chunks(f) -> Iterator[bytes]:
    """Read ``f`` in chunks and yield them with CRLF line endings, minding CRs split across chunks."""
    carry = b""
    while True:
        chunk = f.read(CHUNK_SIZE)
        if not chunk:
            if carry:
                yield normalize_eols(carry)
            return
        data = carry + chunk
        # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        else:
            carry = b""
        if data:
            yield normalize_eols(data)


class _BodyScan:
    """What one pass over the body finds: size after EOL normalization, 8-bit, NUL, longest line."""

    def __init__(self):
        self.size = 0
        self.eightbit = False
        self.line = 0          # length of the line in progress
        self.line_no = 1
        self.long_line = None  # number of the first line over MAX_LINE_LENGTH

    def feed(self, normalized: bytes) -> None:
        if b"\0" in normalized:
            raise InvalidMessage("message body contains a NUL byte")
        self.size += len(normalized)
        if not self.eightbit and not normalized.isascii():
            self.eightbit = True
        if self.long_line is not None:
            return
        # Chunks never split a CRLF (_normalized_chunks keeps a trailing CR back), and no other CR
        # or LF is left, so lines are the parts between CRLFs; the first continues the line in progress.
        parts = normalized.split(b"\r\n")
        self.line += len(parts[0])
        if self.line > MAX_LINE_LENGTH:
            self.long_line = self.line_no
            return
        if len(parts) > 1:
            if max(map(len, parts)) > MAX_LINE_LENGTH:
                self.long_line = self.line_no + next(k for k, part in enumerate(parts)
                                                     if k and len(part) > MAX_LINE_LENGTH)
                return
            self.line_no += len(parts) - 1
            self.line = len(parts[-1])


def prepare(content, sender: str | None = None, recipients: Iterable[str | Recipient] | None = None,
            dsn: DSN | None = None, notify: Iterable[str] | None = None,
            max_size: int | None = None) -> Envelope:
    """Validate a message and build its ``Envelope``; raise ``InvalidInput`` (with ``.reason``) on bad input.

    ``content``: ``EmailMessage``/``Message``, ``bytes``, ``str`` (message text,
    never a file name), an opened file (read now) or ``os.PathLike`` (a file).  ``sender``/``recipients`` override the
    header-derived defaults.  ``notify`` (e.g. ``("SUCCESS", "FAILURE")``)
    is applied to every recipient given as a string, with ``ORCPT`` the
    address as given; ``dsn`` carries RET and ENVID.  ``max_size`` defaults
    to ``DEFAULT_MAX_MESSAGE_SIZE``.
    """
    return prepare_with_addresses(content, sender, recipients, dsn, notify, max_size)[0]


def prepare_with_addresses(content, sender: str | None = None,
                           recipients: Iterable[str | Recipient] | None = None, dsn: DSN | None = None,
                           notify: Iterable[str] | None = None,
                           max_size: int | None = None) -> tuple[Envelope, list[Address]]:
    """``prepare()``, also returning each envelope recipient's parsed ``Address``, in order.

    Every address is parsed once; a caller that needs more of an address
    than its text (the producer groups recipients by ``ascii_domain``) takes
    it from here instead of parsing it again.
    """
    limit = DEFAULT_MAX_MESSAGE_SIZE if max_size is None else max_size
    notify_t = tuple(notify) if notify is not None else None
    if notify_t is not None:
        try:
            Recipient("x@x.test", notify=notify_t)
        except ValueError as e:
            raise InvalidMessage(str(e)) from None

    path = None
    if isinstance(content, os.PathLike):
        path = content
        header_raw, body_offset, total = _read_file_header(path, limit)
        body = None
    else:
        data = _read_file(content, limit) if _is_file(content) else _content_bytes(content)
        if len(data) > limit:
            raise InvalidMessage(f"message is {len(data)} octets, larger than the limit of {limit}")
        header_raw, body_offset = _split(data)
        body = data[body_offset:]

    fields = _parse_header_block(header_raw)
    if isinstance(content, email.message.Message):
        _check_no_injection(content, fields)

    # Envelope addresses, each parsed once.
    env_sender, sender_addr = _envelope_sender(sender, fields)
    rcpts, rcpt_addrs = _envelope_recipients(recipients, fields, notify_t, dsn)

    # Content: header block without Bcc, with Date and Message-ID, then the body.
    kept = [f for f in fields if f.key not in _STRIPPED_HEADERS]
    keys = {f.key for f in kept}
    added = []
    if "date" not in keys:
        added.append(b"Date: " + email.utils.formatdate(time.time(), localtime=True).encode() + b"\r\n")
    if "message-id" not in keys:
        added.append(b"Message-ID: " + _make_msgid(env_sender, fields).encode() + b"\r\n")
    header = b"".join(f.raw for f in kept) + b"".join(added) + b"\r\n"
    header_has_utf8 = not header.isascii()

    scan = _BodyScan()
    if path is None:
        body = normalize_eols(body)
        scan.feed(body)
        final: object = header + body
    else:
        with open(path, "rb") as f:
            f.seek(body_offset)
            for chunk in _normalized_chunks(f):
                scan.feed(chunk)
                if len(header) + scan.size > limit:
                    raise InvalidMessage(f"message {os.fspath(path)!r} is larger than the limit of {limit} octets")
        final = FileContent(header, path, body_offset, len(header) + scan.size)
    if scan.long_line is not None:
        raise InvalidMessage(f"body line {scan.long_line} is longer than {MAX_LINE_LENGTH} octets "
                             "(RFC 5322 2.1.1); encode it with quoted-printable or base64")
    size = len(header) + scan.size
    if size > limit:
        raise InvalidMessage(f"message is {size} octets, larger than the limit of {limit}")

    smtputf8 = (header_has_utf8 or (sender_addr is not None and sender_addr.needs_smtputf8)
                or any(a.needs_smtputf8 for a in rcpt_addrs))
    return Envelope(sender=env_sender, recipients=rcpts, content=final, dsn=dsn,
                    eightbit=header_has_utf8 or scan.eightbit, smtputf8=smtputf8, size=size), rcpt_addrs


# -- content into bytes ------------------------------------------------------------------------------

def _is_file(content) -> bool:
    """An opened file (or any reader): not bytes, str or a message, and has ``read()``."""
    return (not isinstance(content, (bytes, bytearray, memoryview, str, email.message.Message))
            and callable(getattr(content, "read", None)))


def _read_file(f, limit: int) -> bytes:
    """At most ``limit + 1`` octets of an opened file (one more than allowed tells "too large")."""
    try:
        data = f.read(limit + 1)
    except (OSError, ValueError) as e:      # closed, not readable, a decoding error in text mode
        raise InvalidMessage(f"cannot read the message file: {e}") from None
    if isinstance(data, str):
        return _content_bytes(data)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidMessage(f"read() of the message file gave a {type(data).__name__}, not bytes or str")
    return bytes(data)


def _content_bytes(content) -> bytes:
    if isinstance(content, (bytes, bytearray, memoryview)):
        return bytes(content)
    if isinstance(content, str):
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError as e:   # lone surrogates
            raise InvalidMessage(f"message text is not valid Unicode: {e.reason}") from None
    if isinstance(content, email.message.Message):
        return _serialize(content)
    raise InvalidMessage(f"cannot send a {type(content).__name__}: give an EmailMessage, bytes, str (the "
                         "message text), a pathlib.Path or an opened file")


class _Compat32Generator(email.generator.BytesGenerator):
    """``BytesGenerator`` that writes a compat32 header field directly when folding would leave it as it is.

    Under the compat32 policy (``email.message.Message``, Django's
    ``EmailMessage.message()``) every field goes through
    ``email.header.Header(value).encode()``, most of the cost of flattening a
    small message.  A ``str`` value of printable ASCII and blanks (no CR, LF or
    other control character) whose line fits in ``max_line_length`` comes out
    of it unchanged, so it is written as ``name: value`` plus the line
    separator; anything else (long, non-ASCII, ``Header`` objects, another
    policy) goes through the policy as before.  The output is the same bytes
    (``tests/test_message.py`` checks the fast path against ``fold_binary``).
    """

    def _write_headers(self, msg):
        policy = self.policy
        maxlen = getattr(policy, "max_line_length", None)
        if (not isinstance(policy, Compat32) or type(policy).fold_binary is not Compat32.fold_binary
                or not isinstance(maxlen, int) or maxlen <= 0):
            return super()._write_headers(msg)
        self._fp.write(_compat32_fields(msg.raw_items(), policy, maxlen, self._NL))
        self.write(self._NL)

    def _write_lines(self, lines):
        # Generator._write_lines writes (and encodes) each line and each separator on its own;
        # the same strings joined first are the same bytes, in one write.
        if not lines:
            return
        parts = email.generator.NLCRE.split(lines)
        if len(parts) > 1:
            self.write(self._NL.join(parts[:-1]) + self._NL)
        if parts[-1]:
            self.write(parts[-1])


def _compat32_fields(items, policy, maxlen: int, nl: str) -> bytes:
    """Header fields as compat32 ``policy.fold_binary`` writes them, the plain short ones directly."""
    out = []
    for name, value in items:
        if (type(value) is str and len(name) + 2 + len(value) <= maxlen and name.isascii()
                and _PLAIN_VALUE.fullmatch(value)):
            out.append(f"{name}: {value}{nl}".encode("ascii"))
        else:
            out.append(policy.fold_binary(name, value))
    return b"".join(out)


_COMPAT32_BY_LINESEP: dict[str, Compat32] = {}


def compat32_header_block(items: Iterable[tuple[str, object]], linesep: str = "\n") -> bytes:
    """The header block (fields, then the empty line) a compat32 message holding ``items`` flattens to.

    The same bytes as ``flatten(msg, linesep)`` writes before the body for an
    ``email.message.Message`` (policy ``compat32``) whose ``raw_items()`` are
    ``items``: each field folded by ``compat32.fold_binary``, plain short ones
    written as they are (``_Compat32Generator``).
    """
    policy = _COMPAT32_BY_LINESEP.get(linesep)
    if policy is None:
        policy = _COMPAT32_BY_LINESEP[linesep] = email.policy.compat32.clone(linesep=linesep)
    return _compat32_fields(items, policy, policy.max_line_length, linesep) + linesep.encode("ascii")


def flatten(msg: email.message.Message, linesep: str | None = None) -> bytes:
    """``msg.as_bytes()`` (no "From " mangling, the policy's line separator unless ``linesep``), faster.

    The same bytes as ``email.generator.BytesGenerator(fp, mangle_from_=False).flatten(msg,
    linesep=linesep)``, with compat32 header fields that need no folding written
    directly (``_Compat32Generator``).
    """
    buf = io.BytesIO()
    _Compat32Generator(buf, mangle_from_=False).flatten(msg, linesep=linesep)
    return buf.getvalue()


def _serialize(msg: email.message.Message) -> bytes:
    """The message as bytes with CRLF line endings; UTF-8 headers only when an address needs them."""
    utf8 = False
    try:
        for key, value in msg.items():
            if key.lower() in _ADDRESS_HEADERS and any(not a.isascii() for _, a in email.utils.getaddresses([str(value)])):
                utf8 = True
        base = msg.policy if isinstance(msg.policy, email.policy.EmailPolicy) else None
        if base is not None:
            policy = base.clone(linesep="\r\n", utf8=utf8, max_line_length=78)
        else:
            policy = msg.policy.clone(linesep="\r\n")
        buf = io.BytesIO()
        _Compat32Generator(buf, mangle_from_=False, policy=policy).flatten(msg)
        return buf.getvalue()
    except InvalidInput:
        raise
    except Exception as e:  # the email package raises many types on bad header values
        raise InvalidMessage(f"cannot serialize the message: {e}") from None


def _check_no_injection(msg: email.message.Message, fields: list[_Field]) -> None:
    """The serialized header block must hold exactly the message's fields: else a value injected a line."""
    want = [k.lower() for k in msg.keys()]
    got = [f.key for f in fields]
    if want != got:
        extra = [g for g in got if g not in want] or got
        raise InvalidMessage(f"a header value contains a line break (header injection): serialized fields {extra!r}")


# -- header block --------------------------------------------------------------------------------------

def _split(data: bytes) -> tuple[bytes, int]:
    """Split at the first empty line: (header block, offset of the body)."""
    if data.startswith(b"\r\n"):
        return b"", 2
    if data.startswith(b"\n"):
        return b"", 1
    m = _HEADER_END.search(data)
    if m is None:
        return data, len(data)
    return data[:m.start()] + b"\n", m.end()


def _read_file_header(path, limit: int) -> tuple[bytes, int, int]:
    """Read a file's header block only (up to ``MAX_HEADER_SIZE``): (header block, body offset, file size)."""
    try:
        total = os.stat(path).st_size
        if total > limit:
            raise InvalidMessage(f"message file {os.fspath(path)!r} is {total} octets, larger than the limit of {limit}")
        with open(path, "rb") as f:
            head = b""
            while len(head) <= MAX_HEADER_SIZE:
                chunk = f.read(CHUNK_SIZE)
                head += chunk
                if not chunk or _HEADER_END.search(head) or head.startswith((b"\n", b"\r\n")):
                    break
    except OSError as e:
        raise InvalidMessage(f"cannot read {os.fspath(path)!r}: {e.strerror or e}") from None
    header_raw, offset = _split(head)
    if offset == len(head) and len(head) < total:
        raise InvalidMessage(f"header block larger than {MAX_HEADER_SIZE} octets")
    return header_raw, offset, total


def _parse_header_block(raw: bytes) -> list[_Field]:
    """Parse and validate a header block (the bytes before the empty line)."""
    if len(raw) > MAX_HEADER_SIZE:
        raise InvalidMessage(f"header block larger than {MAX_HEADER_SIZE} octets")
    if b"\0" in raw:
        raise InvalidMessage("header block contains a NUL byte")
    if b"\r" not in raw:
        if not raw.startswith(b"From ") and _LF_FIELDS.fullmatch(raw):
            fields = _lf_fields(raw)
            if fields is not None:
                return fields
    elif _LONE_CR.search(raw):
        raise InvalidMessage("header block contains a CR that does not end a line")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if lines and lines[0].startswith(b"From "):   # mbox separator, not a header
        lines = lines[1:]
    # Fast path: one field per line (no continuation), every line valid.  Anything else -- a
    # continuation line, or a line to refuse with its number -- is parsed line by line below.
    out = []
    fullmatch = _FIELD.fullmatch
    for line in lines:
        m = fullmatch(line)                      # a continuation line never matches (no blank in a name)
        if m is None or len(line) > MAX_LINE_LENGTH:
            return _parse_header_lines(lines)
        name, first = m.groups()
        try:
            value = first.decode("utf-8")
        except UnicodeDecodeError:
            return _parse_header_lines(lines)
        name = name.decode("ascii")
        out.append(_Field(name, line + b"\r\n", value.strip(" \t"), name.lower()))
    return out


def _lf_fields(raw: bytes) -> list[_Field] | None:
    """The fields of a header block of LF-ended one-line fields (``_LF_FIELDS``); None for anything
    to look at line by line (a line over ``MAX_LINE_LENGTH``, 8-bit data that is not UTF-8).

    What the per-line fast path of ``_parse_header_block`` gives, with one decode for the block
    (UTF-8 splits at ASCII ``LF`` and ``:`` into valid pieces) and no regular expression per line.
    """
    # Each field with CRLF, from one replace and one split (raw holds no CR: bytes.splitlines
    # breaks only at CR and LF, so at the LFs here; a line counts its CRLF: MAX_LINE_LENGTH + 2).
    lines = raw.replace(b"\n", b"\r\n").splitlines(keepends=True)
    if lines and max(map(len, lines)) > MAX_LINE_LENGTH + 2:
        return None
    try:
        texts = raw.decode("utf-8").split("\n")   # one more piece than lines (the empty last one)
    except UnicodeDecodeError:
        return None
    field = tuple.__new__                        # _Field's own __new__ without its Python frame
    out = []
    for line, text in zip(lines, texts):
        name, _, value = text.partition(":")     # a name holds no ':' (_FIELD), the value may
        name = name.rstrip(" \t")
        out.append(field(_Field, (name, line, value.strip(" \t"), name.lower())))
    return out


def _parse_header_lines(lines: list[bytes]) -> list[_Field]:
    """``_parse_header_block``'s general case: fields with continuation lines; the reason a line is refused."""
    fields: list[list] = []
    for n, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_LENGTH:
            raise InvalidMessage(f"header line {n} is longer than {MAX_LINE_LENGTH} octets (RFC 5322 2.1.1)")
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise InvalidMessage("header block starts with a continuation line")
            if not line.strip(b" \t"):
                raise InvalidMessage(f"header line {n} is a continuation with nothing on it")
            fields[-1][1].append(line)
            continue
        m = _FIELD.fullmatch(line)
        if not m:
            raise InvalidMessage(f"malformed header line {n}: {line[:60]!r}")
        fields.append([m.group(1).decode("ascii"), [line], m.group(2)])
    out = []
    for name, raw_lines, first in fields:
        value_bytes = first + b"".join(raw_lines[1:])
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage(f"header {name} contains 8-bit data that is not UTF-8") from None
        out.append(_Field(name, b"".join(line + b"\r\n" for line in raw_lines), value.strip(" \t"), name.lower()))
    return out


# -- envelope addresses ------------------------------------------------------------------------------

def _header_addresses(fields: list[_Field], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(header name, address) pairs from the named fields, in order; empty entries (groups) skipped."""
    out = []
    for f in fields:
        if f.key in names:
            for _, addr in email.utils.getaddresses([f.value]):
                if addr:
                    out.append((f.name, addr))
    return out


def _envelope_sender(sender: str | None, fields: list[_Field]) -> tuple[str, Address | None]:
    """The envelope sender's text ("" for the null sender) and its parsed ``Address`` (None for null)."""
    if sender is not None:
        a = parse_sender(sender)
        return ("", None) if a is None else (str(a), a)
    for name in ("sender", "from"):
        found = _header_addresses(fields, (name,))
        if found:
            header, text = found[0]
            try:
                a = parse_address(text)
                return str(a), a
            except InvalidAddress as e:
                raise InvalidAddress(f"sender from the {header} header: {e.reason}") from None
    raise InvalidMessage("no sender: the message has no From or Sender header; give the sender explicitly")


def _envelope_recipients(recipients, fields, notify, dsn) -> tuple[list[Recipient], list[Address]]:
    """The envelope recipients (deduplicated, in order) and their parsed addresses."""
    want_dsn = notify is not None or dsn is not None
    given: list[tuple[str | None, str | Recipient]]
    if recipients is not None:
        if isinstance(recipients, (str, Recipient)):
            recipients = [recipients]
        given = [(None, r) for r in recipients]
    else:
        given = _header_addresses(fields, _RECIPIENT_HEADERS)
    out: list[Recipient] = []
    parsed: list[Address] = []
    seen = set()
    for header, r in given:
        text = r.address if isinstance(r, Recipient) else r
        try:
            addr: Address = parse_address(text)
        except InvalidAddress as e:
            where = f"recipient from the {header} header" if header else "recipient"
            raise InvalidAddress(f"{where}: {e.reason}") from None
        key = (addr.local, addr.ascii_domain)
        if key in seen:
            continue
        seen.add(key)
        parsed.append(addr)
        if isinstance(r, Recipient):
            if r.orcpt is not None:
                try:
                    parse_address(r.orcpt)
                except InvalidAddress as e:
                    raise InvalidAddress(f"ORCPT of {text!r}: {e.reason}") from None
            out.append(Recipient(str(addr), notify=r.notify, orcpt=r.orcpt))
        else:
            stripped = text.strip(" \t")
            if stripped.startswith("<") and stripped.endswith(">"):
                stripped = stripped[1:-1]
            out.append(Recipient(str(addr), notify=notify, orcpt=stripped if want_dsn else None))
    if not out:
        raise InvalidMessage("no recipients: the message has no To, Cc or Bcc address; give the recipients explicitly")
    return out, parsed


def _make_msgid(sender: str, fields: list[_Field]) -> str:
    """A Message-ID on the sender's (else the From) domain, never looking up the host name."""
    domain = None
    candidates = ([sender] if sender else []) + [a for _, a in _header_addresses(fields, ("from",))]
    for text in candidates:
        try:
            domain = parse_address(text).ascii_domain
            break
        except InvalidAddress:
            continue
    # make_msgid without a domain calls socket.getfqdn(), a DNS lookup mxq must never make.
    return email.utils.make_msgid(domain=domain or "localhost")

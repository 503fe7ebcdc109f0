"""Django's bytes for a plain ``EmailMessage`` without building its MIME object (issue 8: producer speed).

``EmailMessage.message()`` builds a ``SafeMIMEText`` (``set_payload`` ->
``set_charset`` -> ``set_param`` re-parses its own Content-Type; every field
goes through ``forbid_multi_line_headers``), then the generator flattens it:
most of the ~100 us a 2 KB message cost the producer.  For the common shape
-- one text body, no attachments, no alternatives, UTF-8 -- ``render`` writes
the same bytes directly: the same fields in the same order with the same
values, folded by the same compat32 policy, the same body.  Anything else
(attachments, alternatives, another charset, a body with a line over 998
octets that Django quoted-printable-encodes, a subclass overriding how the
message is built, To/Cc/Reply-To/From or MIME fields in ``headers``, a Django
outside 4.2-5.2) returns None and takes Django's own ``message()``.

Field values take Django's own ``forbid_multi_line_headers`` (encoded words,
address sanitising, ``BadHeaderError``) unless they are plain ASCII, which it
returns unchanged (a Subject only when ``Header(subject).encode()`` is the
subject itself: printable words separated by single spaces, at most 76
characters).  Date and Message-ID, when not given, come from the same
functions ``message()`` calls (``formatdate``, ``make_msgid(domain=DNS_NAME)``
of ``django.core.mail.message``).

``tests/test_fast_paths.py`` compares ``render`` with ``message().as_bytes()``
on tricky messages (non-ASCII names and subjects, long headers, Cc, Bcc,
Reply-To, empty and non-ASCII bodies, CR/LF mixes) and on generated ones.
"""

from __future__ import annotations

import re

import django
from django.conf import settings
from django.core.mail import message as _dj

from mxq.workers.message import compat32_header_block

__all__ = ["render"]

_EmailMessage = _dj.EmailMessage
_Alternatives = getattr(_dj, "EmailMultiAlternatives", None)
#: ``_create_message`` of the classes whose message is its ``SafeMIMEText`` when nothing is attached.
_PLAIN_CREATE = {_EmailMessage._create_message,
                 *((_Alternatives._create_message,) if _Alternatives is not None else ())}
#: The Djangos whose ``message()`` (and MIME classes) this reproduces: 4.2 LTS to 5.2 LTS (6.0 builds
#: an ``email.message.EmailMessage`` with the modern policy instead).
SUPPORTED = (4, 2) <= django.VERSION[:2] < (6, 0) and hasattr(_dj, "SafeMIMEText")
#: Names in ``headers`` that ``message()`` treats specially (and differently across versions), or
#: that would duplicate the MIME fields: such a message takes ``message()``.
_SPECIAL = frozenset({"from", "to", "cc", "reply-to", "content-type", "mime-version",
                      "content-transfer-encoding"})
_SUBTYPE = re.compile(r"[a-z0-9][a-z0-9.+-]*")
# A subject email.header.Header(subject).encode() gives back unchanged (tests/test_fast_paths.py).
_SIMPLE_SUBJECT = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
_EOL = re.compile(r"\r\n|\r|\n")          # email.generator.NLCRE
_LIMIT = _dj.RFC5322_EMAIL_LINE_LENGTH_LIMIT


def render(m) -> bytes | None:
    """``m.message().as_bytes()`` (LF line ends) for a plain Django ``EmailMessage``; None for any other.

    Raises what ``message()`` raises for the same message (``BadHeaderError``
    and the ``ValueError`` of a bad address from ``forbid_multi_line_headers``,
    ``UnicodeEncodeError`` for a body with lone surrogates).
    """
    cls = type(m)
    if (not SUPPORTED or cls.message is not _EmailMessage.message or cls._create_message not in _PLAIN_CREATE
            or m.attachments or getattr(m, "alternatives", None)):
        return None
    encoding = m.encoding or settings.DEFAULT_CHARSET
    body = m.body
    subtype = m.content_subtype
    extra = m.extra_headers
    if (encoding != "utf-8" or type(body) is not str or type(subtype) is not str
            or not _SUBTYPE.fullmatch(subtype) or not isinstance(extra, dict)):
        return None
    for name in extra:
        if type(name) is not str or name.lower() in _SPECIAL:
            return None
    data = body.encode("utf-8")
    # SafeMIMEText.set_payload: a line over 998 octets (str.splitlines' lines) -> quoted-printable.
    # (Its lines are parts of the LF-separated ones: when none of those is longer, neither is any of its.)
    if (len(data) > _LIMIT and max(map(len, data.split(b"\n"))) > _LIMIT
            and any(len(line.encode(errors="surrogateescape")) > _LIMIT for line in body.splitlines())):
        return None

    fields = [("Content-Type", f'text/{subtype}; charset="utf-8"'), ("MIME-Version", "1.0"),
              ("Content-Transfer-Encoding", "7bit" if data.isascii() else "8bit")]

    def add(name, value):
        value = str(value)
        if not value.isascii() or "\n" in value or "\r" in value or (
                name.lower() == "subject" and not (len(value) <= 76 and _SIMPLE_SUBJECT.fullmatch(value))):
            name, value = _dj.forbid_multi_line_headers(name, value, encoding)
        fields.append((name, value))

    add("Subject", m.subject)
    add("From", m.from_email)
    for name, values in (("To", m.to), ("Cc", m.cc), ("Reply-To", m.reply_to)):
        if values:
            add(name, ", ".join(str(v) for v in values))
    lower = {name.lower() for name in extra}
    if "date" not in lower:
        add("Date", _dj.formatdate(localtime=settings.EMAIL_USE_LOCALTIME))
    if "message-id" not in lower:
        add("Message-ID", _dj.make_msgid(domain=_dj.DNS_NAME))
    for name, value in extra.items():
        add(name, value)
    if "\r" in body:
        data = _EOL.sub("\n", body).encode("utf-8")
    return compat32_header_block(fields, "\n") + data

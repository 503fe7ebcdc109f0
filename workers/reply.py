"""The SMTP reply type.

A ``Reply`` is what a server (or, for local failures such as a refused
connection, mxq itself) said about a command: the three-digit code, the
RFC 3463 enhanced status code when there is one, and the text.  Like KumoMTA's
``Response`` it answers ``is_transient()`` and ``is_permanent()`` so callers
never compare code ranges themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
#: What ``printable`` replaces: C0 controls (ESC included), DEL, C1 controls, the line and
#: paragraph separators, and the bidirectional overrides and isolates (which reorder what a
#: terminal or a mail reader shows).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNPRINTABLE_KEEP_NL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` safe to store, log, print or put in a report: every control character replaced.

    Tabs and line breaks become spaces (with ``keep_newlines``, ``\\n`` stays: the line
    separator of a multi-line reply); every other control character -- ESC, NUL, DEL,
    the C1 range, U+2028/U+2029, bidirectional overrides -- becomes ``?`` (as Postfix's
    ``printable()``).  Valid UTF-8 text stays as it is.
    """
    if text.isprintable():
        return text
    text = text.replace("\r\n", "\n").replace("\t", " ").replace("\r", " ")
    if not keep_newlines:
        text = text.replace("\n", " ")
    return (_UNPRINTABLE_KEEP_NL if keep_newlines else _UNPRINTABLE).sub("?", text)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: ``code`` (None for a local failure), ``enhanced`` and ``text``.

    ``text`` never includes the enhanced status code; multi-line replies are
    joined with newlines.  It holds no other control character: whatever a
    server sent is made ``printable`` here, once, so no ESC or NUL from a
    remote reply reaches a record, a log line, a report or a terminal.
    """

    code: int | None
    text: str = ""
    enhanced: str | None = None

    def __post_init__(self):
        if not self.text.isprintable():
            object.__setattr__(self, "text", printable(self.text, keep_newlines=True))

    @classmethod
    def parse(cls, code: int, message: bytes | str) -> "Reply":
        """Build a reply from smtplib's ``(code, message)`` pair.

        The enhanced status code is taken from the start of the text when its
        class digit agrees with the reply code (RFC 3463 section 2).
        """
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        lines = message.splitlines() or [""]
        enhanced = None
        m = _ENHANCED.match(lines[0])
        if m and str(code)[:1] == m.group(1):
            enhanced = "%s.%s.%s" % m.groups()
            lines = [_ENHANCED.sub("", line, count=1) if _ENHANCED.match(line) else line for line in lines]
        return cls(code=code, text="\n".join(lines).strip(), enhanced=enhanced)

    @classmethod
    def local(cls, enhanced: str, text: str) -> "Reply":
        """A reply made up by mxq for a failure no server answered (DNS, connect, timeout)."""
        return cls(code=None, text=text, enhanced=enhanced)

    def is_positive(self) -> bool:
        """2xx or 3xx."""
        return self.code is not None and 200 <= self.code < 400

    def is_transient(self) -> bool:
        """4xx, or a local failure whose enhanced code is class 4."""
        if self.code is not None:
            return 400 <= self.code < 500
        return (self.enhanced or "4").startswith("4")

    def is_permanent(self) -> bool:
        """5xx, or a local failure whose enhanced code is class 5."""
        if self.code is not None:
            return self.code >= 500
        return (self.enhanced or "").startswith("5")

    @property
    def dsn(self) -> str:
        """The RFC 3463 status to report: the enhanced code, else one derived from the code."""
        if self.enhanced:
            return self.enhanced
        if self.code is None:
            return "4.0.0"
        return "%d.0.0" % (self.code // 100)

    def __str__(self) -> str:
        parts = [str(self.code)] if self.code is not None else []
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text.replace("\n", " "))
        return " ".join(parts)

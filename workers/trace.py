"""Session observers for people: a swaks-like conversation trace and a progress bar.

``ConversationTrace(out)`` prints every session event it sees as swaks does::

    === Connected to mx1.b.test[127.0.0.2]:25 from 127.0.0.1:40112
    <-  220 mx1.b.test ESMTP
     -> EHLO client.example
    <-  250-mx1.b.test
    <-  250 PIPELINING
     -> STARTTLS
    <-  220 2.0.0 Ready to start TLS
    === TLS started: TLSv1.3, TLS_AES_256_GCM_SHA384 (256 bits), certificate not verified
     ~> EHLO client.example
    <~  250 ...
     ~> AUTH PLAIN ****
    ~>> MAIL FROM:<a@a.example>
    ~>> RCPT TO:<b@b.example>
    ~>> DATA
    <~  250 2.1.0 Ok
    ...
     ~> [message text: 1,234 bytes]
     ~> .
    <~  250 2.0.0 Ok
    *** timed out after 30 s (phase greeting)
    === Connection closed (QUIT)

``->``/``<-`` in clear text, ``~>``/``<~`` inside TLS, ``->>``/``~>>`` for
commands written together in a pipelined group (RFC 2920).  AUTH payloads are masked by the session
itself (``****``); message text is never printed, only its size.

``ProgressBar(out)`` draws ``[#####.....]  45%  9.0 / 20.0 MB`` while a
message's text is written (``DataProgress`` events), redrawn in place on a
terminal, one line per 10 % otherwise, and ends with 100 % once the text is
complete.

Both are plain callables taking an event (``mxq.workers.events``); attach
them with ``SMTPSession(observers=[...])`` or ``deliver(..., observers=[...])``.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

__all__ = ["ConversationTrace", "ProgressBar", "format_size"]


def format_size(n: int | None) -> str:
    """``1.2 MB`` style, for humans."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _where(s) -> str:
    return s.where


class ConversationTrace:
    """Print the SMTP conversation (see the module docstring); thread-safe, one line per write."""

    def __init__(self, out: TextIO | None = None):
        self.out = out if out is not None else sys.stderr
        self._lock = threading.Lock()
        self._text: dict[int, int] = {}     # id(session) -> message text bytes not yet printed

    def _print(self, line: str) -> None:
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def __call__(self, event) -> None:
        kind = event.kind
        s = event.session
        tls = s.tls_active
        if kind == "command":
            key = id(s)
            if event.verb == "." and key in self._text:
                self._print(f" {'~' if tls else '-'}> [message text: {self._text.pop(key):,} bytes]")
            mark = "~" if tls else "-"
            arrow = f"{mark}>>" if event.pipelined else f" {mark}>"
            self._print(f"{arrow} {event.line}")
        elif kind == "reply":
            arrow = "<~ " if tls else "<- "
            lines = event.lines or ("",)
            code = event.reply.code
            for i, text in enumerate(lines):
                sep = "-" if i < len(lines) - 1 else " "
                self._print(f"{arrow} {code}{sep}{text}".rstrip())
        elif kind == "progress":
            if event.done:
                self._text[id(s)] = event.sent
        elif kind == "write":
            self._print(f" {'~' if tls else '-'}> [raw data: {event.size:,} bytes]")
        elif kind == "connected":
            local = f"{event.local[0]}:{event.local[1]}"
            self._print(f"=== Connected to {_where(s)} from {local}")
        elif kind == "tls":
            bits = f" ({event.bits} bits)" if event.bits else ""
            verified = "certificate verified" if event.verified else "certificate not verified"
            self._print(f"=== TLS started: {event.protocol}, {event.cipher}{bits}, {verified}")
        elif kind == "timeout":
            self._print(f"*** timed out after {event.limit:g} s (phase {event.phase})")
        elif kind == "closed":
            self._text.pop(id(s), None)
            self._print(f"=== Connection closed{' (QUIT)' if event.quit else ''}")


class ProgressBar:
    """Draw the progress of each message's text (see the module docstring)."""

    WIDTH = 30

    def __init__(self, out: TextIO | None = None, tty: bool | None = None):
        self.out = out if out is not None else sys.stderr
        if tty is None:
            try:
                tty = self.out.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self._last: dict[int, int] = {}      # id(session) -> last tenth / percent drawn

    def _draw(self, sent: int, total: int | None, end: bool) -> str:
        if total:
            frac = min(1.0, sent / total)
            filled = int(frac * self.WIDTH)
            return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {int(frac * 100):3d}%  "
                    f"{format_size(sent)} / {format_size(total)}")
        return f"[{'?' * self.WIDTH}]  {format_size(sent)}"

    def __call__(self, event) -> None:
        kind = event.kind
        key = id(event.session)
        if kind == "progress":
            total = event.total
            step = int(100 * event.sent / total) if total else event.sent >> 20
            if not self.tty:
                step = step // 10 * 10 if total else step
            if step == self._last.get(key) and not event.done:
                return
            self._last[key] = step
            line = self._draw(event.sent, total, event.done)
            if self.tty:
                self.out.write("\r" + line + ("\n" if event.done else ""))
            else:
                self.out.write(line + "\n")
            self.out.flush()
            if event.done:
                self._last.pop(key, None)
        elif kind == "closed" and key in self._last:
            self._last.pop(key, None)
            if self.tty:
                self.out.write("\n")
                self.out.flush()

"""Postfix-style delivery log lines, one per recipient per attempt.

::

    ABC123: to=<b@b.test>, relay=mx1.b.test[127.0.0.2]:25, delay=0.21, dsn=2.0.0, status=sent (250 2.0.0 Ok)
    to=<b@b.test>, relay=none, delay=1.02, dsn=4.4.1, status=deferred (connect to mx1.b.test[127.0.0.2]:25: Connection refused)
    to=<c@b.test>, relay=mx1.b.test[127.0.0.2]:25, delay=0.3, dsn=5.1.1, status=bounced (host mx1.b.test[127.0.0.2] said: 550 5.1.1 User unknown)

``relay=none`` when no server was talked to (connect failure, DNS failure,
a host skipped because it is marked down).  The status text is the server's
reply for a success, ``host NAME[IP] said: REPLY (in reply to COMMAND
command)`` for a refusal (as Postfix says it: ``RCPT TO``, ``MAIL FROM``,
``DATA``, ``end of DATA``, ``EHLO``...), and mxq's own text for a local
failure.  Everything is on one line: line breaks in a
reply become spaces.
"""

from __future__ import annotations

from .reply import Reply

STATUSES = ("sent", "deferred", "bounced")


def _one_line(text: str) -> str:
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def status_text(reply: Reply, where: tuple[str, str, int] | None, command: str | None = None) -> str:
    """What goes in the parentheses after ``status=``."""
    if reply.code is None:
        return _one_line(reply.text)
    if reply.is_positive() or where is None:
        return _one_line(str(reply))
    name, ip, _ = where
    note = f" (in reply to {command} command)" if command else ""
    return _one_line(f"host {name}[{ip}] said: {reply}{note}")


def format_line(address: str, where: tuple[str, str, int] | None, reply: Reply, status: str, *,
                delay: float, queue_id: str | None = None, command: str | None = None) -> str:
    """One log line; ``where`` is ``(name, ip, port)`` of the server, None for ``relay=none``;
    ``command``: what the reply answered (``RCPT TO``...), said for refusals."""
    relay = "none" if where is None else f"{where[0]}[{where[1]}]:{where[2]}"
    line = (f"to=<{address}>, relay={relay}, delay={delay:.2f}, dsn={reply.dsn}, "
            f"status={status} ({status_text(reply, where, command)})")
    return f"{queue_id}: {line}" if queue_id else line

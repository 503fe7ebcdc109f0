"""The envelope: sender, recipients with their DSN options, and the content source.

``Envelope`` is what callers hand the delivery layer; the session takes its
parts.  Content is anything ``SMTPSession.append_message`` streams: bytes,
str, a path, a binary file object, or an iterable of byte chunks.  A content
that is delivered to more than one exchange must be re-readable (bytes, str
or a path), because every attempt starts again from its first byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Union

DSN_NOTIFY = ("NEVER", "SUCCESS", "FAILURE", "DELAY")

Content = Union[bytes, str, os.PathLike, Iterable[bytes]]


@dataclass(frozen=True)
class DSN:
    """RFC 3461 message options: ``ret`` (FULL or HDRS) and ``envid`` for MAIL FROM."""

    ret: str | None = None
    envid: str | None = None

    def __post_init__(self):
        if self.ret is not None and self.ret.upper() not in ("FULL", "HDRS"):
            raise ValueError(f"RET must be FULL or HDRS, not {self.ret!r}")
        if self.envid is not None and not (0 < len(self.envid) <= 100 and self.envid.isprintable()
                                           and self.envid.isascii()):
            raise ValueError("ENVID must be 1 to 100 printable ASCII characters")


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient with its RFC 3461 options.

    ``notify`` is None (server default) or a tuple of NEVER / SUCCESS, FAILURE,
    DELAY; ``orcpt`` the original recipient address (sent as ``rfc822;...``).
    """

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def __post_init__(self):
        if self.notify is not None:
            n = tuple(v.strip().upper() for v in self.notify)
            if not n or any(v not in DSN_NOTIFY for v in n) or ("NEVER" in n and len(n) > 1):
                raise ValueError(f"NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY, not {self.notify!r}")
            object.__setattr__(self, "notify", n)

    @classmethod
    def of(cls, value: "Recipient | str") -> "Recipient":
        """Wrap a plain address string."""
        return value if isinstance(value, Recipient) else cls(value)


def parse_notify(value: str | None) -> tuple[str, ...] | None:
    """``"SUCCESS,FAILURE"`` into ``("SUCCESS", "FAILURE")``; None or "" into None."""
    if not value:
        return None
    return tuple(v.strip().upper() for v in value.split(",") if v.strip())


@dataclass
class Envelope:
    """One message to deliver: ``sender`` ("" for the null sender), recipients, content, DSN."""

    sender: str
    recipients: list[Recipient]
    content: Content
    dsn: DSN | None = None
    #: True when headers or body carry 8-bit data (8BITMIME wanted).
    eightbit: bool = False
    #: True when an address or header needs SMTPUTF8 (RFC 6531).
    smtputf8: bool = False
    #: size in octets when known (SIZE= on MAIL FROM).
    size: int | None = None
    #: the caller's own id, echoed in log lines (queue id / job id).
    id: str | None = field(default=None)

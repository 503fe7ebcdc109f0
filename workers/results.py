"""Per-recipient outcome records, the contract between the engine and its callers.

The engine produces ``delivered``, ``deferred`` and ``bounced``; the pipeline
adds ``queued`` and ``expired`` (and ``suppressed``) on top of the same record.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from .reply import printable


class State(str, enum.Enum):
    """A recipient's state.  ``is_final`` says whether it can still change."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """Delivered, bounced and expired never change again."""
        return self in (State.DELIVERED, State.BOUNCED, State.EXPIRED)


@dataclass
class RecipientResult:
    """What happened to one recipient at the end of one delivery run.

    ``exchange``/``ip`` name the server that gave the deciding reply (the relay's
    host when ``relay`` is true); ``attempts`` counts the exchanges (and relay)
    tried for this recipient in this run.  ``scope`` says what that server's
    reply applied to (``mxq.workers.errors.Scope``): ``"recipient"`` (its RCPT
    TO, or the final reply of a transaction that carried this recipient
    alone), ``"message"`` (MAIL FROM, DATA, or a final reply shared by several
    recipients), ``"site"`` (the connection: greeting, EHLO, TLS, a drop);
    None when delivered, or when no server's reply decided (DNS, local failures).  ``text`` is one printable line (the
    reply's lines joined with spaces, control characters replaced).
    """

    address: str
    domain: str
    state: State
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    exchange: str | None = None
    ip: str | None = None
    relay: bool = False
    attempts: int = 0
    scope: str | None = None

    def __post_init__(self):
        if self.text and not self.text.isprintable():
            self.text = printable(self.text)

    def to_dict(self) -> dict:
        """JSON-ready form: the keys of ``mxq deliver --json``."""
        d = asdict(self)
        d["state"] = self.state.value
        return d

"""Per-phase SMTP timeouts as one settings structure.

Defaults follow RFC 5321 section 4.5.3.2; the connect timeout, which the RFC
does not set, follows Postfix's ``smtp_connect_timeout`` (30 s).
``MXQ_CONNECT_TIMEOUT`` overrides ``connect``; ``MXQ_COMMAND_TIMEOUT``
overrides every SMTP phase after it; ``MXQ_DNS_TIMEOUT`` overrides ``dns``.

Each value is a deadline for the whole phase, not a limit per read or write:
a server that sends one byte a second, or streams a reply that never ends,
is cut when its phase's time is up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from mxq import settings as registry


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each phase of an SMTP client session (and for its DNS lookups)."""

    connect: float = 30.0      #: TCP connect (and TLS handshake on implicit TLS)
    greeting: float = 300.0    #: 4.5.3.2.1 initial 220 message: 5 minutes
    command: float = 300.0     #: 4.5.3.2.2/3 EHLO, MAIL, RCPT, RSET, AUTH, STARTTLS: 5 minutes
    data_init: float = 120.0   #: 4.5.3.2.4 DATA initiation (354): 2 minutes
    data_block: float = 180.0  #: 4.5.3.2.5 each data block sent: 3 minutes
    data_final: float = 600.0  #: 4.5.3.2.6 reply to the final dot: 10 minutes
    dns: float = 20.0          #: every DNS lookup of one delivery attempt (MX and addresses) together

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Timeouts":
        """Defaults with ``MXQ_CONNECT_TIMEOUT``, ``MXQ_COMMAND_TIMEOUT`` and ``MXQ_DNS_TIMEOUT`` applied (``mxq.settings``)."""
        c = registry.load(env)
        t = replace(cls(), connect=c["MXQ_CONNECT_TIMEOUT"], dns=c["MXQ_DNS_TIMEOUT"])
        s = c["MXQ_COMMAND_TIMEOUT"]
        if s is not None:
            t = replace(t, greeting=s, command=s, data_init=s, data_block=s, data_final=s)
        return t

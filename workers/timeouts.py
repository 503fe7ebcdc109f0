"""Per-phase SMTP timeouts as one settings structure.

Defaults follow RFC 5321 section 4.5.3.2; the connect timeout, which the RFC
does not set, follows Postfix's ``smtp_connect_timeout`` (30 s).
``MXQ_CONNECT_TIMEOUT`` overrides ``connect``; ``MXQ_COMMAND_TIMEOUT``
overrides every other phase.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed for each phase of an SMTP client session."""

    connect: float = 30.0      #: TCP connect (and TLS handshake on implicit TLS)
    greeting: float = 300.0    #: 4.5.3.2.1 initial 220 message: 5 minutes
    command: float = 300.0     #: 4.5.3.2.2/3 EHLO, MAIL, RCPT, RSET, AUTH, STARTTLS: 5 minutes
    data_init: float = 120.0   #: 4.5.3.2.4 DATA initiation (354): 2 minutes
    data_block: float = 180.0  #: 4.5.3.2.5 each data block sent: 3 minutes
    data_final: float = 600.0  #: 4.5.3.2.6 reply to the final dot: 10 minutes

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Timeouts":
        """Defaults with ``MXQ_CONNECT_TIMEOUT`` and ``MXQ_COMMAND_TIMEOUT`` applied."""
        env = os.environ if env is None else env
        t = cls()
        if env.get("MXQ_CONNECT_TIMEOUT"):
            t = replace(t, connect=_seconds(env["MXQ_CONNECT_TIMEOUT"], "MXQ_CONNECT_TIMEOUT"))
        if env.get("MXQ_COMMAND_TIMEOUT"):
            s = _seconds(env["MXQ_COMMAND_TIMEOUT"], "MXQ_COMMAND_TIMEOUT")
            t = replace(t, greeting=s, command=s, data_init=s, data_block=s, data_final=s)
        return t


def _seconds(value: str, name: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None
    if not s > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")
    return s

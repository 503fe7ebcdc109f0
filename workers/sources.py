"""Source addresses: which local address a connection comes from, and the EHLO name that goes with it.

A sender with several IP addresses (or pools of them: transactional mail
from one, bulk mail from another) sets ``MXQ_SOURCE_ADDRESSES``::

    MXQ_SOURCE_ADDRESSES="192.0.2.10=mx1.example.com, 2001:db8::10=mx1.example.com;
                          bulk: 192.0.2.20=bulk1.example.com, 192.0.2.21=bulk2.example.com"

- Each entry is ``IP[=HELO]``: the address to bind before connecting, and the
  name to give in EHLO/HELO from it (receivers check it against the
  address's reverse DNS; without one, ``MXQ_HELO_NAME``).
- IPv4 and IPv6 entries mix freely: a connection to an IPv4 exchange uses an
  IPv4 entry, to an IPv6 exchange an IPv6 one (per family, as Postfix's
  ``smtp_bind_address`` / ``smtp_bind_address6``); a family with no entry
  lets the system choose.
- The first group is the ``default`` pool; the others are named (``NAME:``
  and a blank).  ``deliver_domain(..., source_pool="bulk")`` uses a named
  pool -- the pipeline takes the name from the domain's ``MXQ_SHAPING`` rule
  (``gmail.com=5c,pool=bulk``) -- and falls back to the default pool for a
  family the named pool has no address of.
- Several addresses of one family in a pool are used in turn, one per
  connection (round robin per process), which spreads the connections
  evenly across the addresses without any shared state.

An address the host does not have fails the connection with 4.3.5
(``SMTPBindError``: our configuration, never the exchange's fault; the
recipients are deferred and the exchange is not marked down).
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
from dataclasses import dataclass, field

__all__ = ["SourceAddress", "SourcePools"]


@dataclass(frozen=True)
class SourceAddress:
    """One local address and the EHLO name for it (None: the global ``helo_name``)."""

    ip: str
    helo: str | None = None

    @property
    def version(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.ip).version


@dataclass(frozen=True)
class SourcePools:
    """Named pools of ``SourceAddress``; empty: no binding, the system chooses.

    Built from ``MXQ_SOURCE_ADDRESSES`` (``mxq.settings.parse_source_addresses``
    gives ``((name, ((ip, helo), ...)), ...)``, which the constructor takes).
    """

    pools: tuple = ()
    _turns: dict = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def __post_init__(self):
        pools = tuple((name, tuple(e if isinstance(e, SourceAddress) else SourceAddress(*e) for e in entries))
                      for name, entries in self.pools)
        object.__setattr__(self, "pools", pools)

    @classmethod
    def parse(cls, text: str) -> "SourcePools":
        """Parse ``MXQ_SOURCE_ADDRESSES`` syntax (ConfigError naming the variable when malformed)."""
        from mxq import settings as registry
        return cls(registry.REGISTRY["MXQ_SOURCE_ADDRESSES"].parse(text))

    def __bool__(self) -> bool:
        return bool(self.pools)

    def names(self) -> list[str]:
        """The pool names, ``default`` first when it exists."""
        return [name for name, _ in self.pools]

    def addresses(self, pool: str = "default") -> tuple:
        """The ``SourceAddress`` entries of ``pool`` (empty when there is no such pool)."""
        for name, entries in self.pools:
            if name == pool:
                return entries
        return ()

    def pick(self, version: int, pool: str | None = None) -> SourceAddress | None:
        """The next address of IP ``version`` (4 or 6) in ``pool`` (else in ``default``), or None."""
        for name in ([pool] if pool and pool != "default" else []) + ["default"]:
            candidates = [e for e in self.addresses(name) if e.version == version]
            if candidates:
                key = (name, version)
                with self._lock:
                    turn = self._turns.get(key)
                    if turn is None:
                        turn = self._turns[key] = itertools.count()
                    n = next(turn)
                return candidates[n % len(candidates)]
        return None

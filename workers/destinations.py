"""Destination policy: which addresses the engine may connect to for a recipient's domain.

By default mxq connects only to public unicast addresses.  Whatever DNS says
(an MX or A record pointing at ``127.0.0.1``, ``10.0.0.1`` or
``169.254.169.254``) and whatever an address literal says
(``x@[127.0.0.1]``), it never connects to:

==================  ====================================================================
kind                addresses
==================  ====================================================================
``unspecified``     ``0.0.0.0``, ``::``
``loopback``        ``127.0.0.0/8``, ``::1``
``link-local``      ``169.254.0.0/16``, ``fe80::/10``
``multicast``       ``224.0.0.0/4``, ``ff00::/8``
``private``         RFC 1918 (``10/8``, ``172.16/12``, ``192.168/16``), ``fc00::/7``, and
                    the other special-purpose blocks Python's ``ipaddress`` calls private
                    (documentation, benchmarking, ``0/8``, ``240/4``, broadcast, ...)
``shared``          ``100.64.0.0/10`` (carrier-grade NAT, RFC 6598)
``reserved``        anything else ``ipaddress`` does not call global
==================  ====================================================================

IPv6 addresses that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) are judged by the IPv4 address.

Why: a recipient domain is chosen by whoever submits mail; without this, a
web form that sends mail to user-given addresses lets anyone make the
workers connect to internal port 25s (Redis, a metadata service and an
internal relay are one DNS record away).  The relay (``MXQ_RELAY``) is the
operator's own choice and is never subject to this policy.

One setting, ``MXQ_ALLOW_PRIVATE_DESTINATIONS``, relaxes it:

- unset, empty, ``0``, ``no``, ``false``: the default above;
- ``1``, ``yes``, ``true``, ``all``: every address is allowed (the sandbox,
  ``mxq up --sandbox``, the demo, the benchmark and the tests set this);
- a comma-separated list of networks (``10.20.0.0/16, fd00:25::/64``):
  those are allowed, the rest of the default stands (an internal exchange
  that legitimately has a private address).

What a refusal does is the delivery layer's business (``mxq.workers.delivery``):
a refused address is never tried; a domain left with no allowed address
bounces (5.4.4), like Postfix bounces mail whose MX points back at the
sending host ("mail for X loops back to myself", 5.4.6) -- retrying cannot
help until the domain's DNS changes, and a deferral would only hold the
mail for days and hide the cause.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["DestinationPolicy", "refusal_kind", "ENV"]

ENV = "MXQ_ALLOW_PRIVATE_DESTINATIONS"

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_YES = ("1", "yes", "true", "all", "on")
_NO = ("", "0", "no", "false", "none", "off")


def refusal_kind(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address (a kind from the table above), or None when it is."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if addr.version == 6:
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return refusal_kind(embedded)
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.version == 4 and addr in _SHARED:
        return "shared"
    if addr.is_private:
        return "private"
    if not addr.is_global or addr.is_reserved:
        return "reserved"
    return None


@dataclass(frozen=True)
class DestinationPolicy:
    """Which destination addresses may be connected to.

    ``allow_all``: every address (the sandbox); ``allowed``: networks
    allowed although not public.  ``DestinationPolicy()`` is the default:
    public unicast addresses only.
    """

    allow_all: bool = False
    allowed: tuple = ()

    @classmethod
    def parse(cls, value: str | None) -> "DestinationPolicy":
        """Parse ``MXQ_ALLOW_PRIVATE_DESTINATIONS`` (see the module docstring); ValueError names a bad network."""
        v = (value or "").strip()
        if v.lower() in _NO:
            return cls()
        if v.lower() in _YES:
            return cls(allow_all=True)
        nets = []
        for item in (x.strip() for x in v.split(",")):
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{ENV} must be 0, 1/all, or a comma list of networks "
                                 f"(10.20.0.0/16,fd00::/8); {item!r} is not a network") from None
        return cls(allowed=tuple(nets))

    def refusal(self, ip: str) -> str | None:
        """Why ``ip`` may not be connected to (``"loopback"``, ``"private"``, ...), or None when it may."""
        if self.allow_all:
            return None
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        kind = refusal_kind(addr)
        if kind is None:
            return None
        for net in self.allowed:
            if addr.version == net.version and addr in net:
                return None
        return kind

    def describe(self) -> str:
        """For logs: ``all``, ``public only`` or ``public + 10.20.0.0/16, ...``."""
        if self.allow_all:
            return "all"
        if not self.allowed:
            return "public only"
        return "public + " + ", ".join(str(n) for n in self.allowed)

"""The relay (smarthost) hop: its TLS policy, which addresses may see clear text, and AUTH.

``delivery`` asks this module three things about a ``RelayConfig``:

- ``session_tls(relay)``: the ``SMTPSession`` TLS policy -- ``implicit``
  (``smtps://``), ``required`` (verified STARTTLS, the default),
  ``opportunistic`` or ``none`` (``?tls=``);
- ``refusal(relay, ip)``: with ``?tls=none``, a reply refusing an address
  the operator did not name (the relay given as an IP address, or
  ``MXQ_RELAY_CLEARTEXT``): a name that resolves somewhere else never gets
  mail in clear text.  Nothing is sent there;
- ``login(session, relay)``: AUTH after the greeting (and TLS), only when
  credentials are configured, and only if the server offers AUTH at all
  (a relay that does not ask for authentication gets none, as Postfix's
  client does).  Credentials never go over a connection without TLS unless
  the address is one the operator named; otherwise the session fails with
  a 4.7.0 (deferred: a configuration problem, never a bounce).  XOAUTH2
  takes a fresh token from the ``TokenSource``; a refused token is
  invalidated and, when the source then gives a different one, AUTH is
  tried once more on the same connection (RFC 4954 allows it).

Credentials and tokens are never logged; errors name the relay and the
mechanism only.
"""

from __future__ import annotations

import logging

from .config import RelayConfig
from .errors import SMTPAuthError
from .oauth2 import TokenError
from .reply import Reply

log = logging.getLogger("mxq.relay")

__all__ = ["session_tls", "refusal", "login"]


def session_tls(relay: RelayConfig) -> str:
    """The ``SMTPSession`` ``tls=`` for the relay."""
    return "implicit" if relay.implicit_tls else relay.tls


def refusal(relay: RelayConfig, ip: str) -> Reply | None:
    """A local 4.7.0 reply when ``?tls=none`` forbids sending to ``ip`` in clear text, else None."""
    if relay.tls != "none" or relay.implicit_tls or relay.cleartext_allowed(ip):
        return None
    return Reply.local("4.7.0", f"relay {relay.host}[{ip}]:{relay.port}: ?tls=none, and {ip} is not an address "
                                "named in MXQ_RELAY_CLEARTEXT: mail is not sent there in clear text")


def login(session, relay: RelayConfig, ip: str) -> Reply | None:
    """Authenticate on a connected relay session as configured; None when no AUTH was done.

    Raises ``SMTPAuthError`` (the server's refusal, or a local 4.7.0 when
    credentials would go in clear text or no token could be had).
    """
    if not relay.has_credentials:
        return None
    if "auth" not in session.extensions:
        log.info("relay %s[%s] offers no AUTH: sending without authenticating", relay.host, ip)
        return None
    if not session.tls_active and not relay.cleartext_allowed(ip):
        why = session.tls_fallback or "STARTTLS not offered"
        raise SMTPAuthError(Reply.local(
            "4.7.0", f"relay {relay.host}[{ip}]:{relay.port}: not sending credentials without TLS ({why}); "
                     "name the address in MXQ_RELAY_CLEARTEXT to allow it"))
    if relay.token is None:
        return session.authenticate(relay.username, relay.password)
    token = _token(relay)
    try:
        return session.authenticate(relay.username, oauth2_token=token)
    except SMTPAuthError as e:
        if e.code is None or not session.connected:
            raise                         # no usable mechanism, or the connection is gone
        relay.token.invalidate()
        fresh = _token(relay)
        if fresh == token:
            raise
        log.info("relay %s[%s]: XOAUTH2 token refused (%s); retrying with a refreshed token",
                 relay.host, ip, e.code)
        return session.authenticate(relay.username, oauth2_token=fresh)


def _token(relay: RelayConfig) -> str:
    try:
        return relay.token.get()
    except TokenError as e:
        raise SMTPAuthError(Reply.local("4.7.0", f"relay {relay.host}: no XOAUTH2 token: {e}")) from None

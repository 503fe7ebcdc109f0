"""Mail address parsing and validation (RFC 5321 section 4.1.2, RFC 6531, IDNA 2008).

Every address that reaches the wire goes through ``parse_address`` first, so
a CR, LF or other control character can never become a command or header
injection, and a malformed address is refused with a reason before anything
is sent.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

from .errors import InvalidAddress

# RFC 5321 atext, plus any non-ASCII character for RFC 6531 local parts.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ATOM = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+")
#: A dot-atom local part: atoms joined by single dots (what ``_ATOM`` checks atom by atom).
_DOT_ATOM = re.compile(rf"{_ATOM.pattern}(?:\.{_ATOM.pattern})*")
#: A character ``str.isspace`` calls blank (``\s`` of a str pattern is exactly that set).
_BLANK = re.compile(r"\s")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LDH_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# C0 and C1 controls, and the Unicode line and paragraph separators (str.splitlines() breaks on them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Lone surrogates: what os.fsdecode() makes of undecodable bytes (command-line arguments); not UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

MAX_LOCAL = 64      # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255    # octets, RFC 5321 4.5.3.1.2
MAX_PATH = 256      # octets including the angle brackets, RFC 5321 4.5.3.1.3


@dataclass(frozen=True)
class Address:
    """A validated mail address.

    ``domain`` is the domain as the user wrote it (lower-cased); ``ascii_domain``
    is its IDNA A-label form, or the bracketed literal, and is what mxq
    resolves and sends.  ``literal`` is the IP address of an address literal.
    """

    local: str
    domain: str
    ascii_domain: str
    literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII (the domain is always sent as A-labels)."""
        return not self.local.isascii()

    def smtp(self) -> str:
        """The form used in MAIL FROM and RCPT TO: local part and A-label domain."""
        return f"{self.local}@{self.ascii_domain}"

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_address(text: str) -> Address:
    """Parse and validate one address; raise ``InvalidAddress`` with the reason.

    Accepts ``local@domain`` optionally inside one pair of angle brackets, with
    surrounding blanks ignored.  No display names: use ``email.utils`` first.
    The last ``CACHE_SIZE`` valid addresses are remembered (an ``Address`` is
    immutable): a producer submitting 10,000 messages from one sender, or to a
    few domains, parses the same text once.
    """
    if type(text) is str and len(text) <= MAX_PATH:
        return _parse_cached(text)
    return _parse(text)


#: Valid addresses ``parse_address`` remembers (errors are not remembered: they raise each time).
CACHE_SIZE = 4096


def _parse(text: str) -> Address:
    """``parse_address`` without the cache."""
    if not isinstance(text, str):
        raise InvalidAddress(f"address must be a string, not {type(text).__name__}")
    if "\r" in text or "\n" in text:
        raise InvalidAddress(f"address contains CR or LF: {text!r}")
    if _CONTROL.search(text):
        raise InvalidAddress(f"address contains a control character: {text!r}")
    if _SURROGATE.search(text):
        raise InvalidAddress(f"address is not valid Unicode (undecodable bytes): {text!r}")
    s = text.strip(" \t")
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    if not s:
        raise InvalidAddress("empty address")
    at = s.rfind("@")
    if at <= 0 or at == len(s) - 1:
        raise InvalidAddress(f"address needs a local part and a domain: {text!r}")
    local, domain_text = s[:at], s[at + 1:]
    _check_local(local, text)
    try:
        ascii_domain, domain, literal = _domain_cached(domain_text)
    except InvalidAddress:
        _check_domain(domain_text, text)         # the same refusal, naming the whole address
        raise
    if len(local.encode()) + 1 + len(ascii_domain) + 2 > MAX_PATH:
        raise InvalidAddress(f"address longer than {MAX_PATH - 2} octets: {text!r}")
    return Address(local=local, domain=domain, ascii_domain=ascii_domain, literal=literal)


_parse_cached = functools.lru_cache(maxsize=CACHE_SIZE)(_parse)


def parse_sender(text: str | None) -> Address | None:
    """Parse an envelope sender; ``""``, ``"<>"`` or None is the null sender (returns None)."""
    if text is None or text.strip(" \t") in ("", "<>"):
        if text and ("\r" in text or "\n" in text):
            raise InvalidAddress(f"address contains CR or LF: {text!r}")
        return None
    return parse_address(text)


def normalize_domain(domain: str) -> str:
    """The A-label, lower-case form of a domain (or a bracketed literal), as used for grouping."""
    return _domain_cached(domain)[0]


@functools.lru_cache(maxsize=CACHE_SIZE)
def _domain_cached(domain: str):
    """``_check_domain`` of valid domains, remembered (a batch goes to a few domains, many times each)."""
    return _check_domain(domain, domain)


def _check_local(local: str, text: str) -> None:
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise InvalidAddress(f"local part longer than {MAX_LOCAL} octets: {text!r}")
    if local.startswith('"'):
        if not _QUOTED.fullmatch(local):
            raise InvalidAddress(f"malformed quoted local part: {text!r}")
        return
    if _BLANK.search(local):     # Unicode blanks (NBSP, U+3000) look like a space but are not atext
        raise InvalidAddress(f"local part contains a blank: {text!r}")
    if not _DOT_ATOM.fullmatch(local):
        raise InvalidAddress(f"malformed local part {local!r} in {text!r}")


def _check_domain(domain: str, text: str):
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise InvalidAddress(f"malformed address literal: {text!r}")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                ip = ipaddress.IPv6Address(inner[5:])
                canon = f"[IPv6:{ip.compressed}]"
            else:
                ip = ipaddress.IPv4Address(inner)
                canon = f"[{ip}]"
        except ValueError:
            raise InvalidAddress(f"malformed address literal: {text!r}") from None
        return canon, canon, ip
    if domain.endswith(".") or ".." in domain or domain.startswith("."):
        raise InvalidAddress(f"malformed domain {domain!r} in {text!r}")
    lowered = domain.lower()
    if lowered.isascii():
        labels = lowered.split(".")
        if not all(_LDH_LABEL.fullmatch(label) for label in labels):
            raise InvalidAddress(f"malformed domain {domain!r} in {text!r}")
        if lowered.startswith("xn--") or ".xn--" in lowered:
            try:  # an A-label must decode to a valid U-label
                idna.decode(lowered)
            except idna.IDNAError as e:
                raise InvalidAddress(f"invalid IDN domain {domain!r}: {e}") from None
        ascii_domain = lowered
    else:
        try:
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError) as e:
            raise InvalidAddress(f"invalid IDN domain {domain!r}: {e}") from None
        lowered = idna.decode(ascii_domain)
    if len(ascii_domain) > MAX_DOMAIN:
        raise InvalidAddress(f"domain longer than {MAX_DOMAIN} octets: {text!r}")
    return ascii_domain, lowered, None

"""DKIM signing of outgoing mail (RFC 6376), RSA-SHA256 and Ed25519-SHA256 (RFC 8463), with dkimpy.

A message is signed once, when it is accepted (at intake, before its content
is stored), never per delivery attempt: every attempt then sends the same
bytes, and a retry a day later carries the signature made at submission.

Configuration: ``MXQ_DKIM`` names a JSON file mapping each signing domain to
its selector and private key (one object, or a list of them to sign with
several keys, e.g. RSA and Ed25519 side by side as RFC 8463 section 5
suggests while receivers migrate)::

    {
      "example.test": {"selector": "s1", "key": "/etc/mxq/dkim/example.pem", "algorithm": "rsa-sha256"},
      "other.test": [
        {"selector": "r1", "key": "keys/other-rsa.pem"},
        {"selector": "e1", "key": "keys/other-ed25519.key", "algorithm": "ed25519-sha256"}
      ]
    }

- ``selector``: the key's selector; its public key is published as a TXT
  record at ``{selector}._domainkey.{domain}`` (``DKIMKey.dns_record()``
  gives the value).
- ``key``: path of the private key file, relative to the JSON file's folder
  unless absolute.  RSA: PEM, PKCS#1 (``BEGIN RSA PRIVATE KEY``) or PKCS#8
  (``BEGIN PRIVATE KEY``), at least 1024 bits (2048 advised; RFC 8301).
  Ed25519: the base64 32-octet seed dkimpy's ``dknewkey --ktype ed25519``
  writes, or a PKCS#8 PEM (``openssl genpkey -algorithm ed25519``).
- ``algorithm``: ``rsa-sha256`` or ``ed25519-sha256``; optional, inferred
  from the key.

Domain names are matched exactly (after IDNA and lower-casing): a key for
``example.test`` does not sign ``news.example.test``.  Every key is read
and checked when the file is loaded, so a bad configuration fails at start,
not on the first message.

What is signed (``SIGNED_HEADERS``, RFC 6376 section 5.4.1 plus the MIME and
identity fields): From, Sender, Reply-To, Subject, Date, Message-ID, To, Cc,
MIME-Version, Content-Type, Content-Transfer-Encoding, Content-ID,
Content-Description, In-Reply-To, References, the Resent-* fields and the
List-* fields, each as many times as it occurs; and From once more than it
occurs ("over-signing", RFC 6376 section 8.15), so a From field added in
transit breaks the signature.  Canonicalization is relaxed/relaxed (survives
the header refolding and whitespace changes relays do); no ``l=`` tag (a
body length limit would let anyone append content).

Which domain: by default the domain of the (first) From address, the one
DMARC aligns with; a message from a domain without a key is left unsigned,
as is a message without a From field.

Memory: dkimpy works on the whole message in memory.  ``signature()``
accepts bytes or an iterable of bytes (``mxq.workers.message.FileContent``) and
reads it once; the peak is about three times the message size while it
signs (the message, dkimpy's copy of the body, its canonicalized body), so
about 100 MB for a 35 MB message (``DEFAULT_MAX_MESSAGE_SIZE``).  Use
``signature()`` (the header fields only) rather than ``sign()`` for a large
file, and put the result in front of the content without copying it
(``sign_envelope()`` does that for a ``FileContent``).
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from mxq import settings as registry

from .address import normalize_domain, parse_address
from .envelope import Envelope
from .errors import InvalidAddress, InvalidInput, InvalidMessage
from .message import FileContent


def _libraries():
    """dkimpy and PyNaCl, imported when DKIM is used (they are the ``mxq[dkim]`` extra: a web
    process without ``MXQ_DKIM`` never loads them).  ConfigError naming MXQ_DKIM when missing."""
    try:
        import dkim
        import dkim.crypto
        import nacl.encoding
        import nacl.signing
    except ImportError as e:
        raise registry.ConfigError("MXQ_DKIM", f"needs dkimpy and PyNaCl ({e.name} is not installed): "
                                               "pip install 'mxq[dkim]'") from None
    return dkim, nacl

log = logging.getLogger("mxq.dkim")

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")

#: Header fields signed when present (lower case), each as many times as it occurs.
SIGNED_HEADERS = frozenset({
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "in-reply-to", "references",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-message-id",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive",
})
#: Header fields listed once more than they occur in ``h=``, so an added one breaks the signature.
OVERSIGNED_HEADERS = ("from",)
#: Header/body canonicalization (RFC 6376 section 3.4).
CANONICALIZATION = (b"relaxed", b"relaxed")

# RFC 8410: a PKCS#8 Ed25519 private key is this fixed DER prefix, then the 32-octet seed.
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s*(.*?)\s*-----END \1-----", re.S)
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@dataclass(frozen=True)
class DKIMKey:
    """One signing key: ``domain`` (A-label, lower case), ``selector``, ``algorithm``, ``private_key``.

    ``private_key`` is in the form dkimpy takes: PEM bytes for RSA, the
    base64 seed for Ed25519.  ``repr()`` never shows it.
    """

    domain: str
    selector: str
    algorithm: str
    private_key: bytes = dataclasses.field(repr=False)

    @classmethod
    def load(cls, domain: str, selector: str, key: bytes | str | os.PathLike,
             algorithm: str | None = None) -> "DKIMKey":
        """Build and check a key from its file (a path) or its text (bytes); ValueError when unusable."""
        try:
            d = normalize_domain(domain.strip().rstrip("."))
        except InvalidAddress as e:
            raise ValueError(f"DKIM domain {domain!r}: {e.reason}") from None
        if not isinstance(selector, str) or not _SELECTOR.fullmatch(selector):
            raise ValueError(f"DKIM selector {selector!r} for {d} is not a DNS label sequence")
        if isinstance(key, (str, os.PathLike)):
            try:
                data = Path(key).read_bytes()
            except OSError as e:
                raise ValueError(f"DKIM key for {d}: cannot read {os.fspath(key)!r}: {e.strerror or e}") from None
        else:
            data = bytes(key)
        found, private = _parse_private_key(data, d)
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise ValueError(f"DKIM algorithm for {d} must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
        if algorithm is not None and algorithm != found:
            raise ValueError(f"DKIM key for {d} (selector {selector}) is an {found.split('-')[0]} key, "
                             f"not {algorithm}")
        return cls(domain=d, selector=selector, algorithm=found, private_key=private)

    def dns_record(self) -> str:
        """The TXT record to publish at ``{selector}._domainkey.{domain}``: ``v=DKIM1; k=...; p=...``.

        RSA needs the ``cryptography`` package (to derive the public key);
        Ed25519 does not.
        """
        if self.algorithm == "ed25519-sha256":
            _, nacl = _libraries()
            verify = nacl.signing.SigningKey(self.private_key, encoder=nacl.encoding.Base64Encoder).verify_key
            return "v=DKIM1; k=ed25519; p=" + verify.encode(encoder=nacl.encoding.Base64Encoder).decode()
        from cryptography.hazmat.primitives import serialization

        priv = serialization.load_pem_private_key(self.private_key, password=None)
        spki = priv.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()

    @property
    def record_name(self) -> str:
        """``{selector}._domainkey.{domain}``, where the public key is published."""
        return f"{self.selector}._domainkey.{self.domain}"


def _parse_private_key(data: bytes, domain: str) -> tuple[str, bytes]:
    """(algorithm, key in dkimpy's form) from a key file's bytes; ValueError naming ``domain``."""
    data = data.replace(b"\r\n", b"\n").strip()
    m = _PEM.search(data)
    if m is None:
        # Not PEM: dkimpy's Ed25519 form, the base64 of the 32-octet seed.
        try:
            seed = base64.b64decode(data, validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"DKIM key for {domain}: neither a PEM key nor a base64 Ed25519 seed")
        return "ed25519-sha256", base64.b64encode(seed)
    try:
        der = base64.b64decode(b"".join(m.group(2).split()), validate=True)
    except ValueError:
        raise ValueError(f"DKIM key for {domain}: the PEM block is not base64") from None
    if der.startswith(_ED25519_PKCS8_PREFIX) and len(der) == len(_ED25519_PKCS8_PREFIX) + 32:
        return "ed25519-sha256", base64.b64encode(der[len(_ED25519_PKCS8_PREFIX):])
    if m.group(1) not in (b"RSA PRIVATE KEY", b"PRIVATE KEY"):
        raise ValueError(f"DKIM key for {domain}: a {m.group(1).decode()} is not an RSA or Ed25519 private key")
    dkim, _ = _libraries()
    try:
        rsa = dkim.crypto.parse_private_key(der)
    except Exception as e:   # dkimpy raises UnparsableKeyError and ASN.1 errors of several kinds
        raise ValueError(f"DKIM key for {domain}: not a usable RSA private key ({e})") from None
    bits = rsa["modulus"].bit_length()
    if bits < 1024:     # dkimpy's verifiers (and RFC 8301) refuse shorter keys
        raise ValueError(f"DKIM key for {domain}: RSA key of {bits} bits, fewer than 1024")
    # dkimpy's PEM reader wants LF line endings and the base64 on lines of its own: give it a clean PEM.
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    label = m.group(1)
    return "rsa-sha256", b"-----BEGIN " + label + b"-----\n" + lines + b"\n-----END " + label + b"-----\n"


class DKIMSigner:
    """Signs messages with the key(s) of their From domain; see the module docstring.

    ``DKIMSigner(keys)`` takes ``DKIMKey`` objects (several per domain sign
    several times, in the order given).  A signer without keys signs nothing.
    """

    def __init__(self, keys: Iterable[DKIMKey] = ()):
        self._keys: dict[str, list[DKIMKey]] = {}
        for k in keys:
            self._keys.setdefault(k.domain, []).append(k)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "DKIMSigner":
        """Load the JSON key map at ``path`` (format in the module docstring); ValueError when bad."""
        path = Path(path)
        _libraries()            # a key map without dkimpy installed: say so now, naming the extra
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"MXQ_DKIM: cannot read {os.fspath(path)!r}: {e.strerror or e}") from None
        except ValueError as e:
            raise ValueError(f"MXQ_DKIM: {os.fspath(path)!r} is not valid JSON: {e}") from None
        return cls.from_mapping(config, base=path.parent)

    @classmethod
    def from_mapping(cls, config: Mapping, base: str | os.PathLike = ".") -> "DKIMSigner":
        """Build from the decoded key map; relative key paths are relative to ``base``."""
        if not isinstance(config, Mapping):
            raise ValueError("MXQ_DKIM: the key map must be a JSON object {domain: {selector, key, algorithm}}")
        keys = []
        for domain, entries in config.items():
            if isinstance(entries, Mapping):
                entries = [entries]
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"MXQ_DKIM: {domain!r} needs an object or a non-empty list of objects")
            for e in entries:
                unknown = set(e) - {"selector", "key", "algorithm"} if isinstance(e, Mapping) else None
                if unknown is None or unknown or not isinstance(e.get("key"), str):
                    raise ValueError(f"MXQ_DKIM: {domain!r}: each entry is {{\"selector\", \"key\", \"algorithm\"}}"
                                     + (f", not {sorted(unknown)}" if unknown else ""))
                keys.append(DKIMKey.load(domain, e.get("selector"), Path(base) / e["key"], e.get("algorithm")))
        return cls(keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DKIMSigner":
        """The signer ``MXQ_DKIM`` configures (a signer without keys when it is unset or empty)."""
        path = registry.value("MXQ_DKIM", env)
        try:
            return cls.from_file(path) if path else cls()
        except ValueError as e:         # an unreadable or malformed key map: a configuration error
            raise registry.ConfigError("MXQ_DKIM", str(e)) from None

    @property
    def domains(self) -> list[str]:
        """The domains this signer has keys for."""
        return list(self._keys)

    def keys_for(self, domain: str) -> list[DKIMKey]:
        """The keys that sign ``domain``'s mail (empty when none)."""
        try:
            return list(self._keys.get(normalize_domain(domain.strip().rstrip(".")), ()))
        except (InvalidAddress, AttributeError):
            return []

    def __bool__(self) -> bool:
        return bool(self._keys)

    def signature(self, content, sender_domain: str | None = None) -> bytes:
        """The DKIM-Signature header field(s) for ``content``, CRLF-terminated; ``b""`` when not signed.

        ``content``: the message as it will be sent (CRLF line endings, as
        ``mxq.workers.message.prepare`` makes it): bytes, or an iterable of bytes
        such as ``FileContent`` (read once, whole, into memory).
        ``sender_domain``: the signing domain; None (the default) takes the
        domain of the From header.  No key for the domain, or no From field:
        ``b""``.  Raises ``InvalidMessage`` when dkimpy cannot sign the message.
        """
        if not self._keys:
            return b""
        dkim, _ = _libraries()
        data = content if isinstance(content, bytes) else b"".join(content)
        msg = dkim.DKIM(data, linesep=b"\r\n", logger=log)
        names = [name.decode("ascii", "replace").lower() for name, _ in msg.headers]
        if "from" not in names:
            log.info("not DKIM-signed: the message has no From field")
            return b""
        domain = sender_domain if sender_domain is not None else _from_domain(msg.headers)
        keys = self.keys_for(domain) if domain else []
        if not keys:
            log.debug("not DKIM-signed: no key for %r", domain)
            return b""
        include = [n for n in names if n in SIGNED_HEADERS]
        include += [n for n in include if n in OVERSIGNED_HEADERS]
        out = []
        for key in keys:
            try:
                out.append(msg.sign(key.selector.encode(), key.domain.encode(), key.private_key,
                                    signature_algorithm=key.algorithm.encode(), canonicalize=CANONICALIZATION,
                                    include_headers=[n.encode() for n in include]))
            except dkim.DKIMException as e:
                raise InvalidMessage(f"cannot DKIM-sign the message for {key.domain}: {e}") from None
        return b"".join(out)

    def sign(self, content: bytes, sender_domain: str | None = None) -> bytes:
        """``content`` with its DKIM-Signature field(s) in front, or ``content`` unchanged when not signed."""
        sig = self.signature(content, sender_domain)
        if not sig:
            return content
        return sig + (content if isinstance(content, bytes) else b"".join(content))

    def sign_envelope(self, envelope: Envelope, sender_domain: str | None = None) -> Envelope:
        """A copy of a prepared ``Envelope`` with signed content and the new ``size``.

        Bytes content gets the signature in front; a ``FileContent`` gets a
        new header block (the file's body is still streamed at delivery,
        never copied), so use this for large files.  The envelope itself is
        returned when nothing is signed.
        """
        c = envelope.content
        sig = self.signature(c if isinstance(c, (bytes, FileContent)) else _as_bytes(c), sender_domain)
        if not sig:
            return envelope
        if isinstance(c, FileContent):
            new = FileContent(sig + c.header, c.path, c.body_offset, c.size + len(sig))
        else:
            new = sig + _as_bytes(c)
        size = envelope.size + len(sig) if envelope.size is not None else None
        return dataclasses.replace(envelope, content=new, size=size)


def _as_bytes(content) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    return b"".join(content)


def _from_domain(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The A-label domain of the first address of the first From field, or None."""
    for name, value in headers:
        if name.lower() != b"from":
            continue
        text = value.decode("utf-8", "replace").replace("\r\n", "")
        for _, addr in email.utils.getaddresses([text]):
            if not addr:
                continue
            try:
                return parse_address(addr).ascii_domain
            except InvalidInput:
                return None
        return None
    return None


_cache: dict = {}


def signer_from_env(env: Mapping[str, str] | None = None) -> DKIMSigner:
    """``DKIMSigner.from_env()``, cached per process until ``MXQ_DKIM`` or the file changes.

    For a producer that signs every message: the key file is read again only
    when its path, size or modification time changes.
    """
    path = registry.value("MXQ_DKIM", env) or ""
    try:
        st = os.stat(path) if path else None
        stamp = (path, st.st_mtime_ns, st.st_size) if st else (path,)
    except OSError:
        stamp = (path, None)        # from_file() reports the error
    found = _cache.get("signer")
    if found is not None and found[0] == stamp:
        return found[1]
    signer = DKIMSigner.from_env(env)
    _cache["signer"] = (stamp, signer)
    return signer

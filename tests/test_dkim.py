"""DKIM signing (mxq.workers.dkim): keys from a JSON map, RSA-SHA256 and Ed25519-SHA256 signatures over
the RFC 6376 header set with From over-signed, relaxed/relaxed; delivered by the engine to a real
SMTP server and verified with dkimpy against the public keys the sandbox DNS server publishes.

Names: ``signed.dkim.test`` signs (RSA ``s1`` and Ed25519 ``e1``), ``plain.dkim.test`` has no key,
mail goes to ``rcpt.dkim.test`` whose exchange listens on 127.0.6.10:25.
"""

from __future__ import annotations

import base64
import json
import re

import dkim
import dns.resolver
import idna
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mxq.workers.config import Settings, parse_dns_servers
from mxq.workers.delivery import deliver
from mxq.workers.dkim import DKIMKey, DKIMSigner, signer_from_env
from mxq.workers.message import FileContent, prepare
from mxq.workers.mx import Resolver
from mxq.workers.results import State
from mxq.sandbox.smtpd import Behaviour, start_server
from mxq.workers.timeouts import Timeouts

SIGNED = "signed.dkim.test"
PLAIN = "plain.dkim.test"
RCPT = "rcpt.dkim.test"
MX_IP = "127.0.6.10"


def rsa_pem(bits: int = 1024, pkcs8: bool = False) -> bytes:
    # 1024 bits in DNS tests: the sandbox DNS serves each TXT value as one character-string
    # (at most 255 octets), and a 2048-bit key's record is about 410.
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


#: A throwaway 512-bit RSA key (``openssl genrsa -traditional 512``): too short to sign with.
#: Written out because ``cryptography`` refuses to generate keys under 1024 bits.
SHORT_RSA_PEM = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBOwIBAAJBAKJRdStPvJUBJQYcN5XRR/opzB5P8a6WgIPkLDChBjvb4EYF/KsS
9xWugHJjHdbEZEowwkfnWvg1+WZzJ1JC618CAwEAAQJBAIyk7FOVCaBKl5wNwxQr
fKSEpvr05kMS4VRm1utj+xTNdNLxzndKq6QDyMgQ8x7H7K8SFB4OM29rH1l7ZzF3
bGECIQDQiJmqaXsprInrHNCzHZfaiRtpyVCnZQGl0RjP9HlZZwIhAMdD2nnnrV/L
38IecoxD5Ofs0Wuk/yhdbbrYLamVBwtJAiEAxpixL7gREZk+J+ljYJHYYsmcj9yn
sSPis9Y0+SdswhUCIBItFE6uXVgxppV0ZYp53vVw2qFxCX1LGGlEstWXLG9RAiB8
sjfSdCX9bdUq/6QAnnShoCaS/X1hBTNSOg2LO3qQUg==
-----END RSA PRIVATE KEY-----
"""


def ed25519_seed() -> bytes:
    """dkimpy's Ed25519 key file: the base64 of the 32-octet seed."""
    return base64.b64encode(bytes(nacl.signing.SigningKey.generate()))


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dkim")
    (d / "rsa.pem").write_bytes(rsa_pem())
    (d / "ed25519.key").write_bytes(ed25519_seed() + b"\n")
    (d / "keys.json").write_text(json.dumps({
        SIGNED: [{"selector": "s1", "key": "rsa.pem", "algorithm": "rsa-sha256"},
                 {"selector": "e1", "key": str(d / "ed25519.key"), "algorithm": "ed25519-sha256"}],
    }))
    return d


@pytest.fixture(scope="module")
def signer(keydir):
    return DKIMSigner.from_file(keydir / "keys.json")


class World:
    """The sandbox DNS server (with the public keys and the recipients' MX) and the recipients' SMTP server."""

    def __init__(self, dns_server, server):
        self.dns = dns_server
        self.server = server


@pytest.fixture(scope="module")
def world(dns_server, signer):
    records = {k.record_name: {"TXT": [k.dns_record()]} for k in signer.keys_for(SIGNED)}
    records.update({RCPT: {"MX": [[10, "mx.rcpt.dkim.test"]]}, "mx.rcpt.dkim.test": {"A": [MX_IP]}})
    dns_server.add(records)
    server = start_server(MX_IP, 25, Behaviour(hostname="mx.rcpt.dkim.test"))
    yield World(dns_server, server)
    server.stop()


@pytest.fixture
def mx(world):
    """The world, its SMTP server emptied for this test."""
    world.server.clear()
    return world


def dns_txt(address: str):
    """A dkimpy ``dnsfunc`` that asks the sandbox DNS server through dnspython (never the system resolver)."""
    (host, port), = parse_dns_servers(address)
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [host]
    r.port = port
    r.lifetime = 5

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = r.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return txt


def message(sender_domain: str, marker: str, extra: str = "") -> bytes:
    return (f"From: Alice <alice@{sender_domain}>\r\nTo: bob@{RCPT}\r\nCc: carol@{RCPT}\r\n"
            f"Subject: dkim {marker}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Reply-To: replies@{sender_domain}\r\nX-Not-Signed: yes\r\n{extra}\r\n"
            f"Hello Bob,\r\n\r\nthis is {marker}.   Trailing blanks   \r\n\r\n\r\n").encode()


def settings(world) -> Settings:
    return Settings(helo_name="client.dkim.test", dns_servers=parse_dns_servers(world.dns.address),
                    timeouts=Timeouts(connect=2, greeting=5, command=5, data_init=5, data_block=5, data_final=5))


def deliver_and_receive(envelope, world, marker: bytes) -> bytes:
    """Deliver with the engine (MX from the sandbox DNS); return the content the server received."""
    s = settings(world)
    results = deliver(envelope, settings=s, resolver=Resolver(s))
    assert [r.state for r in results] == [State.DELIVERED] * len(results), results
    (got,) = [m for m in world.server.messages if marker in m.content]
    return got.content


def h_tag(content: bytes, idx: int = 0) -> list[str]:
    sigs = [v for k, v in _fields(content) if k.lower() == "dkim-signature"]
    m = re.search(r"\bh=([^;]*)", sigs[idx])
    return [x.strip() for x in m.group(1).split(":")]


def _fields(content: bytes) -> list[tuple[str, str]]:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    out = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            out[-1] = (out[-1][0], out[-1][1] + line)
        else:
            k, _, v = line.partition(":")
            out.append((k, v))
    return out


def verify(content: bytes, world, idx: int = 0) -> bool:
    """dkimpy's verdict on the idx-th DKIM-Signature, keys fetched from the sandbox DNS."""
    try:
        return dkim.DKIM(content, minkey=1024).verify(idx=idx, dnsfunc=dns_txt(world.dns.address))
    except dkim.DKIMException:      # DKIM.verify raises for a body hash mismatch (dkim.verify would say False)
        return False


# ------------------------------------------------------------------ end to end

def test_signed_delivered_and_verified_rsa_and_ed25519(signer, mx):
    env = signer.sign_envelope(prepare(message(SIGNED, "both")))
    got = deliver_and_receive(env, mx, b"this is both")
    sigs = [v for k, v in _fields(got) if k == "DKIM-Signature"]
    assert len(sigs) == 2
    assert "a=rsa-sha256" in sigs[0] and "s=s1" in sigs[0] and f"d={SIGNED}" in sigs[0]
    assert "a=ed25519-sha256" in sigs[1] and "s=e1" in sigs[1]
    for s in sigs:
        assert "c=relaxed/relaxed" in s and "l=" not in s
    assert verify(got, mx, 0) is True      # RSA-SHA256
    assert verify(got, mx, 1) is True      # Ed25519-SHA256 (RFC 8463)
    # Headers as RFC 6376 5.4.1 advises, in message order, each as often as it occurs, From once more.
    assert h_tag(got) == ["from", "to", "cc", "subject", "mime-version", "content-type", "reply-to",
                          "date", "message-id", "from"]
    assert env.size == len(got)            # SIZE= announced the signed size


def test_changed_body_fails_verification(signer, mx):
    got = deliver_and_receive(signer.sign_envelope(prepare(message(SIGNED, "body"))), mx, b"this is body")
    assert verify(got, mx, 0) and verify(got, mx, 1)
    tampered = got.replace(b"this is body.", b"this is BODY.")
    assert tampered != got
    assert verify(tampered, mx, 0) is False
    assert verify(tampered, mx, 1) is False


def test_added_from_fails_verification(signer, mx):
    got = deliver_and_receive(signer.sign_envelope(prepare(message(SIGNED, "from"))), mx, b"this is from")
    head, body = got.split(b"\r\n\r\n", 1)
    # An attacker adds a second From (above or below the real one): the over-signed From covers both.
    for added in (head.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice", 1),
                  head + b"\r\nFrom: Mallory <m@evil.test>"):
        forged = added + b"\r\n\r\n" + body
        assert verify(forged, mx, 0) is False
        assert verify(forged, mx, 1) is False
    # An unsigned field may be added without harm (what relays do with Received).
    ok = b"Received: from relay.test by mx.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n" + got
    assert verify(ok, mx, 0) and verify(ok, mx, 1)


def test_relaxed_canonicalization_survives_refolding(signer, mx):
    got = deliver_and_receive(signer.sign_envelope(prepare(message(SIGNED, "fold"))), mx, b"this is fold")
    refolded = got.replace(b"Subject: dkim fold", b"Subject:   dkim\r\n\tfold").replace(b"Trailing blanks   ", b"Trailing blanks")
    assert refolded != got
    assert verify(refolded, mx, 0) and verify(refolded, mx, 1)


def test_domain_without_key_is_left_unsigned(signer, mx):
    data = prepare(message(PLAIN, "plain")).content
    assert signer.sign(data) is data
    env = signer.sign_envelope(prepare(message(PLAIN, "plain")))
    got = deliver_and_receive(env, mx, b"this is plain")
    assert b"DKIM-Signature" not in got


def test_large_file_signed_header_only(signer, mx, tmp_path):
    path = tmp_path / "big.eml"
    body = b"".join(b"line %06d of a large message, streamed from the file\n" % i for i in range(40000))
    path.write_bytes(message(SIGNED, "large").replace(b"\r\n", b"\n") + body)
    env = prepare(path)
    signed = signer.sign_envelope(env)
    assert isinstance(signed.content, FileContent) and signed.content.path == env.content.path
    assert signed.content.header.startswith(b"DKIM-Signature: ")
    assert signed.size == env.size + len(signer.signature(env.content))   # same signature length
    got = deliver_and_receive(signed, mx, b"this is large")
    assert len(got) > 2_000_000 and got.endswith(b"line 039999 of a large message, streamed from the file\r\n")
    assert verify(got, mx, 0) and verify(got, mx, 1)


# ------------------------------------------------------------------ signing rules, no network

def test_sender_domain_picks_the_key(signer):
    data = prepare(message(PLAIN, "explicit")).content
    signed = signer.sign(data, SIGNED)      # the caller chooses the signing domain
    assert signed.endswith(data) and signed.count(b"DKIM-Signature:") == 2
    assert f"d={SIGNED}".encode() in signed
    assert signer.sign(data, "Signed.DKIM.test.") != data    # case and a final dot do not matter
    assert signer.sign(data, "nokey.dkim.test") is data


def test_no_from_field_is_left_unsigned(signer):
    env = prepare(b"To: bob@rcpt.dkim.test\r\nSubject: no from\r\n\r\nhi\r\n", sender=f"a@{SIGNED}")
    assert signer.signature(env.content, SIGNED) == b""
    assert signer.sign(env.content, SIGNED) is env.content


def test_signed_once_every_header_occurrence_and_over_signed_from(signer):
    extra = "Resent-From: r@signed.dkim.test\r\nList-Id: <list.dkim.test>\r\nReceived: by x.test\r\nCc: dave@rcpt.dkim.test\r\n"
    data = prepare(message(SIGNED, "h", extra)).content
    sig = signer.signature(data)
    assert sig.count(b"DKIM-Signature:") == 2
    h = h_tag(sig + data)
    assert h.count("cc") == 2 and h.count("from") == 2 and h[-1] == "from"
    assert "resent-from" in h and "list-id" in h
    assert "received" not in h and "x-not-signed" not in h and "bcc" not in h
    # no line over 998 octets, CRLF-terminated: what prepare() and SMTP require
    assert sig.endswith(b"\r\n") and all(len(line) <= 998 for line in sig.split(b"\r\n"))


def test_internationalized_from_signs_with_the_a_label_domain():
    key = DKIMKey.load("ünïcode.dkim.test", "e1", ed25519_seed())
    records = {key.record_name.encode() + b".": key.dns_record().encode()}
    env = prepare("From: Ünï <ünï@ünïcode.dkim.test>\r\nTo: b@rcpt.dkim.test\r\nSubject: héllo\r\n\r\nbödy\r\n".encode())
    assert env.smtputf8
    signed = DKIMSigner([key]).sign(env.content)
    assert f"d={idna.encode('ünïcode.dkim.test').decode()};".encode() in signed
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name))
    assert not dkim.verify(signed.replace("bödy".encode(), "body".encode()),
                           dnsfunc=lambda name, timeout=5: records.get(name))


def test_empty_signer_signs_nothing(monkeypatch):
    monkeypatch.delenv("MXQ_DKIM", raising=False)
    s = DKIMSigner.from_env()
    assert not s and s.domains == []
    data = prepare(message(SIGNED, "none")).content
    assert s.sign(data) is data


# ------------------------------------------------------------------ configuration

def test_key_formats_and_algorithm_inference(tmp_path):
    rsa8 = DKIMKey.load(SIGNED, "p8", rsa_pem(pkcs8=True))
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ed = DKIMKey.load("Ünïcode.dkim.test", "e2", ed_pem)
    assert rsa8.algorithm == "rsa-sha256" and ed.algorithm == "ed25519-sha256"
    assert ed.domain == idna.encode("ünïcode.dkim.test").decode()   # IDNA A-label, what d= carries
    assert ed.dns_record().startswith("v=DKIM1; k=ed25519; p=") and len(ed.dns_record()) < 100
    assert "private_key" not in repr(rsa8)
    assert rsa8.dns_record().startswith("v=DKIM1; k=rsa; p=")
    crlf = tmp_path / "crlf.pem"
    crlf.write_bytes(rsa_pem().replace(b"\n", b"\r\n"))      # a key file edited on Windows
    assert DKIMKey.load(SIGNED, "c1", crlf).algorithm == "rsa-sha256"
    data = prepare(message(SIGNED, "formats")).content
    recs = {k.record_name.encode() + b".": k.dns_record().encode() for k in (rsa8,)}
    signed = DKIMSigner([rsa8]).sign(data)
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: recs.get(name))


@pytest.mark.parametrize("entry, error", [
    ({"selector": "s1", "key": "ed.key", "algorithm": "rsa-sha256"}, "is an ed25519 key, not rsa-sha256"),
    ({"selector": "s1", "key": "ed.key", "algorithm": "ed448"}, "must be one of"),
    ({"selector": "bad selector", "key": "ed.key"}, "selector"),
    ({"selector": "s1", "key": "missing.pem"}, "cannot read"),
    ({"selector": "s1", "key": "junk.pem"}, "neither a PEM key nor"),
    ({"selector": "s1", "key": "short.pem"}, "fewer than 1024"),
    ({"selector": "s1", "key": "ed.key", "keyfile": "x"}, "keyfile"),
    ([], "non-empty list"),
])
def test_bad_configuration_is_refused_at_load(tmp_path, entry, error):
    (tmp_path / "ed.key").write_bytes(ed25519_seed())
    (tmp_path / "junk.pem").write_bytes(b"hello\n")
    (tmp_path / "short.pem").write_bytes(SHORT_RSA_PEM)
    cfg = tmp_path / "keys.json"
    cfg.write_text(json.dumps({SIGNED: entry}))
    with pytest.raises(ValueError, match=re.escape(error)):
        DKIMSigner.from_file(cfg)


def test_from_env_and_cached_signer(keydir, tmp_path, monkeypatch):
    monkeypatch.setenv("MXQ_DKIM", str(keydir / "keys.json"))
    first = signer_from_env()
    assert first.domains == [SIGNED] and [k.selector for k in first.keys_for(SIGNED)] == ["s1", "e1"]
    assert signer_from_env() is first                     # not re-read while the file is unchanged
    other = tmp_path / "other.json"
    (tmp_path / "k.key").write_bytes(ed25519_seed())
    other.write_text(json.dumps({PLAIN: {"selector": "x1", "key": "k.key"}}))
    monkeypatch.setenv("MXQ_DKIM", str(other))
    assert signer_from_env().domains == [PLAIN]
    monkeypatch.setenv("MXQ_DKIM", str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="cannot read"):
        signer_from_env()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DKIMSigner.from_file(tmp_path / "bad.json")


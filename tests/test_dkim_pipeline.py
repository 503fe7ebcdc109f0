"""DKIM through the pipeline: ``MXQ_DKIM`` set for the producer, a message submitted with
``mxq.tasks.submit``, delivered by a real ``celery worker`` to a real SMTP server (aiosmtpd), and the
received message verified with dkimpy against the public key the sandbox DNS server publishes.

The message is signed once, at submission (``mxq.tasks.producer.build_job``): the stored content
already carries the signature, and the worker -- which has no ``MXQ_DKIM`` at all here -- sends
those bytes unchanged.

Names: ``dkp.test`` signs (RSA selector ``p1``), mail goes to ``rcpt.dkp.test`` (127.0.71.10:25).
"""

from __future__ import annotations

import json

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mxq import tasks
from mxq.tasks.store import get_store
from mxq.workers.config import parse_dns_servers
from mxq.workers.dkim import DKIMSigner
from mxq.sandbox.smtpd import Behaviour, start_server

pytest_plugins = ["tests.pipeline_fixtures"]

SIGNING = "dkp.test"
RCPT = "rcpt.dkp.test"
MX_IP = "127.0.71.10"


@pytest.fixture(scope="module")
def keymap(tmp_path_factory):
    """A JSON key map for ``dkp.test`` (1024-bit RSA: the sandbox DNS serves one TXT string)."""
    d = tmp_path_factory.mktemp("dkp")
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (d / "p1.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()))
    (d / "keys.json").write_text(json.dumps({SIGNING: {"selector": "p1", "key": "p1.pem"}}))
    return d / "keys.json"


@pytest.fixture(scope="module")
def mx(dns_server, keymap):
    (k,) = DKIMSigner.from_file(keymap).keys_for(SIGNING)
    dns_server.add({k.record_name: {"TXT": [k.dns_record()]},
                    RCPT: {"MX": [[10, "mx." + RCPT]]}, "mx." + RCPT: {"A": [MX_IP]}})
    server = start_server(MX_IP, 25, Behaviour(hostname="mx." + RCPT))
    yield server
    server.stop()


def dns_txt(address: str):
    """dkimpy's ``dnsfunc`` answering from the sandbox DNS server (never the system resolver)."""
    (host, port), = parse_dns_servers(address)
    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.port, r.lifetime = [host], port, 5

    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = r.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)
    return txt


def test_submitted_message_is_signed_once_and_verifies_after_delivery(pipeline, mx, keymap, dns_server,
                                                                      monkeypatch):
    mx.clear()
    p = pipeline()
    p.worker(concurrency=1, MXQ_DKIM="")            # the worker cannot sign: the producer did
    monkeypatch.setenv("MXQ_DKIM", str(keymap))
    content = (f"From: Alice <alice@{SIGNING}>\r\nTo: bob@{RCPT}\r\nSubject: signed in the pipeline\r\n"
               f"Message-ID: <dkp.1@{SIGNING}>\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n\r\nHello Bob,\r\nsigned at intake.   \r\n").encode()
    job = tasks.submit(content)
    stored = get_store().content(job)
    assert stored.count(b"DKIM-Signature:") == 1 and stored.endswith(content)   # signed before storing
    unsigned = tasks.submit(content.replace(SIGNING.encode(), b"plain.dkp.test"), recipients=[f"carol@{RCPT}"])
    assert b"DKIM-Signature:" not in get_store().content(unsigned)           # no key for that domain
    p.wait_done([job, unsigned], timeout=30)
    assert tasks.status(job)["recipients"][0]["state"] == "delivered"
    (got,) = [m for m in mx.messages if m.rcpt_tos == [f"bob@{RCPT}"]]
    assert got.content.count(b"DKIM-Signature:") == 1
    verifier = dkim.DKIM(got.content, minkey=1024)
    assert verifier.verify(dnsfunc=dns_txt(dns_server.address)) is True
    sig = dict(verifier.signature_fields)
    assert (sig[b"d"], sig[b"s"], sig[b"a"]) == (SIGNING.encode(), b"p1", b"rsa-sha256")
    # a changed body no longer verifies: the check above could fail
    tampered = got.content.replace(b"signed at intake.", b"signed at intake!")
    try:
        assert dkim.DKIM(tampered, minkey=1024).verify(dnsfunc=dns_txt(dns_server.address)) is False
    except dkim.DKIMException:
        pass


def test_bad_key_map_refuses_submission_and_stores_nothing(pipeline, tmp_path, monkeypatch):
    p = pipeline()
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({SIGNING: {"selector": "p1", "key": "missing.pem"}}))
    monkeypatch.setenv("MXQ_DKIM", str(bad))
    with pytest.raises(ValueError, match="MXQ_DKIM|DKIM key"):
        tasks.submit(f"From: a@{SIGNING}\r\nTo: b@{RCPT}\r\n\r\nx\r\n".encode())
    assert p.redis.client().dbsize() == 0

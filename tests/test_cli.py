"""``mxq deliver`` as a real subprocess against the sandbox DNS server and scripted SMTP servers.

The subprocess inherits the test session's private network namespace and
``MXQ_DNS_SERVERS`` (set by the ``dns_server`` fixture); every test uses its
own 127.0.2.x address and names under ``cli.test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mxq.workers.cli import exit_status
from mxq.workers.results import State
from mxq.sandbox.smtpd import Behaviour, start_server

ROOT = Path(__file__).resolve().parent.parent


def mxq(*args, input: bytes | None = None, env: dict | None = None, timeout: float = 30):
    """Run ``python -m mxq.tasks.cli ARGS`` with short SMTP timeouts; return the CompletedProcess."""
    e = dict(os.environ)
    e.update({"MXQ_CONNECT_TIMEOUT": "1", "MXQ_COMMAND_TIMEOUT": "2", "MXQ_HELO_NAME": "client.cli.test",
              "PYTHONPATH": str(ROOT)})
    for k in ("MXQ_RELAY", "MXQ_RELAY_MODE", "MXQ_REDIS_URL", "MXQ_TLS", "MXQ_MAX_MESSAGE_SIZE"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mxq.tasks.cli", *args], input=input, capture_output=True,
                          env=e, cwd=ROOT, timeout=timeout)


@pytest.fixture
def server(request):
    started = []

    def start(host, behaviour=None):
        srv = start_server(host, 25, behaviour or Behaviour())
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def message(tmp_path):
    def write(to="a@ok.cli.test", extra=b""):
        p = tmp_path / "m.eml"
        p.write_bytes(b"From: Sender <sender@src.test>\nTo: " + to.encode() + b"\n" + extra +
                      b"Subject: cli test\n\nHello from mxq deliver.\n")
        return p
    return write


def serve(dns_server, domain, ip):
    dns_server.add({domain: {"MX": [[10, f"mx.{domain}"]]}, f"mx.{domain}": {"A": [ip]}})


def test_delivered_exit_0_json_and_bcc_removed(dns_server, server, message):
    serve(dns_server, "ok.cli.test", "127.0.2.1")
    srv = server("127.0.2.1")
    path = message("a@ok.cli.test", extra=b"Bcc: hidden@ok.cli.test\n")
    p = mxq("deliver", "--json", str(path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert [r["address"] for r in out["recipients"]] == ["a@ok.cli.test", "hidden@ok.cli.test"]
    for r in out["recipients"]:
        assert set(r) == {"address", "domain", "state", "code", "enhanced", "text", "exchange", "ip",
                          "relay", "attempts", "scope"}
        assert (r["state"], r["code"], r["exchange"], r["ip"], r["relay"], r["attempts"]) == (
            "delivered", 250, "mx.ok.cli.test", "127.0.2.1", False, 1)
        assert r["domain"] == "ok.cli.test" and r["enhanced"] == "2.0.0"
    [m] = srv.messages
    assert m.rcpt_tos == ["a@ok.cli.test", "hidden@ok.cli.test"] and m.mail_from == "sender@src.test"
    assert b"hidden" not in m.content and b"Bcc" not in m.content
    assert m.email()["Message-ID"] and m.email()["Date"]


def test_stdin_and_table_output(dns_server, server):
    serve(dns_server, "stdin.cli.test", "127.0.2.2")
    srv = server("127.0.2.2")
    p = mxq("deliver", "--to", "x@stdin.cli.test,y@stdin.cli.test", "--from", "<>", "-",
            input=b"From: a@src.test\nTo: ignored@elsewhere.test\nSubject: s\n\nbody\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    # the one table style of mxq deliver and mxq status (mxq.tables)
    assert lines[0].split() == ["RECIPIENT", "STATE", "DSN", "TRIES", "DETAIL"]
    assert lines[1].split()[:6] == ["x@stdin.cli.test", "delivered", "2.0.0", "1", "250", "2.0.0"]
    assert lines[1].endswith("[mx.stdin.cli.test 127.0.2.2]")
    assert lines[2].startswith("y@stdin.cli.test")
    [m] = srv.messages
    assert m.mail_from == "" and m.rcpt_tos == ["x@stdin.cli.test", "y@stdin.cli.test"]


def test_deferred_exit_75(dns_server, server, message):
    serve(dns_server, "later.cli.test", "127.0.2.3")
    server("127.0.2.3")
    p = mxq("deliver", "--json", str(message("later1@later.cli.test")))
    assert p.returncode == 75, p.stderr
    [r] = json.loads(p.stdout)["recipients"]
    assert r["state"] == "deferred" and r["code"] == 450


def test_bounced_exit_69_even_with_deferred(dns_server, server, message):
    serve(dns_server, "bounce.cli.test", "127.0.2.4")
    server("127.0.2.4")
    p = mxq("deliver", "--json", str(message("reject1@bounce.cli.test, later1@bounce.cli.test, ok@bounce.cli.test")))
    assert p.returncode == 69, p.stderr
    states = [r["state"] for r in json.loads(p.stdout)["recipients"]]
    assert states == ["bounced", "deferred", "delivered"]


def test_nothing_listening_is_deferred(dns_server, message):
    serve(dns_server, "down.cli.test", "127.0.2.5")    # no server on 127.0.2.5
    p = mxq("deliver", "-v", str(message("a@down.cli.test")))
    assert p.returncode == 75
    assert "relay=none" in p.stderr.decode() and "Connection refused" in p.stderr.decode()


@pytest.mark.parametrize("args,reason", [
    (["--to", "a@ok.cli.test\r\nRCPT TO:<evil@evil.test>"], "CR or LF"),
    (["--from", "me@src.test\nDATA"], "CR or LF"),
    (["--to", "not-an-address"], "local part and a domain"),
    (["--notify", "SOMETIMES"], "NOTIFY"),
    (["--envid", "x" * 101], "ENVID"),
])
def test_bad_input_exit_65_nothing_sent(dns_server, server, message, args, reason):
    serve(dns_server, "bad.cli.test", "127.0.2.6")
    srv = server("127.0.2.6")
    p = mxq("deliver", *args, str(message("a@bad.cli.test")))
    assert p.returncode == 65, (p.stdout, p.stderr)
    assert reason in p.stderr.decode()
    assert p.stdout == b""
    assert srv.stats["connections"] == 0


def test_malformed_message_exit_65(dns_server, tmp_path):
    path = tmp_path / "bad.eml"
    path.write_bytes(b"From: a@src.test\nTo: b@bad.cli.test\nthis line is no header\n\nbody\n")
    p = mxq("deliver", str(path))
    assert p.returncode == 65 and b"malformed header line 3" in p.stderr


def test_usage_exit_64():
    assert mxq("deliver").returncode == 64
    assert mxq("deliver", "--bogus-option", "x.eml").returncode == 64
    assert mxq("deliver", "--ret", "SOME", "-").returncode == 64


def test_missing_file_exit_66(tmp_path):
    p = mxq("deliver", str(tmp_path / "nope.eml"))
    assert p.returncode == 66 and b"no such file" in p.stderr


@pytest.mark.parametrize("env,name", [({"MXQ_RELAY_MODE": "sometimes"}, "MXQ_RELAY_MODE"),
                                      ({"MXQ_SMTP_PORT": "twenty-five"}, "MXQ_SMTP_PORT"),
                                      ({"MXQ_MAX_MESSAGE_SIZE": "huge"}, "MXQ_MAX_MESSAGE_SIZE")])
def test_bad_configuration_exit_78(message, env, name):
    p = mxq("deliver", str(message()), env=env)
    assert p.returncode == 78 and name.encode() in p.stderr


def test_exit_status_function():
    assert exit_status([State.DELIVERED, "delivered"]) == 0
    assert exit_status(["delivered", "deferred"]) == 75
    assert exit_status(["queued"]) == 75
    assert exit_status([]) == 75
    assert exit_status([State.DEFERRED, State.BOUNCED]) == 69
    assert exit_status(["expired", "delivered"]) == 69

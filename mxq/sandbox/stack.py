"""The demo / local sandbox: a DNS server and a set of SMTP servers with named behaviours.

Every domain in ``PLAN`` is served by the sandbox DNS server process
(``mxq.sandbox.dns``) and, where it has exchanges, by scripted aiosmtpd
servers (``mxq.sandbox.smtpd``) on ``127.0.0.x``.  Everything listens on
loopback only and every name is under ``.test`` or ``.example``.

========================  ==================================================  =====================
domain                    what its exchanges do                               one delivery run gives
========================  ==================================================  =====================
``healthy.test``          one exchange, accepts (STARTTLS offered)            delivered
``greylist.test``         greylists the first attempt (450 4.7.1), then       deferred, then
                          accepts a retry                                     delivered on retry
``deadfirst.test``        MX 10 refuses connections (nothing listens),        delivered (by mx2)
                          MX 20 accepts
``slowfirst.test``        MX 10 accepts the TCP connection but never greets,  delivered (by mx2,
                          MX 20 accepts                                       after the greeting
                                                                              timeout)
``nullmx.test``           null MX (``MX 0 .``, RFC 7505): accepts no mail     bounced (5.1.10)
``bounce.test``           550 5.1.1 for local parts ``nobody*``, ``unknown*``, bounced for those,
                          ``reject*``; 552 5.2.2 for ``full*``; others ok     delivered for others
(any other ``.test``)     not in DNS                                          bounced (5.1.2)
``secure.test``           MTA-STS ``enforce`` (policy over HTTPS on :443,     delivered over TLS
                          sandbox CA); its MX has a valid certificate         verified for mx.secure.test
``stsmismatch.test``      MTA-STS ``enforce``, but its MX is not in the       deferred (4.7.5, the
                          policy                                              policy named)
``relay.example``         smarthosts (used only when MXQ_RELAY points at one):
                          ``smtp.relay.example:587`` STARTTLS required, AUTH (user ``mxq``,
                          password ``sandbox``); ``plain.relay.example:25`` no TLS, no AUTH
                          (``MXQ_RELAY=smtp://plain.relay.example:25?tls=none`` with
                          ``MXQ_RELAY_CLEARTEXT`` naming its address); ``oauth.relay.example:587``
                          STARTTLS + XOAUTH2 (user ``mxq@relay.example``, the token in
                          ``<workdir>/relay-token``: ``MXQ_RELAY_TOKEN_FILE``)
========================  ==================================================  =====================

On every exchange, local parts starting ``reject`` get 550 5.1.1 and
``later`` get 450 4.2.0 (the scripted servers' default rules).

Accepted mail is written to ``<workdir>/mail/<domain>/<id>.eml`` (with a
``.json`` of its envelope) and kept in memory on the server handles.

Library use::

    sandbox = start_sandbox(workdir)            # needs 127.0.0.x:25 -> a private netns as root
    os.environ.update(sandbox.env)              # MXQ_DNS_SERVERS, MXQ_SMTP_PORT, ...
    ...
    sandbox.messages("healthy.test")            # what arrived
    sandbox.stop()

Command line (prints the environment to use; runs until Ctrl-C / SIGTERM)::

    python -m mxq.sandbox.stack [--workdir DIR] [--base-ip 127.0.0.] [--dns-port 53]
                                    [--smtp-port 25] [--env-file PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .dns import DNSServerProcess, start_dns_server
from .https import PolicyServer, policy_text, start_policy_server
from .smtpd import DEFAULT_RCPT_RULES, Behaviour, ServerHandle, SilentServer, TLSBundle, make_tls, start_server

__all__ = ["Exchange", "Domain", "PLAN", "RELAY_DOMAIN", "RELAY_USER", "RELAY_PASSWORD",
           "DEMO_RECIPIENTS", "DEMO_EXPECTED", "Sandbox", "start_sandbox", "main"]

RELAY_DOMAIN = "relay.example"
RELAY_USER = "mxq"
RELAY_PASSWORD = "sandbox"


@dataclass(frozen=True)
class Exchange:
    """One mail exchanger of a sandbox domain.

    ``octet`` is the last byte of its 127.0.0.x address; ``kind`` says what
    listens there: ``"smtp"`` (a scripted server with ``behaviour`` applied on
    top of the sandbox defaults), ``"refuse"`` (nothing: connections are
    refused at once) or ``"silent"`` (accepts TCP, never greets).
    """

    name: str
    preference: int
    octet: int
    kind: str = "smtp"
    behaviour: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Domain:
    """A sandbox domain: its exchanges (none for a null MX), and what a delivery run should give."""

    name: str
    description: str
    expect: str
    exchanges: tuple[Exchange, ...] = ()
    null_mx: bool = False


_BOUNCE_RULES = dict(DEFAULT_RCPT_RULES, **{
    "nobody": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    "unknown": "550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    "full": "552 5.2.2 <{address}>: Mailbox full",
})

#: The sandbox's domains, in the order they are shown.
PLAN: tuple[Domain, ...] = (
    Domain("healthy.test", "one exchange, accepts", "delivered",
           (Exchange("mx.healthy.test", 10, 11),)),
    Domain("greylist.test", "greylists the first attempt (450 4.7.1), accepts a retry", "deferred",
           (Exchange("mx.greylist.test", 10, 12, behaviour={"greylist": True}),)),
    Domain("deadfirst.test", "MX 10 refuses connections, MX 20 accepts", "delivered",
           (Exchange("mx1.deadfirst.test", 10, 13, kind="refuse"),
            Exchange("mx2.deadfirst.test", 20, 14))),
    Domain("slowfirst.test", "MX 10 never sends a greeting, MX 20 accepts", "delivered",
           (Exchange("mx1.slowfirst.test", 10, 15, kind="silent"),
            Exchange("mx2.slowfirst.test", 20, 16))),
    Domain("nullmx.test", "null MX (RFC 7505): accepts no mail", "bounced", null_mx=True),
    Domain("bounce.test", "550 5.1.1 for nobody*/unknown*, 552 5.2.2 for full*", "bounced",
           (Exchange("mx.bounce.test", 10, 17, behaviour={"rcpt_rules": _BOUNCE_RULES}),)),
    Domain("secure.test", "MTA-STS enforce: only mx.secure.test, with verified TLS", "delivered",
           (Exchange("mx.secure.test", 10, 18),)),
    Domain("stsmismatch.test", "MTA-STS enforce, but its MX is not in the policy", "deferred",
           (Exchange("mx.stsmismatch.test", 10, 19),)),
)

#: MTA-STS policies (RFC 8461) the sandbox serves over HTTPS, by domain.
STS_POLICIES = {
    "secure.test": policy_text("enforce", "mx.secure.test", max_age=86400),
    "stsmismatch.test": policy_text("enforce", "mx.elsewhere.example", max_age=86400),
}
#: The HTTPS policy server's last octet (``mta-sts.<domain>`` of every domain above resolves to it).
STS_OCTET = 32

#: The relay (smarthost); not an MX target, used only when MXQ_RELAY points at it.
RELAY = Exchange(f"smtp.{RELAY_DOMAIN}", 0, 30, behaviour={
    "auth": {RELAY_USER: RELAY_PASSWORD}, "require_starttls": True, "auth_required": True})
RELAY_PORT = 587
#: A relay on port 25 without TLS or AUTH, as corporate networks run one.
PLAIN_RELAY = Exchange(f"plain.{RELAY_DOMAIN}", 0, 33, behaviour={"starttls": None})
PLAIN_RELAY_PORT = 25
#: A relay taking XOAUTH2 (Gmail / Microsoft 365 style) for OAUTH_USER with OAUTH_TOKEN.
OAUTH_USER = f"mxq@{RELAY_DOMAIN}"
OAUTH_TOKEN = "sandbox-oauth2-token"
OAUTH_RELAY = Exchange(f"oauth.{RELAY_DOMAIN}", 0, 34, behaviour={
    "oauth2_tokens": {OAUTH_USER: OAUTH_TOKEN}, "require_starttls": True, "auth_required": True})
OAUTH_RELAY_PORT = 587
RELAYS = ((RELAY, RELAY_PORT), (PLAIN_RELAY, PLAIN_RELAY_PORT), (OAUTH_RELAY, OAUTH_RELAY_PORT))

#: The DNS server's last octet (not 53: tests/conftest.py's dns_server fixture has 127.0.0.53).
DNS_OCTET = 10

#: The demo's recipients, one or two per behaviour, with the state ONE delivery run
#: (``mxq deliver``) gives each; ``missing.test`` is not in DNS (NXDOMAIN).  With
#: retries (the pipeline) ``ben@greylist.test`` ends delivered.
DEMO_EXPECTED: dict[str, str] = {
    "ann@healthy.test": "delivered",
    "ben@greylist.test": "deferred",
    "cat@deadfirst.test": "delivered",
    "dan@slowfirst.test": "delivered",
    "eve@nullmx.test": "bounced",
    "nobody@bounce.test": "bounced",
    "fay@bounce.test": "delivered",
    "gus@missing.test": "bounced",
}
DEMO_RECIPIENTS: tuple[str, ...] = tuple(DEMO_EXPECTED)


class Sandbox:
    """A running sandbox: the DNS server process, the SMTP servers and the environment to use.

    ``env`` holds the ``MXQ_*`` settings that point mxq at it (plus
    ``SSL_CERT_FILE``, so certificate checks trust the sandbox CA).
    ``servers`` maps exchange host names to ``ServerHandle``s.  ``stop()`` is
    idempotent; the object is also a context manager.
    """

    def __init__(self, workdir: Path, base_ip: str, dns_port: int, smtp_port: int):
        self.workdir = Path(workdir)
        self.base_ip = base_ip
        self.smtp_port = smtp_port
        self.dns_port = dns_port
        self.mail_dir = self.workdir / "mail"
        self.dns: DNSServerProcess | None = None
        self.tls: TLSBundle | None = None
        self.servers: dict[str, ServerHandle] = {}
        self.silent: dict[str, SilentServer] = {}
        self.policy_server: PolicyServer | None = None
        self.token_file = self.workdir / "relay-token"
        self.domains: tuple[Domain, ...] = PLAN
        self._lock = threading.Lock()
        self._stopped = False

    def ip(self, octet: int) -> str:
        """The sandbox address with this last byte."""
        return f"{self.base_ip}{octet}"

    # ---- what to configure
    @property
    def dns_address(self) -> str:
        """``host:port`` of the DNS server, the form MXQ_DNS_SERVERS takes."""
        return self.dns.address if self.dns else f"{self.ip(DNS_OCTET)}:{self.dns_port}"

    @property
    def relay_url(self) -> str:
        """An ``MXQ_RELAY`` value for the sandbox smarthost (STARTTLS, AUTH)."""
        return f"smtp://{RELAY_USER}:{RELAY_PASSWORD}@{RELAY.name}:{RELAY_PORT}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for mxq clients of this sandbox.

        Short timeouts: every peer is local, and ``slowfirst.test`` should
        fall back to its second exchange in seconds, not RFC 5321's minutes.
        """
        env = {
            "MXQ_DNS_SERVERS": self.dns_address,
            "MXQ_SMTP_PORT": str(self.smtp_port),
            "MXQ_HELO_NAME": "client.sandbox.test",
            "MXQ_TLS": "opportunistic",
            "MXQ_CONNECT_TIMEOUT": "5",
            "MXQ_COMMAND_TIMEOUT": "5",
            # The sandbox's exchanges are on loopback, which the destination policy refuses by default.
            "MXQ_ALLOW_PRIVATE_DESTINATIONS": "1",
        }
        if self.tls:
            env["SSL_CERT_FILE"] = self.tls.ca_file
        return env

    def zones(self) -> dict:
        """The DNS records of the plan (``mxq.sandbox.dns`` format)."""
        records: dict[str, dict] = {}
        for d in self.domains:
            if d.null_mx:
                records[d.name] = {"MX": [[0, "."]]}
                continue
            records[d.name] = {"MX": [[x.preference, x.name] for x in d.exchanges]}
            for x in d.exchanges:
                records[x.name] = {"A": [self.ip(x.octet)]}
        for relay, _ in RELAYS:
            records[relay.name] = {"A": [self.ip(relay.octet)]}
        for domain in STS_POLICIES:
            records[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=sandbox1;"]}
            records[f"mta-sts.{domain}"] = {"A": [self.ip(STS_OCTET)]}
        return {"ttl": 60, "records": records}

    # ---- life cycle
    def start(self) -> "Sandbox":
        """Start the DNS server and every SMTP server; on any failure stop what started and raise."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            names = [x.name for d in self.domains for x in d.exchanges] + [r.name for r, _ in RELAYS] \
                + [f"mta-sts.{d}" for d in STS_POLICIES]
            ips = [self.ip(x.octet) for d in self.domains for x in d.exchanges] + [self.ip(r.octet) for r, _ in RELAYS]
            self.tls = make_tls(*names, *ips, directory=self.workdir)
            self.token_file.write_text(OAUTH_TOKEN + "\n")
            self.dns = start_dns_server(self.zones(), host=self.ip(DNS_OCTET), port=self.dns_port,
                                        workdir=self.workdir / "dns")
            for d in self.domains:
                for x in d.exchanges:
                    self._start_exchange(d.name, x, self.smtp_port)
            for relay, port in RELAYS:
                self._start_exchange(RELAY_DOMAIN, relay, port)
            try:
                self.policy_server = start_policy_server(self.ip(STS_OCTET), self.tls.server_context,
                                                         STS_POLICIES)
            except PermissionError:
                # Port 443 needs root like port 25; with --smtp-port above 1024 the MTA-STS domains
                # just have no policy (their mail goes out as for any domain).
                self.policy_server = None
        except BaseException:
            self.stop()
            raise
        return self

    def _start_exchange(self, domain: str, x: Exchange, port: int) -> None:
        ip = self.ip(x.octet)
        if x.kind == "refuse":
            return      # nothing listens: connect() is refused at once
        if x.kind == "silent":
            self.silent[x.name] = SilentServer(ip, port, mode="greeting")
            return
        spool = self.mail_dir / domain
        spool.mkdir(parents=True, exist_ok=True)
        options = dict(hostname=x.name, starttls=self.tls.server_context, spool_dir=spool)
        options.update(x.behaviour)
        self.servers[x.name] = start_server(ip, port, Behaviour(**options))

    def stop(self) -> None:
        """Stop every server and the DNS process (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.policy_server is not None:
            try:
                self.policy_server.stop()
            except Exception:   # keep stopping the others
                pass
        for s in list(self.servers.values()) + list(self.silent.values()):
            try:
                s.stop()
            except Exception:   # keep stopping the others
                pass
        if self.dns:
            self.dns.stop()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- observation
    def messages(self, domain: str) -> list:
        """Messages the exchanges of ``domain`` accepted (``ReceivedMessage``s), oldest first."""
        plan = {d.name: d for d in self.domains}
        names = [x.name for x in plan[domain].exchanges] if domain in plan else (
            [r.name for r, _ in RELAYS] if domain == RELAY_DOMAIN else [])
        out = []
        for n in names:
            if n in self.servers:
                out += self.servers[n].messages
        return sorted(out, key=lambda m: m.received_at)

    def describe(self) -> str:
        """A human-readable table of the domains, their exchanges and addresses."""
        lines = []
        for d in self.domains:
            if d.null_mx:
                where = "MX 0 ."
            else:
                where = ", ".join(f"MX {x.preference} {x.name} [{self.ip(x.octet)}]"
                                  + ("" if x.kind == "smtp" else f" ({x.kind})") for x in d.exchanges)
            lines.append(f"  {d.name:<16} {d.description}\n  {'':<16} {where}")
        lines.append(f"  {RELAY_DOMAIN:<16} smarthost {RELAY.name} [{self.ip(RELAY.octet)}]:{RELAY_PORT}, "
                     f"STARTTLS + AUTH (MXQ_RELAY={self.relay_url})")
        lines.append(f"  {'':<16} {PLAIN_RELAY.name} [{self.ip(PLAIN_RELAY.octet)}]:{PLAIN_RELAY_PORT}, no TLS, no AUTH "
                     f"(MXQ_RELAY=smtp://{PLAIN_RELAY.name}:{PLAIN_RELAY_PORT}?tls=none "
                     f"MXQ_RELAY_CLEARTEXT={self.ip(PLAIN_RELAY.octet)})")
        lines.append(f"  {'':<16} {OAUTH_RELAY.name} [{self.ip(OAUTH_RELAY.octet)}]:{OAUTH_RELAY_PORT}, STARTTLS + "
                     f"XOAUTH2 (MXQ_RELAY=smtp://{OAUTH_USER.replace('@', '%40')}@{OAUTH_RELAY.name} "
                     f"MXQ_RELAY_TOKEN_FILE={self.token_file})")
        if self.policy_server is not None:
            lines.append(f"  {'(MTA-STS)':<16} policies of {', '.join(STS_POLICIES)} on "
                         f"https://mta-sts.<domain> [{self.ip(STS_OCTET)}]:443")
        lines.append(f"  {'(other .test)':<16} not in DNS: NXDOMAIN")
        return "\n".join(lines)


def start_sandbox(workdir: str | os.PathLike | None = None, base_ip: str = "127.0.0.", dns_port: int = 53,
                  smtp_port: int = 25) -> Sandbox:
    """Start the sandbox (DNS server process and SMTP servers) and return it running.

    ``base_ip`` is the prefix the last bytes of ``PLAN`` are appended to
    (loopback only).  Binding 127.0.0.x:25 and :53 needs root, normally inside
    a private network namespace (``unshare -n``; the test suite and
    ``ops/demo`` do this).  ``workdir`` (a new temporary directory if None)
    receives ``mail/<domain>/``, the DNS server's files and the CA (``ca.pem``).
    """
    if not base_ip.startswith("127."):
        raise ValueError("the sandbox listens on loopback only: base_ip must start with '127.'")
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mxq-sandbox-"))
    return Sandbox(workdir, base_ip, dns_port, smtp_port).start()


def _shell_env(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    """``python -m mxq.sandbox.stack``: run the sandbox until SIGINT/SIGTERM."""
    p = argparse.ArgumentParser(prog="python -m mxq.sandbox.stack", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="where received mail and server files go (default: a new temp dir)")
    p.add_argument("--base-ip", default="127.0.0.", help="address prefix (default 127.0.0.)")
    p.add_argument("--dns-port", type=int, default=53)
    p.add_argument("--smtp-port", type=int, default=25)
    p.add_argument("--env-file", help="write the environment as shell 'export' lines here once ready")
    p.add_argument("--json", action="store_true", help="print the environment as JSON instead")
    args = p.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sandbox = start_sandbox(args.workdir, args.base_ip, args.dns_port, args.smtp_port)
    except PermissionError as e:
        print(f"sandbox: {e}: binding port {args.smtp_port} needs root; run inside "
              "'unshare -n' as root (see ops/demo) or pass --smtp-port/--dns-port above 1024", file=sys.stderr)
        return 77
    with sandbox:
        if args.json:
            print(json.dumps(sandbox.env))
        else:
            print(f"sandbox running; mail goes to {sandbox.mail_dir}\n{sandbox.describe()}\n")
            print("environment:\n" + _shell_env(sandbox.env), end="", flush=True)
        if args.env_file:
            tmp = args.env_file + ".tmp"
            Path(tmp).write_text(_shell_env(sandbox.env))
            os.replace(tmp, args.env_file)     # appears complete or not at all: a readiness signal
        sys.stdout.flush()
        while not stop.wait(0.5):   # the signal handler sets it
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

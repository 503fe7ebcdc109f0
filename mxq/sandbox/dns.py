"""The sandbox DNS server: a real authoritative DNS server process for tests and the demo.

Built on dnslib (``DNSServer`` and a ``BaseResolver`` subclass), it serves a
zone described by a JSON file over UDP and TCP::

    python -m mxq.sandbox.dns --zones FILE.json --listen 127.0.0.53 --port 53 \\
        [--ready-file PATH] [--stats-file PATH] [--log request,reply]

Zone file format::

    {"ttl": 300,                      # default TTL, and the negative TTL (SOA minimum)
     "negative_ttl": 300,             # optional, defaults to "ttl"
     "serial": 1,                     # optional; SOA serial, echoed in the stats file
     "records": {
       "a.test":        {"MX": [[10, "mx1.a.test"], [20, "mx2.a.test"]]},
       "mx1.a.test":    {"A": ["127.0.0.2"], "AAAA": ["::1"], "TTL": 60},
       "nullmx.test":   {"MX": [[0, "."]]},
       "txt.test":      {"TXT": ["v=spf1 -all"]},
       "servfail.test": {"SERVFAIL": true},
       "alias.test":    {"CNAME": "mx1.a.test"},
       "silent.test":   {"TIMEOUT": true}}}

Semantics (every answer is authoritative, AA set):

- a name with records of the asked type: those records (TTL: the name's
  ``"TTL"`` if given, else the zone's ``ttl``);
- a name that is present, or that has a descendant present (an empty
  non-terminal such as ``test`` above), but lacks the type: NOERROR with no
  answer (NODATA) and an SOA in the authority section;
- a name neither present nor with descendants: NXDOMAIN with an SOA in the
  authority section.  The SOA is owned by the name's top-level label (``test.``)
  and its TTL and ``minimum`` are the negative TTL (RFC 2308);
- ``CNAME``: answered for any type, and followed within the zone (the answer
  holds the chain and the target's records; a target absent from the zone
  gives NXDOMAIN with the CNAME in the answer, as RFC 6604 describes);
- ``SERVFAIL``: rcode SERVFAIL; ``TIMEOUT``: the query is never answered.

Names are case-insensitive; a U-label name in the zone file is stored as its
IDNA A-labels, since that is what resolvers ask for.

Signals: SIGHUP re-reads the zone file (a malformed file is reported on
stderr and the old zone kept); SIGUSR1 resets the query counters; SIGUSR2
writes them to the stats file; SIGTERM or SIGINT stops the server.

``--ready-file`` is written (atomically, containing the port) only after both
the UDP and the TCP socket are bound and serving.  ``--stats-file`` holds JSON
``{"total": n, "queries": {"a.test MX": n, ...}, "serial": s, "resets": r,
"pid": p, "version": v}``.  A query is counted in memory *before* its answer
is sent; the file is rewritten (atomically, ``version`` one higher each time)
on SIGUSR2, after a reset and after every reload, so a client that has its
answer and then asks for a dump reads an exact count (``DNSServerProcess.stats``
does that).  Each query counts once, whatever its outcome (including SERVFAIL
and unanswered TIMEOUT queries).  The file used to be rewritten for every
query: under the lock that serialised the answers, so a burst of 400 queries
from 100 new destinations waited a median 90 ms each for their answers
(1.5 ms without the write).

``start_dns_server()`` runs the server as a child process and returns a
``DNSServerProcess`` handle to change its zones, read its counters and stop it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import idna
from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel
from dnslib.server import DNSHandler, DNSLogger, DNSServer, BaseResolver

DEFAULT_TTL = 300
MAX_CHAIN = 8              # CNAME links followed before giving up (loops end here)
SOA_MNAME = "ns.sandbox.test"
SOA_RNAME = "hostmaster.sandbox.test"
_DATA_TYPES = ("A", "AAAA", "MX", "CNAME", "TXT")
_FLAGS = ("SERVFAIL", "TIMEOUT")


# --------------------------------------------------------------------------- zone


def normalize_name(name: str) -> str:
    """The lookup key of a DNS name: lower-case IDNA A-labels, no trailing dot ("." stays ".")."""
    name = str(name).strip()
    if name in (".", ""):
        return "."
    name = name.rstrip(".")
    if not name.isascii():
        name = idna.encode(name, uts46=True).decode("ascii")
    return name.lower()


class Zone:
    """A parsed, validated zone: ``records`` maps a normalised name to its entry.

    An entry is a dict with ``ttl`` (int) and any of ``A``, ``AAAA``, ``TXT``
    (lists of str), ``MX`` (list of ``(preference, exchange)``), ``CNAME``
    (str), ``SERVFAIL`` / ``TIMEOUT`` (True).
    """

    def __init__(self, records: dict[str, dict], ttl: int, negative_ttl: int, serial: int):
        self.records = records
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.serial = serial
        # Every proper ancestor of a present name exists (empty non-terminal): NODATA, not NXDOMAIN.
        self.ancestors: set[str] = set()
        for name in records:
            labels = name.split(".")
            for i in range(1, len(labels)):
                self.ancestors.add(".".join(labels[i:]))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Zone":
        """Validate zone data (the JSON format above); raise ValueError naming the bad part."""
        if not isinstance(data, dict):
            raise ValueError("zone data must be a JSON object")
        unknown = set(data) - {"ttl", "negative_ttl", "serial", "records"}
        if unknown:
            raise ValueError(f"unknown zone keys: {sorted(unknown)}")
        ttl = _int(data.get("ttl", DEFAULT_TTL), "ttl")
        negative_ttl = _int(data.get("negative_ttl", ttl), "negative_ttl")
        serial = _int(data.get("serial", 1), "serial")
        raw = data.get("records", {})
        if not isinstance(raw, dict):
            raise ValueError("'records' must be an object mapping names to records")
        records: dict[str, dict] = {}
        for name, spec in raw.items():
            key = normalize_name(name)
            if key in records:
                raise ValueError(f"{name!r} appears twice (names are case-insensitive)")
            records[key] = _parse_entry(name, spec, ttl)
        return cls(records, ttl, negative_ttl, serial)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Zone":
        """Read and validate a zone file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, not {value!r}")
    return value


def _parse_entry(name: str, spec: Any, default_ttl: int) -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"{name}: records must be an object like {{'A': ['127.0.0.2']}}")
    unknown = set(spec) - set(_DATA_TYPES) - set(_FLAGS) - {"TTL"}
    if unknown:
        raise ValueError(f"{name}: unsupported record types {sorted(unknown)}")
    entry: dict[str, Any] = {"ttl": _int(spec.get("TTL", default_ttl), f"{name}: TTL")}
    for flag in _FLAGS:
        if spec.get(flag):
            entry[flag] = True
    for rtype, version in (("A", ipaddress.IPv4Address), ("AAAA", ipaddress.IPv6Address)):
        if rtype in spec:
            values = spec[rtype]
            if not isinstance(values, list):
                raise ValueError(f"{name}: {rtype} must be a list of addresses")
            try:
                entry[rtype] = [str(version(v)) for v in values]
            except ValueError as e:
                raise ValueError(f"{name}: bad {rtype} address: {e}") from None
    if "MX" in spec:
        mxs = []
        for item in spec["MX"]:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)):
                raise ValueError(f"{name}: MX entries must be [preference, exchange], not {item!r}")
            pref = _int(item[0], f"{name}: MX preference")
            if pref > 65535:
                raise ValueError(f"{name}: MX preference {pref} > 65535")
            mxs.append((pref, normalize_name(item[1])))
        entry["MX"] = mxs
    if "TXT" in spec:
        if not isinstance(spec["TXT"], list) or not all(isinstance(t, str) for t in spec["TXT"]):
            raise ValueError(f"{name}: TXT must be a list of strings")
        entry["TXT"] = list(spec["TXT"])
    if "CNAME" in spec:
        if not isinstance(spec["CNAME"], str):
            raise ValueError(f"{name}: CNAME must be a name")
        if any(t in spec for t in ("A", "AAAA", "MX", "TXT")):
            raise ValueError(f"{name}: a CNAME cannot coexist with other data (RFC 1034 3.6.2)")
        entry["CNAME"] = normalize_name(spec["CNAME"])
    return entry


# --------------------------------------------------------------------------- stats


class QueryStats:
    """Counts queries by ``"name TYPE"`` in memory and writes them to a JSON file (if a path is given).

    The file is written when asked (``dump``), after a reset and when the
    serial changes, replaced atomically under the lock, so a reader never sees
    a partial file and never an older count after a newer one (``version``
    goes up by one with each write).
    """

    def __init__(self, path: str | os.PathLike | None, serial: int):
        self.path = Path(path) if path else None
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.total = 0
        self.serial = serial
        self.resets = 0
        self.version = 0
        with self.lock:
            self._write()

    def count(self, name: str, rtype: str) -> None:
        """Record one query."""
        key = f"{name} {rtype}"
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.total += 1

    def dump(self) -> None:
        """Write the counters to the file now."""
        with self.lock:
            self._write()

    def set_serial(self, serial: int) -> None:
        """Record that the zone with ``serial`` is now served."""
        with self.lock:
            self.serial = serial
            self._write()

    def reset(self) -> None:
        """Zero the counters (``resets`` goes up by one so a waiter can see it happened)."""
        with self.lock:
            self.counts = {}
            self.total = 0
            self.resets += 1
            self._write()

    def snapshot(self) -> dict:
        """The stats as the file holds them."""
        return {"total": self.total, "queries": dict(self.counts), "serial": self.serial,
                "resets": self.resets, "pid": os.getpid(), "version": self.version}

    def _write(self) -> None:
        if self.path is None:
            return
        self.version += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot(), sort_keys=True))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- server


class _NoAnswer(Exception):
    """Raised by the resolver for a TIMEOUT name: the handler sends nothing."""


class ZoneResolver(BaseResolver):
    """dnslib resolver answering from a ``Zone`` (swap ``.zone`` to reload; the swap is atomic)."""

    def __init__(self, zone: Zone, stats: QueryStats):
        self.zone = zone
        self.stats = stats

    def resolve(self, request, handler):
        """Answer one query per the module's semantics (raises ``_NoAnswer`` for TIMEOUT)."""
        qname = normalize_name(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        # Count before answering: once a client has its answer the count is on disk.
        self.stats.count(qname, qtype)
        zone = self.zone            # one zone for the whole answer, even if a reload happens
        try:
            return self._answer(request, zone, qname, qtype)
        except _NoAnswer:
            raise
        except Exception:           # a bug here must look like a server failure, not a hang
            traceback.print_exc()
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply

    def _answer(self, request, zone: Zone, qname: str, qtype: str):
        reply = request.reply()
        owner: Any = request.q.qname
        name = qname
        for _ in range(MAX_CHAIN):
            entry = zone.records.get(name)
            if entry is None:
                if name not in zone.ancestors:
                    reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply, zone, name)
                return reply
            if entry.get("TIMEOUT"):
                raise _NoAnswer(name)
            if entry.get("SERVFAIL"):
                failed = request.reply()
                failed.header.rcode = RCODE.SERVFAIL
                return failed
            if "CNAME" in entry and qtype != "CNAME":
                reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(_label(entry["CNAME"])), ttl=entry["ttl"]))
                name = entry["CNAME"]
                owner = _label(name)
                continue
            rrs = list(_records(entry, owner, qtype))
            if not rrs:
                self._add_soa(reply, zone, name)
            for rr in rrs:
                reply.add_answer(rr)
            return reply
        return reply                # a CNAME loop: the chain so far, as real servers do

    @staticmethod
    def _add_soa(reply, zone: Zone, name: str) -> None:
        apex = name.rsplit(".", 1)[-1] if name != "." else "."
        soa = SOA(SOA_MNAME, SOA_RNAME, (zone.serial, 3600, 600, 86400, zone.negative_ttl))
        reply.add_auth(RR(_label(apex), QTYPE.SOA, rdata=soa, ttl=zone.negative_ttl))


def _label(name: str) -> DNSLabel:
    return DNSLabel("." if name == "." else name + ".")


def _records(entry: dict, owner, qtype: str):
    ttl = entry["ttl"]
    want = (lambda t: True) if qtype == "ANY" else (lambda t: t == qtype)
    if want("A"):
        for a in entry.get("A", ()):
            yield RR(owner, QTYPE.A, rdata=A(a), ttl=ttl)
    if want("AAAA"):
        for a in entry.get("AAAA", ()):
            yield RR(owner, QTYPE.AAAA, rdata=AAAA(a), ttl=ttl)
    if want("MX"):
        for pref, exchange in entry.get("MX", ()):
            yield RR(owner, QTYPE.MX, rdata=MX(_label(exchange), pref), ttl=ttl)
    if want("TXT"):
        for t in entry.get("TXT", ()):
            yield RR(owner, QTYPE.TXT, rdata=TXT(t), ttl=ttl)
    if qtype == "CNAME" and "CNAME" in entry:
        yield RR(owner, QTYPE.CNAME, rdata=CNAME(_label(entry["CNAME"])), ttl=ttl)


class _Handler(DNSHandler):
    """dnslib's handler, plus silence for TIMEOUT names."""

    def handle(self):
        try:
            super().handle()
        except _NoAnswer:
            if self.server.socket_type == socket.SOCK_STREAM:
                # Hold the TCP connection open without answering until the client gives up.
                try:
                    self.request.settimeout(60)
                    while self.request.recv(4096):
                        pass
                except OSError:
                    pass


def _bind(resolver: ZoneResolver, host: str, port: int, logger: DNSLogger) -> tuple[DNSServer, DNSServer]:
    """Bind UDP and TCP on the same port (a free one when ``port`` is 0)."""
    for attempt in range(20):
        udp = DNSServer(resolver, address=host, port=port, tcp=False, logger=logger, handler=_Handler)
        bound = udp.server.server_address[1]
        try:
            tcp = DNSServer(resolver, address=host, port=bound, tcp=True, logger=logger, handler=_Handler)
        except OSError:
            udp.server.server_close()
            if port != 0 or attempt == 19:
                raise
            continue
        return udp, tcp
    raise AssertionError("unreachable")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT."""
    p = argparse.ArgumentParser(prog="python -m mxq.sandbox.dns", description=__doc__.split("\n\n")[0])
    p.add_argument("--zones", required=True, help="zone file (JSON)")
    p.add_argument("--listen", default="127.0.0.53", help="address to bind (default 127.0.0.53)")
    p.add_argument("--port", type=int, default=53, help="UDP and TCP port; 0 picks a free one (default 53)")
    p.add_argument("--ready-file", help="written with the port once both sockets serve")
    p.add_argument("--stats-file", help="JSON query counters, written on SIGUSR2, resets and reloads")
    p.add_argument("--log", default="error",
                   help="dnslib log hooks, comma-separated (request,reply,error,...); default: error")
    args = p.parse_args(argv)

    try:
        zone = Zone.load(args.zones)
    except (OSError, ValueError) as e:
        print(f"dns: cannot load {args.zones}: {e}", file=sys.stderr)
        return 2

    # Handle signals synchronously in this thread: block them before any server
    # thread exists (threads inherit the mask), then sigwait.  No race, no
    # signal handler running inside a lock.
    sigs = {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    stats = QueryStats(args.stats_file, zone.serial)
    resolver = ZoneResolver(zone, stats)
    logger = DNSLogger(log=args.log, prefix=False, logf=lambda s: print(s, file=sys.stderr, flush=True))
    try:
        udp, tcp = _bind(resolver, args.listen, args.port, logger)
    except OSError as e:
        print(f"dns: cannot bind {args.listen}:{args.port}: {e}", file=sys.stderr)
        return 1
    port = udp.server.server_address[1]
    udp.start_thread()
    tcp.start_thread()
    if args.ready_file:
        _write_atomic(args.ready_file, f"{port}\n")
    print(f"dns: serving {len(zone.records)} names on {args.listen}:{port} (udp, tcp)", file=sys.stderr, flush=True)

    while True:
        sig = signal.sigwait(sigs)
        if sig == signal.SIGHUP:
            try:
                new = Zone.load(args.zones)
            except (OSError, ValueError) as e:
                print(f"dns: reload failed, keeping the old zone: {e}", file=sys.stderr, flush=True)
                continue
            resolver.zone = new
            stats.set_serial(new.serial)
        elif sig == signal.SIGUSR1:
            stats.reset()
        elif sig == signal.SIGUSR2:
            stats.dump()
        else:
            break
    udp.stop()
    tcp.stop()
    udp.server.server_close()
    tcp.server.server_close()
    return 0


# --------------------------------------------------------------------------- process helper


def _zone_dict(zones: dict) -> dict:
    """Accept the full zone format or a bare ``{name: records}`` mapping; return the full format."""
    zones = dict(zones or {})
    if "records" in zones:
        zones["records"] = {normalize_name(k): v for k, v in dict(zones["records"]).items()}
        return zones
    return {"records": {normalize_name(k): v for k, v in zones.items()}}


class DNSServerProcess:
    """Handle on a sandbox DNS server child process (see ``start_dns_server``).

    Thread-safe: ``update``/``add``/``remove`` serialise on a lock.
    """

    def __init__(self, proc: subprocess.Popen, host: str, port: int, workdir: Path,
                 zone_path: Path, stats_path: Path, log_path: Path, zones: dict):
        self.proc = proc
        self.host = host
        self.port = port
        self.workdir = workdir
        self.zone_path = zone_path
        self.stats_path = stats_path
        self.log_path = log_path
        self._zones = zones
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port`` for IPv6), the form ``MXQ_DNS_SERVERS`` takes."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def zones(self) -> dict:
        """A copy of the zone data now served (full format, names normalised)."""
        with self._lock:
            return json.loads(json.dumps(self._zones))

    def update(self, zones: dict, timeout: float = 10.0) -> None:
        """Serve ``zones`` (full format or a bare records mapping) instead of the current zones.

        Validates first (ValueError, nothing changes), rewrites the zone file,
        sends SIGHUP and returns once the server reports the new serial.
        """
        with self._lock:
            self._install(_zone_dict(zones), timeout)

    def add(self, records: dict, timeout: float = 10.0) -> None:
        """Merge ``{name: records}`` into the served zone (a name given replaces its old records)."""
        with self._lock:
            new = json.loads(json.dumps(self._zones))
            new["records"].update(_zone_dict(records)["records"])
            self._install(new, timeout)

    def remove(self, *names: str, timeout: float = 10.0) -> None:
        """Stop serving ``names`` (they become NXDOMAIN unless they have descendants)."""
        with self._lock:
            new = json.loads(json.dumps(self._zones))
            for n in names:
                new["records"].pop(normalize_name(n), None)
            self._install(new, timeout)

    def _install(self, zones: dict, timeout: float) -> None:
        serial = int(self._zones.get("serial", 1)) + 1
        zones = dict(zones, serial=serial)
        Zone.from_dict(zones)                     # refuse bad data here, not in the child
        _write_atomic(str(self.zone_path), json.dumps(zones, indent=1, sort_keys=True))
        self.proc.send_signal(signal.SIGHUP)
        self._wait(lambda s: s.get("serial") == serial, timeout, f"zone serial {serial}")
        self._zones = zones

    def stats(self, timeout: float = 10.0) -> dict:
        """The server's counters now: ``{"total": n, "queries": {"name TYPE": n}, "serial", "resets", "pid", "version"}``.

        Asks the server to write them (SIGUSR2) and waits for a write newer
        than the file it found: every query answered before the call is in it.
        A server that has exited leaves its last write.
        """
        before = self._read()
        if before is None or self.proc.poll() is not None:
            return before or {"total": 0, "queries": {}}
        self.proc.send_signal(signal.SIGUSR2)
        return self._wait(lambda s: s.get("version", 0) > before.get("version", 0), timeout, "a stats dump")

    def _read(self) -> dict | None:
        """The stats file as it is (None when absent or being replaced)."""
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def queries(self, name: str | None = None, rtype: str | None = None) -> int:
        """Queries received so far, optionally only for ``name`` and/or ``rtype`` (e.g. "MX")."""
        s = self.stats()
        if name is None and rtype is None:
            return s["total"]
        key_name = normalize_name(name) if name is not None else None
        n = 0
        for key, count in s["queries"].items():
            qn, _, qt = key.rpartition(" ")
            if (key_name is None or qn == key_name) and (rtype is None or qt == rtype.upper()):
                n += count
        return n

    def reset_stats(self, timeout: float = 10.0) -> None:
        """Zero the counters (SIGUSR1) and wait until the server has done so."""
        with self._lock:
            resets = (self._read() or {}).get("resets", 0) + 1
            self.proc.send_signal(signal.SIGUSR1)
            self._wait(lambda s: s.get("resets", 0) >= resets, timeout, "stats reset")

    def _wait(self, done, timeout: float, what: str) -> dict:
        """Poll the stats file until ``done(stats)``; return those stats."""
        deadline = time.monotonic() + timeout
        pause = 0.0005
        while True:
            now = self._read()
            if now is not None and done(now):
                return now
            if self.proc.poll() is not None:
                raise RuntimeError(f"DNS server exited ({self.proc.returncode}) waiting for {what}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"DNS server did not report {what} within {timeout}s: {self.log()}")
            time.sleep(pause)
            pause = min(0.005, pause * 2)

    def log(self) -> str:
        """What the server wrote to stderr."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def __enter__(self) -> "DNSServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_dns_server(zones: dict | None = None, host: str = "127.0.0.53", port: int = 53,
                     workdir: str | os.PathLike | None = None, timeout: float = 10.0,
                     log: str = "error") -> DNSServerProcess:
    """Start the server as a child process (``sys.executable -m mxq.sandbox.dns``) and wait until it serves.

    ``zones`` is the full zone format or a bare ``{name: records}`` mapping.
    ``port=0`` picks a free port (read it from ``.port``).  ``workdir`` holds
    the zone, ready, stats and log files (a new temporary directory if None).
    Raises RuntimeError if the server exits, TimeoutError if it is not ready
    within ``timeout`` seconds.
    """
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mxq-dns-"))
    workdir.mkdir(parents=True, exist_ok=True)
    zone_path, ready_path = workdir / "zones.json", workdir / "ready"
    stats_path, log_path = workdir / "stats.json", workdir / "dns.log"
    data = dict(_zone_dict(zones or {}), serial=1)
    Zone.from_dict(data)
    _write_atomic(str(zone_path), json.dumps(data, indent=1, sort_keys=True))
    for stale in (ready_path, stats_path):
        stale.unlink(missing_ok=True)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mxq.sandbox.dns", "--zones", str(zone_path), "--listen", host,
             "--port", str(port), "--ready-file", str(ready_path), "--stats-file", str(stats_path),
             "--log", log],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            cwd=str(Path(__file__).resolve().parents[2]))
    deadline = time.monotonic() + timeout
    while not ready_path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"DNS server exited ({proc.returncode}): {log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise TimeoutError(f"DNS server not ready within {timeout}s: {log_path.read_text(errors='replace')}")
        time.sleep(0.01)
    bound = int(ready_path.read_text().strip())
    return DNSServerProcess(proc, host, bound, workdir, zone_path, stats_path, log_path, data)


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's sandbox: a private network namespace, the DNS server, smtp-sink farms, Redis.

Network safety: ``enter_namespace()`` re-executes the benchmark under
``unshare -n -m`` (as root): a private network namespace whose only
interface is its own loopback, and a private mount namespace in which a
temporary ``/etc/resolv.conf`` (pointing at the sandbox DNS server on
127.0.0.53) is bind-mounted, so Postfix's system resolver asks the sandbox
and nothing else.  Every server binds a 127.0.0.0/8 address.

Counting at the sinks: every sink is a Postfix ``smtp-sink`` process (C,
single-threaded, event-driven) started with

* ``-c``: running counters on stdout (``sess=.. quit=.. mesg=N``), smtp-sink's
  own count of messages it answered 250 to the final dot;
* ``-D FILE -S SEP``: each accepted transaction appended to one dump file,
  preceded by the separator line.  smtp-sink spools a transaction to a
  temporary file and copies it to the dump file after the final dot, in one
  event-loop step, so records never interleave; the copy happens before the
  250 reply is sent (checked with strace and a client that read the dump
  right after its 250).

The ``Monitor`` (a separate process, so it never competes with the
submitting process for the GIL) tails the dump files, counts records and
the ``X-Bench-Id`` values in them, and timestamps each record when it first
sees it: that is the delivery time used for latency (resolution: the poll
interval).  After the sinks stop it reads the files to the end and compares
its record count with smtp-sink's own ``-c`` counters: both are exact.
"""

from __future__ import annotations

import ipaddress
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import messages

NETNS_ENV = "MXQ_BENCH_IN_NETNS"
DNS_HOST = "127.0.0.53"
SEPARATOR = "==MXQ-BENCH-RECORD=="
SINK_USER = "nobody"          # smtp-sink as root requires -u; the dump dir is made writable for it
LIMIT_SINK = "127.0.0.40"     # the single sink of the limit and django-celery-email stages


class BenchError(RuntimeError):
    """A stage could not be run or did not finish; the message says why.

    ``partial``: what was measured before it broke off (``stages.run`` keeps
    it in the stage's ``partial`` field), or None.
    """

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial


class StageTimeout(BenchError):
    """The sinks did not get every message in time; ``progress`` of ``expected`` got there."""

    def __init__(self, message: str, progress: int, expected: int, seconds: float):
        super().__init__(message)
        self.progress = progress
        self.expected = expected
        self.seconds = seconds


# --------------------------------------------------------------------------- namespace


def in_namespace() -> bool:
    """True once the process runs inside the benchmark's private namespaces."""
    return os.environ.get(NETNS_ENV) == "1"


def enter_namespace(argv: list[str]) -> None:
    """Re-exec ``argv`` under ``unshare -n -m`` as root (never returns), unless already inside.

    Inside, bring ``lo`` up.  Raises BenchError when not root or when
    ``unshare``/``ip`` are missing: the benchmark binds port 25 on 127.0.0.x
    and must not share the host's network, so it does not run otherwise.
    """
    if in_namespace():
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    if os.geteuid() != 0:
        raise BenchError("ops/bench must run as root (private network namespace, port 25 on 127.0.0.x)")
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (util-linux / iproute2)")
    env = dict(os.environ, **{NETNS_ENV: "1"})
    # --propagation private (unshare's default with -m): our bind mounts stay in this namespace.
    os.execvpe("unshare", ["unshare", "-n", "-m", "--propagation", "private", "--", *argv], env)


def bind_resolv_conf(workdir: Path, nameserver: str = DNS_HOST) -> Path:
    """Bind-mount a resolv.conf naming only ``nameserver`` over /etc/resolv.conf (this mount namespace only)."""
    if not in_namespace():
        raise BenchError("refusing to replace /etc/resolv.conf outside the private mount namespace")
    path = workdir / "resolv.conf"
    write_resolv_conf(path, nameserver)
    subprocess.run(["mount", "--bind", str(path), "/etc/resolv.conf"], check=True)
    return path


def write_resolv_conf(path: Path, nameserver: str) -> None:
    """(Re)write the resolv.conf at ``path`` in place (the bind mount follows the inode, not the name)."""
    with open(path, "w") as f:
        f.write(f"nameserver {nameserver}\noptions timeout:2 attempts:2\n")


# --------------------------------------------------------------------------- processes


_CHILDREN: list[subprocess.Popen] = []


def spawn(argv: list[str], *, log: Path, env: dict | None = None, cwd: str | None = None,
          session: bool = False) -> subprocess.Popen:
    """Start a child process with stdout+stderr to ``log``; it is tracked and stopped by ``stop_all``.

    ``session``: the child leads a new session (and process group), so
    ``stop`` can signal it together with everything it forked (Celery's pool).
    """
    with open(log, "ab") as f:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, start_new_session=session)
    p.bench_group = session                      # type: ignore[attr-defined]
    _CHILDREN.append(p)
    return p


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        if getattr(p, "bench_group", False):
            os.killpg(p.pid, sig)                # the group that p leads: p and its workers
        else:
            os.kill(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(p: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM ``p`` (and its process group if it was spawned with ``session``), SIGKILL after ``timeout`` s."""
    if p.poll() is None:
        _signal(p, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
    if getattr(p, "bench_group", False):
        _signal(p, signal.SIGKILL)               # whatever the leader left behind in its group
    if p in _CHILDREN:
        _CHILDREN.remove(p)


def stop_all() -> None:
    """Stop every child started with ``spawn`` that is still tracked (newest first)."""
    for p in reversed(list(_CHILDREN)):
        stop(p, timeout=5.0)


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None,
              banner: bytes | None = None) -> None:
    """Wait until ``host:port`` accepts a TCP connection (and, if given, sends ``banner`` first)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.args[0]} exited ({proc.returncode}) before {host}:{port} was ready")
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if banner is not None:
                    s.settimeout(2.0)
                    got = s.recv(512)
                    if not got.startswith(banner):
                        raise BenchError(f"{host}:{port} greeted with {got!r}")
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                return
        except OSError as e:
            last = e
            time.sleep(0.02)
    raise BenchError(f"{host}:{port} not ready within {timeout}s ({last})")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if not Path(f"/proc/{p}").exists():
            continue
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads; 0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pids: list[int]) -> list[dict]:
    """``[{"pid", "cmd", "peak_rss_kb"}]``: VmHWM (peak resident set) of each live process."""
    rows = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if m:
            rows.append({"pid": pid, "cmd": cmd[:120], "peak_rss_kb": int(m.group(1))})
    return rows


def rss_kb(pid: int) -> int | None:
    """VmRSS (current resident set) of ``pid`` in kB, None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return ""


def _exe(pid: int) -> str | None:
    """The executable ``pid`` runs (None once it is gone)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class RssSampler:
    """Samples the RSS of every process in the trees of ``roots`` every ``interval`` s (a thread).

    The trees are re-listed at each sample, so a pool child that replaces
    another is picked up.  Only processes running the root's own executable
    count (the worker's processes, all ``sys.executable``): a short-lived
    helper one of them runs (``uname -p``, which Python's ``platform`` module
    starts) is not a worker process and would be judged as one.  ``stop()``
    returns ``{pid: {"cmd", "samples": [(t, kb)]}}`` with ``t`` in epoch seconds.
    """

    def __init__(self, roots: list[int], interval: float = 0.5):
        import threading
        self.roots = list(roots)
        self.interval = interval
        self.samples: dict[int, dict] = {}
        self._exe = {root: _exe(root) for root in self.roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> "RssSampler":
        """Take a first sample now and keep sampling in the background."""
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        """One sample of every process in the trees."""
        now = time.time()
        for root in self.roots:
            for pid in process_tree(root):
                if self._exe[root] is not None and _exe(pid) != self._exe[root]:
                    continue                # not one of the worker's processes (see above)
                # The command line first: a process that exits between the two
                # reads leaves an empty cmdline (a zombie has none), and a row
                # without its command could not be told apart from others.
                cmd = _cmdline(pid)
                kb = rss_kb(pid)
                if kb is None or not cmd:
                    continue
                row = self.samples.get(pid)
                if row is None:
                    row = self.samples[pid] = {"cmd": cmd, "samples": []}
                row["samples"].append((now, kb))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> dict[int, dict]:
        """Take a last sample, stop the thread and return the samples."""
        self._stop.set()
        self._thread.join(10)
        self.sample()
        return self.samples


#: The "flat RSS" rule of the backlog stage (issue 5: worker RSS flat while draining).
RSS_WARMUP_FRACTION = 0.2
RSS_FLAT_LIMIT = 1.2
RSS_RULE = (f"per worker process: last <= {RSS_FLAT_LIMIT} x first-after-warm-up, where the drain runs from "
            f"every worker ready to every message at the sinks, warm-up is its first "
            f"{RSS_WARMUP_FRACTION:.0%}, first-after-warm-up the first sample at or after that, and last "
            f"the last sample before the end")


def rss_verdict(samples: dict[int, dict], t_start: float, t_end: float,
                warmup: float = RSS_WARMUP_FRACTION, limit: float = RSS_FLAT_LIMIT) -> dict:
    """Judge RSS samples (``RssSampler.stop()``) taken over a drain from ``t_start`` to ``t_end``.

    Per process: ``first_kb`` (its first sample), ``first_after_warmup_kb``,
    ``peak_kb``, ``last_kb`` (its last sample up to ``t_end``), ``ratio`` =
    last / first-after-warm-up and ``flat`` (ratio <= ``limit``).  A process
    with no sample after the warm-up (it ended or started too late) is listed
    with ``flat`` None and does not decide the verdict.  ``total`` is the same
    for the sum over processes at each sample time.  ``flat`` overall: every
    judged process is flat (None if none could be judged).
    """
    cut = t_start + warmup * max(0.0, t_end - t_start)

    def judge(series: list[tuple[float, int]]) -> dict:
        within = [(t, kb) for t, kb in series if t <= t_end]
        after = [(t, kb) for t, kb in within if t >= cut]
        upto = within or series                     # figures of a process seen only later, unjudged
        row = {"samples": len(within), "first_kb": upto[0][1] if upto else None,
               "peak_kb": max((kb for _, kb in upto), default=None), "last_kb": upto[-1][1] if upto else None,
               "first_after_warmup_kb": after[0][1] if after else None, "ratio": None, "flat": None}
        if after and after[0][1]:
            row["ratio"] = round(after[-1][1] / after[0][1], 3)
            row["flat"] = row["ratio"] <= limit
        return row

    procs = []
    totals: dict[float, int] = {}
    for pid, row in sorted(samples.items()):
        procs.append({"pid": pid, "cmd": row["cmd"], **judge(row["samples"])})
        for t, kb in row["samples"]:
            totals[t] = totals.get(t, 0) + kb
    judged = [p["flat"] for p in procs if p["flat"] is not None]
    ratios = [p["ratio"] for p in procs if p["ratio"] is not None]
    return {
        "rule": RSS_RULE,
        "warmup_fraction": warmup,
        "limit": limit,
        "processes": procs,
        "total": judge(sorted(totals.items())),
        "max_ratio": max(ratios) if ratios else None,
        "flat": all(judged) if judged else None,
    }


# --------------------------------------------------------------------------- DNS


#: Domain families (``messages.Spec.family``) and the second octet of their exchanges' addresses:
#: ``d`` the loopback stages' M domains, ``s`` the slow exchanges, ``h`` the healthy domains of the
#: dead-exchange stage, ``x`` its dead exchanges (SYNs dropped, nothing listens), ``f`` the in-flight stage.
FAMILIES = {"d": 1, "s": 2, "h": 3, "x": 4, "f": 5}


def domain_address(j: int, family: str = "d") -> str:
    """The loopback address of domain ``j``'s exchange in ``family`` (127.<family>.x.y, 250 per /24)."""
    if j >= 250 * 250:
        raise ValueError("too many domains")
    return f"127.{FAMILIES[family]}.{j // 250}.{j % 250 + 1}"


def family_network(family: str) -> str:
    """The /16 holding every exchange address of ``family`` (for an nftables rule)."""
    return f"127.{FAMILIES[family]}.0.0/16"


#: TTL of every sandbox record (and the negative TTL): longer than any stage, so that the DNS
#: target of issue 5 (at most one query per name and type per TTL, across all workers) reads
#: "at most one query per name and type per stage".  mxq's own ceiling (MXQ_DNS_MAX_TTL) is 3600.
DNS_TTL = 3600


def zones(m: int | dict[str, int], ttl: int = DNS_TTL) -> dict:
    """The sandbox zone: each domain has one MX, ``mx.<domain>`` -> its own exchange address.

    ``m``: the number of ``d`` domains, or ``{family: count}`` for several families.
    """
    counts = {"d": m} if isinstance(m, int) else dict(m)
    records: dict[str, dict] = {}
    for family, count in counts.items():
        for j in range(count):
            records[messages.domain(j, family)] = {"MX": [[10, messages.exchange(j, family)]]}
            records[messages.exchange(j, family)] = {"A": [domain_address(j, family)]}
    return {"ttl": ttl, "records": records}


def dns_breakdown(stats: dict, top: int = 10) -> dict:
    """Per-(name, type) counts from the sandbox DNS server's stats (``DNSServerProcess.stats()``).

    ``{"max_per_name_type": k, "name_types": distinct "name TYPE" keys asked,
    "repeated": {"name TYPE": count}}`` -- ``repeated`` holds the ``top`` most
    asked keys asked more than once (empty when every key was asked at most once).
    """
    q = stats.get("queries") or {}
    rep = sorted(((k, v) for k, v in q.items() if v > 1), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"max_per_name_type": max(q.values(), default=0), "name_types": len(q), "repeated": dict(rep)}


def start_dns(m: int | dict[str, int], workdir: Path):
    """The sandbox DNS server process (mxq.sandbox.dns) on 127.0.0.53:53 serving ``zones(m)``."""
    try:
        from mxq.sandbox.dns import start_dns_server
    except ImportError as e:                       # pragma: no cover - the module is part of the repo
        raise BenchError(f"mxq.sandbox.dns is not importable: {e}") from e
    return start_dns_server(zones(m), host=DNS_HOST, port=53, workdir=workdir / "dns", timeout=20)


# --------------------------------------------------------------------------- Redis


@dataclass
class Redis:
    """A redis-server child process (no persistence) on 127.0.0.1."""

    proc: subprocess.Popen
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        """A redis-py client."""
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)

    def command_calls(self) -> tuple[int, dict[str, int]]:
        """Total command calls since the last CONFIG RESETSTAT, and the calls per command."""
        stats = self.client().info("commandstats")
        per = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        return sum(per.values()), per

    def used_memory(self) -> int:
        """INFO memory ``used_memory`` in bytes."""
        return int(self.client().info("memory")["used_memory"])

    def stop(self) -> None:
        """Stop the server."""
        stop(self.proc)


def start_redis(workdir: Path) -> Redis:
    """Start a fresh redis-server (``--save '' --appendonly no``) and wait until it answers PING."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server not found (apt-get install redis-server; ops/install-deps does it)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = spawn([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"],
                 log=workdir / "redis.log")
    wait_port("127.0.0.1", port, 10, proc)
    r = Redis(proc, port, workdir)
    deadline = time.monotonic() + 10
    while True:
        try:
            if r.client().ping():
                return r
        except Exception as e:                      # loading, or not yet accepting
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server did not answer PING: {e}") from e
            time.sleep(0.02)


# --------------------------------------------------------------------------- sinks


@dataclass
class Sink:
    """One smtp-sink process on ``address``:25 with its dump and counter files."""

    address: str
    dump: Path
    counters: Path
    proc: subprocess.Popen | None = None


@dataclass
class SinkFarm:
    """smtp-sink processes on the given loopback addresses, port 25.

    ``flags``: extra smtp-sink options for every sink, e.g. ``("-p", "-W", ".:1")``
    (no PIPELINING, the final dot answered after 1 s: a slow exchange).
    ``max_connections``: smtp-sink ``-m`` and the listen backlog.  An address
    of ``0.0.0.0`` listens on every local address (one sink for many
    exchanges); ``probe`` is then the address its readiness is checked on.
    """

    addresses: list[str]
    workdir: Path
    sinks: list[Sink] = field(default_factory=list)
    flags: tuple[str, ...] = ()
    max_connections: int = 1024
    probe: str | None = None

    def start(self, timeout: float = 10.0) -> "SinkFarm":
        """Start one smtp-sink per address and wait until each greets."""
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(exe):
            raise BenchError("smtp-sink not found (it comes with Debian's postfix package)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o777)               # smtp-sink runs as nobody and creates its dump files here
        for parent in self.workdir.resolve().parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise BenchError(f"{parent} is not searchable by {SINK_USER}: smtp-sink could not write its "
                                 f"dump below it (use sandbox.make_workdir())")
        for k, addr in enumerate(self.addresses):
            sdir = self.workdir / f"sink{k}"
            sdir.mkdir()
            os.chmod(sdir, 0o777)
            sink = Sink(addr, sdir / "dump", sdir / "counters")
            # -c counters on stdout; -D one dump file, each record preceded by the separator line;
            # backlog and -m max_connections (1024 by default): clients never wait on the sink.
            conns = str(self.max_connections)
            sink.proc = spawn([exe, "-u", SINK_USER, "-c", "-m", conns, "-D", str(sink.dump),
                               "-S", f"\\n{SEPARATOR}\\n", *self.flags, f"{addr}:25", conns], log=sink.counters)
            self.sinks.append(sink)
        for sink in self.sinks:
            probe = self.probe if sink.address == "0.0.0.0" and self.probe else sink.address
            wait_port(probe, 25, timeout, sink.proc, banner=b"220")
        return self

    def stop(self) -> None:
        """Stop every sink (SIGTERM; the dump files are complete once they exit)."""
        for sink in self.sinks:
            if sink.proc is not None:
                stop(sink.proc)

    def counter_total(self) -> int:
        """Sum of smtp-sink's own ``mesg=`` counters (each sink's last line)."""
        return sum(last_counter(sink.counters) for sink in self.sinks)

    def sessions_total(self) -> int:
        """Sum of smtp-sink's own ``sess=`` counters: the sessions that have ended (counted at disconnect)."""
        return sum(last_counter(sink.counters, "sess") for sink in self.sinks)


def last_counter(path: Path, name: str = "mesg") -> int:
    """The last ``NAME=N`` value (``mesg``, ``sess``, ``quit``) smtp-sink -c wrote to ``path`` (0 if none yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256))
            tail = f.read()
    except FileNotFoundError:
        return 0
    found = re.findall(rb"\b" + name.encode() + rb"=(\d+)", tail)
    return int(found[-1]) if found else 0


# --------------------------------------------------------------------------- monitor


_SEP = f"\n{SEPARATOR}\n"


class _Tail:
    """Incremental reader of one dump file: counts records, reads each record's header block once.

    Plain ``str.find`` (no per-line regex): the monitor shares the machine
    with the systems measured, so it must stay cheap.
    """

    def __init__(self, path: str, id_header: str, submitted_header: str | None):
        self.path = path
        self.f = None
        self.buf = ""
        self.in_record = False                 # buf starts right after a separator, header not yet read
        self.id_key = "\n" + id_header.lower() + ":"
        self.sub_key = "\n" + submitted_header.lower() + ":" if submitted_header else None
        self.records = 0
        self.bytes = 0

    def read(self, now: float, out: "_Tally") -> None:
        if self.f is None:
            try:
                self.f = open(self.path, "r", encoding="latin-1", newline="")
            except FileNotFoundError:
                return
        data = self.f.read()
        if not data:
            return
        self.bytes += len(data)
        buf = self.buf + data
        pos = 0
        while True:
            if not self.in_record:
                i = buf.find(_SEP, pos)
                if i < 0:
                    pos = max(pos, len(buf) - len(_SEP))     # a separator may straddle two reads
                    break
                self.records += 1
                out.records += 1
                pos = i + len(_SEP)
                self.in_record = True
            end = buf.find("\n\n", pos)                      # the header block ends at the empty line
            if end < 0:
                break
            head = "\n" + buf[pos:end + 1]
            self._header(head, head.lower(), now, out)
            pos = end + 1
            self.in_record = False
        self.buf = buf[pos:]

    def _header(self, head: str, lower: str, now: float, out: "_Tally") -> None:
        ident = _field(head, lower, self.id_key)
        if ident is None:
            return
        out.see(ident, now)
        if self.sub_key:
            sub = _field(head, lower, self.sub_key)
            try:
                out.submitted.setdefault(ident, float(sub))
            except (TypeError, ValueError):
                pass


def _field(head: str, lower: str, key: str) -> str | None:
    """The value of the header ``key`` ("\\nname:", lower case) in the header block ``head``, or None."""
    i = lower.find(key)
    if i < 0:
        return None
    j = head.find("\n", i + len(key))
    return head[i + len(key):j].strip()


class _Tally:
    """What the monitor has seen across all sinks."""

    def __init__(self):
        self.records = 0
        self.first_seen: dict[str, float] = {}
        self.duplicates: dict[str, int] = {}
        self.submitted: dict[str, float] = {}

    def see(self, ident: str, now: float) -> None:
        if ident in self.first_seen:
            self.duplicates[ident] = self.duplicates.get(ident, 0) + 1
        else:
            self.first_seen[ident] = now


def _monitor_main(conn, paths: list[str], counters: list[str], expected: int, id_header: str,
                  submitted_header: str | None, interval: float, follow: bool) -> None:
    tails = [_Tail(p, id_header, submitted_header) for p in paths]
    tally = _Tally()
    complete_at: float | None = None
    conn.send(("ready", time.time()))
    last_progress = 0.0
    while True:
        now = time.time()
        if follow:
            for t in tails:
                t.read(now, tally)
            count = tally.records
        else:
            count = sum(last_counter(Path(c)) for c in counters)
        if complete_at is None and count >= expected:
            complete_at = now
            conn.send(("complete", now))
        if now - last_progress >= 1.0:
            conn.send(("progress", count))
            last_progress = now
        if conn.poll(interval):
            msg = conn.recv()
            if msg == "finish":
                now = time.time()
                for t in tails:
                    t.read(now, tally)
                lat = [tally.first_seen[i] - s for i, s in tally.submitted.items()]
                conn.send(("result", {
                    "records": tally.records,
                    "per_sink_records": [t.records for t in tails],
                    "dump_bytes": sum(t.bytes for t in tails),
                    "unique_ids": len(tally.first_seen),
                    "duplicates": sum(tally.duplicates.values()),
                    "duplicate_ids": sorted(tally.duplicates)[:20],
                    "ids": sorted(tally.first_seen),
                    "arrivals": sorted(tally.first_seen.values()),
                    "latencies": lat,
                    "complete_at": complete_at,
                    "last_seen": max(tally.first_seen.values(), default=None),
                }))
                return


class Monitor:
    """The sink monitor process: counts records and ids in the dump files as they grow.

    ``expected``: the record count that completes the run.  ``id_header``:
    the header that names a message (``X-Bench-Id``, or ``Message-Id`` for
    smtp-source's own messages).  ``submitted_header``: the header holding the
    submission time.  With ``follow`` (the default) the dump files are read as
    they grow: each message is timestamped on arrival, so latency is known.
    Without it (``submitted_header`` must then be None) only smtp-sink's
    ``-c`` counters are polled during the run, which costs next to nothing,
    and the dumps are read once at ``finish()``: the identity checks are the
    same, there is no latency.
    """

    def __init__(self, farm: SinkFarm, expected: int, id_header: str = messages.ID_HEADER,
                 submitted_header: str | None = messages.SUBMITTED_HEADER, interval: float = 0.01,
                 follow: bool = True):
        if not follow and submitted_header:
            raise ValueError("latency needs follow=True")
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_monitor_main, daemon=True,
                                args=(child, [str(s.dump) for s in farm.sinks],
                                      [str(s.counters) for s in farm.sinks], expected, id_header,
                                      submitted_header, interval, follow))
        self.expected = expected
        self.progress = 0
        self.complete_at: float | None = None

    def start(self, timeout: float = 30.0) -> "Monitor":
        """Start the process and wait for it to be polling."""
        self.proc.start()
        kind, _ = self._recv(timeout)
        if kind != "ready":
            raise BenchError(f"monitor sent {kind} before ready")
        return self

    def _recv(self, timeout: float):
        if not self.conn.poll(timeout):
            if not self.proc.is_alive():
                raise BenchError(f"sink monitor died (exit {self.proc.exitcode})")
            raise BenchError(f"sink monitor silent for {timeout}s")
        return self.conn.recv()

    def wait_complete(self, timeout: float, alive=None, on_progress=None) -> float:
        """Block until the sinks hold ``expected`` records; return that moment (epoch seconds).

        ``alive()`` (optional) is called every second and may raise to abort
        (e.g. a worker process died).  Raises BenchError on timeout, with the
        count reached.
        """
        deadline = time.monotonic() + timeout
        while self.complete_at is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageTimeout(f"timed out after {timeout:.0f}s with {self.progress} of "
                                   f"{self.expected} messages at the sinks (about "
                                   f"{self.progress / timeout:.1f} msg/s; raise --timeout to finish the run)",
                                   self.progress, self.expected, timeout)
            if alive is not None:
                alive()
            if not self.conn.poll(min(1.0, left)):
                if not self.proc.is_alive():
                    raise BenchError(f"sink monitor died (exit {self.proc.exitcode})")
                continue
            kind, value = self.conn.recv()
            if kind == "progress":
                self.progress = value
                if on_progress:
                    on_progress(value)
            elif kind == "complete":
                self.complete_at = value
        return self.complete_at

    def finish(self, timeout: float = 60.0) -> dict:
        """Read the dump files to the end (call after the sinks stopped) and return the tally."""
        self.conn.send("finish")
        deadline = time.monotonic() + timeout
        while True:
            kind, value = self._recv(max(0.1, deadline - time.monotonic()))
            if kind == "complete" and self.complete_at is None:
                self.complete_at = value
            if kind == "result":
                self.proc.join(10)
                return value

    def kill(self) -> None:
        """Stop the process if it still runs."""
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# --------------------------------------------------------------------------- faults and sockets


NFT_TABLE = "mxq_bench"


def drop_syns(network: str) -> None:
    """Drop every TCP SYN to ``network`` port 25 (nftables, this network namespace only): dead exchanges.

    A connect() there is never answered (no RST, no ICMP): the client waits
    for its own connect timeout, as with an exchange whose firewall drops
    traffic.  ``allow_syns()`` removes the rule.
    """
    if not in_namespace():
        raise BenchError("refusing to add nftables rules outside the benchmark's network namespace")
    if shutil.which("nft") is None:
        raise BenchError("nft not found (apt-get install nftables; ops/install-deps does it)")
    script = (f"add table inet {NFT_TABLE}\n"
              f"add chain inet {NFT_TABLE} out {{ type filter hook output priority 0 ; }}\n"
              f"add rule inet {NFT_TABLE} out ip daddr {network} tcp dport 25 tcp flags syn counter drop\n")
    out = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"nft failed: {out.stderr.strip()}")


def dropped_syns() -> int | None:
    """SYN packets the ``drop_syns`` rule has dropped so far (retransmissions included), None without the rule."""
    if not (in_namespace() and shutil.which("nft")):
        return None
    out = subprocess.run(["nft", "list", "table", "inet", NFT_TABLE], capture_output=True, text=True)
    m = re.search(r"counter packets (\d+)", out.stdout) if out.returncode == 0 else None
    return int(m.group(1)) if m else None


def connecting(network: str, port: int = 25) -> int:
    """Client sockets in this network namespace waiting for a SYN-ACK (SYN-SENT) to ``network``:``port`` (IPv4).

    A connection to an exchange whose SYNs are dropped stays SYN-SENT until
    the client's connect timeout: this counts the connection attempts stuck on
    dead exchanges at one moment.
    """
    net = ipaddress.ip_network(network)
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                parts = line.split(None, 4)
                if len(parts) < 4 or parts[3] != "02":
                    continue
                addr, _, rport = parts[2].partition(":")
                ip = ipaddress.IPv4Address(int(addr, 16).to_bytes(4, "little"))
                if int(rport, 16) == port and ip in net:
                    n += 1
    except OSError:
        return 0
    return n


def allow_syns() -> None:
    """Remove the benchmark's nftables table (if there is one)."""
    if in_namespace() and shutil.which("nft"):
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True)


def established(port: int = 25) -> int:
    """TCP connections ESTABLISHED on local ``port`` (server side) in this network namespace, IPv4 and IPv6."""
    hexport = f":{port:04X}"
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split(None, 4)
                    if len(parts) > 3 and parts[1].endswith(hexport) and parts[3] == "01":
                        n += 1
        except OSError:
            continue
    return n


# --------------------------------------------------------------------------- misc


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values`` by the nearest-rank method (None if empty)."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q * len(v)) - 1))
    return v[k]


def make_workdir(base: str | None = None) -> Path:
    """A fresh working directory on tmpfs (/dev/shm) if present: sink dumps then cost no disk I/O."""
    root = base or ("/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None)
    path = Path(tempfile.mkdtemp(prefix="mxq-bench-", dir=root))
    os.chmod(path, 0o755)           # smtp-sink (as nobody) must reach its dump directory below
    return path


def json_dump(data, path: Path) -> None:
    """Write ``data`` as indented JSON: atomically (temp file + rename) for a regular file.

    Anything else that exists (``/dev/null``, ``/dev/stdout``, a FIFO) is
    written in place: renaming over it would replace the device node itself.
    """
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if path.exists() and not path.is_file():
        with open(path, "w") as f:
            f.write(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def python() -> str:
    """The interpreter running the benchmark (the project venv's)."""
    return sys.executable

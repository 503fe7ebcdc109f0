"""The benchmark's stages: one function per contender, each returning a result dict.

Every stage sends the same ``Spec`` messages (the limit stage excepted:
smtp-source makes its own) to fresh smtp-sink processes and is timed from
its first submission until the sink monitor has seen every message at the
sinks.  Setup (starting Redis, workers, Postfix, the sinks) is not timed.
After completion the stage waits ``settle`` seconds (not timed) so that a
late duplicate would still be counted, then stops the sinks and reads their
dump files to the end.

A stage that cannot run or does not finish raises ``BenchError``; ``run()``
turns that into ``{"status": "failed", "error": ...}`` with every other field
null, never into made-up numbers.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import messages, sandbox
from .messages import Spec
from .postfix import LISTEN as POSTFIX_LISTEN, Postfix
from .sandbox import BenchError, Monitor, SinkFarm, StageTimeout

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"

# Every stage result has exactly these keys (null when not applicable or failed).
RESULT_FIELDS = (
    "status", "error", "messages", "seconds", "msgs_per_sec", "submit_seconds",
    "latency_ms", "sinks", "dns_queries", "redis", "workers", "harness_cpu_seconds", "notes",
    "dns", "steady", "backlog", "partial", "slow", "dead", "inflight", "wall_seconds", "timeline", "rounds", "round",
)
#: ``partial`` of a stage that broke off (its other fields null): how far it got.
PARTIAL_FIELDS = ("at_sinks", "expected", "seconds", "msgs_per_sec")
DNS_FIELDS = ("max_per_name_type", "name_types", "repeated")
STEADY_FIELDS = ("rate_target", "rate_achieved", "late_submissions", "max_lag_ms", "submit_call_ms",
                 "monitor_interval_ms")
BACKLOG_FIELDS = ("messages", "batch", "content_bytes", "submit_seconds", "redis_used_memory_baseline",
                  "redis_used_memory_queued", "redis_used_memory_drained", "redis_memory_per_content_byte",
                  "redis_bytes_per_message", "drain_seconds", "drain_msgs_per_sec", "rss")
SINK_FIELDS = ("records", "smtp_sink_counter", "sessions", "unique_ids", "duplicates", "missing", "unexpected",
               "exactly_once", "bytes_per_record", "sinks")
REDIS_FIELDS = ("commands_total", "commands_per_message", "top_commands", "memory_per_queued_message",
                "memory_probe_messages", "tasks", "tasks_per_message")


@dataclass
class Context:
    """What every stage needs: sizes, the sandbox DNS server, a work directory, a logger."""

    n: int
    m: int
    size: int
    run: str
    workdir: Path
    dns: object                       # mxq.sandbox.dns.DNSServerProcess
    timeout: float                    # seconds for a stage's messages to reach the sinks
    settle: float                     # seconds waited after completion for late duplicates
    say: Callable[[str], None]
    postfix_clients: int = 8
    limit_sessions: int = 20
    batch: int = 100
    mxq_workers: int = 1
    mxq_concurrency: int | None = None  # `mxq worker -c` (None: no flag, the worker's default)
    mxq_pool: str | None = None         # `mxq worker -P` (None: no flag, the worker's default)
    probe: int = 1000                 # messages queued (no worker running) to measure Redis memory
    postfix_dns: str = "direct"       # direct: Postfix asks the sandbox DNS; dnsmasq: through a caching dnsmasq
    resolv_conf: Path | None = None   # the bind-mounted /etc/resolv.conf (rewritten in place)
    steady_n: int = 1000              # messages of the steady-rate stage
    steady_rate: float = 100.0        # ... submitted at this many per second
    backlog_n: int = 100000           # messages queued with no worker running in the backlog stage
    rss_interval: float = 0.5         # seconds between worker RSS samples while the backlog drains
    timeout_explicit: bool = False    # --timeout given: it applies to every stage as it is
    slow_domains: int = 50            # slow stage: domains, each with its own slow sink
    slow_per_domain: int = 20         # ... messages per domain
    slow_delay: int = 1               # ... seconds each sink waits before answering the final dot
    slow_concurrency: int = 20        # the per-destination connection limit the ideal assumes (MXQ_SHAPING 20c)
    dead_healthy_domains: int = 50    # dead stage: instant (healthy) domains
    dead_per_domain: int = 40         # ... messages per domain, healthy and dead alike
    dead_domains: int = 5             # ... domains whose exchange drops every SYN
    dead_connect_timeout: float | None = None   # None: mxq's and Postfix's default (30 s)
    dead_pairs: int = 6               # ... mxq runs without / with the dead domains, pairs in alternating order
    dead_base: dict | None = None     # ... the dead_mxq_base run's figures (its first pair's first half)
    inflight_n: int = 1000            # inflight stage: deliveries, all meant to be in flight at once
    inflight_domains: int = 200       # ... over this many domains (5 each: Postfix's initial concurrency)
    inflight_delay: int = 5           # ... seconds the sink waits before answering each final dot
    inflight_interval: float = 0.25   # ... seconds between RSS / connection samples
    round: int = 0                    # the loopback stages' round (cli --rounds): 0 alone, else 1, 2...

    def spec(self, stage: str, count: int | None = None, domains: int | None = None, family: str = "d") -> Spec:
        """The messages of ``stage`` (ids unique per run and stage); ``count`` defaults to ``n``, ``domains`` to ``m``."""
        return Spec(f"{self.run}-{stage}{self.suffix}", self.n if count is None else count, self.m if domains is None else domains,
                    self.size, family)

    def worker_flags(self) -> list[str]:
        """The tuning flags given to every ``mxq worker`` (none by default: the worker's defaults)."""
        out = []
        if self.mxq_pool:
            out += ["-P", self.mxq_pool]
        if self.mxq_concurrency:
            out += ["-c", str(self.mxq_concurrency)]
        return out

    def timeout_for(self, count: int) -> float:
        """Seconds a stage of ``count`` messages may take: --timeout if given, else 60 + count/20."""
        return self.timeout if self.timeout_explicit else 60 + count / 20

    @property
    def suffix(self) -> str:
        """What tells a round's directories and message ids from another round's: "" or ".r<round>"."""
        return f".r{self.round}" if self.round else ""

    def stage_dir(self, stage: str) -> Path:
        """A fresh directory for ``stage`` (one per round)."""
        d = self.workdir / f"{stage}{self.suffix}"
        d.mkdir(parents=True, exist_ok=True)
        return d


def empty_result() -> dict:
    """A result with every field null."""
    return {k: None for k in RESULT_FIELDS}


def run(name: str, fn: Callable[[Context], dict], ctx: Context) -> dict:
    """Run one stage; a failure becomes ``status: failed`` with the reason, and is printed loudly."""
    ctx.say(f"== {name}")
    try:
        res = fn(ctx)
        res["status"] = "ok"
        return res
    except BenchError as e:
        res = empty_result()
        res.update(status="failed", error=str(e), partial=_partial(e))
    except Exception as e:                         # a harness bug must not hide the other stages
        res = empty_result()
        res.update(status="failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        try:
            sandbox.stop_all()
        except Exception as e:                     # reported, and cli.main tries again at the end
            ctx.say(f"!! {name}: stopping its processes failed: {e}")
    ctx.say(f"!! {name} FAILED: {res['error']}")
    return res


def _partial(e: BenchError) -> dict | None:
    """What a stage that broke off had measured: the sink count at its timeout, and whatever it attached."""
    out = dict(e.partial or {})
    if isinstance(e, StageTimeout):
        out.update(at_sinks=e.progress, expected=e.expected, seconds=round(e.seconds, 3),
                   msgs_per_sec=round(e.progress / e.seconds, 1) if e.seconds > 0 else None)
    return out or None


# --------------------------------------------------------------------------- common measurement


class Measure:
    """Sinks + monitor for one stage; ``finish()`` turns what the sinks saw into the result fields."""

    def __init__(self, ctx: Context, stage: str, addresses: list[str], id_header: str = messages.ID_HEADER,
                 submitted_header: str | None = messages.SUBMITTED_HEADER, *, count: int | None = None,
                 interval: float | None = None, timeout: float | None = None, sink_flags: tuple = (),
                 max_connections: int = 1024, probe: str | None = None, reply_delay: float = 0.0):
        self.ctx = ctx
        # Sinks that wait before answering the final dot (smtp-sink -W .:N) dump and count a message
        # when its dot arrives, and answer it reply_delay s later: that is when it is accepted.
        self.reply_delay = reply_delay
        self.stage = stage
        self.n = ctx.n if count is None else count            # messages that complete the stage
        self.timeout = ctx.timeout if timeout is None else timeout
        self.farm = SinkFarm(addresses, ctx.stage_dir(stage) / "sinks", flags=tuple(sink_flags),
                             max_connections=max_connections, probe=probe).start()
        # Without a submission time there is no latency to take: poll smtp-sink's counters only.
        # Poll interval: 10 ms for a few sinks, 20 ms for many (each poll reads every dump file);
        # the latency resolution, so a stage judged on latency may ask for finer.
        self.interval = interval if interval is not None else (0.01 if len(addresses) <= 10 else 0.02)
        self.monitor = Monitor(self.farm, self.n, id_header, submitted_header, interval=self.interval,
                               follow=submitted_header is not None).start()
        self.t0: float | None = None
        self.cpu0: dict = {}
        self.cpu: dict = {}
        self.t_submitted: float | None = None
        self.t_counted: float | None = None
        self.t_done: float | None = None

    def _cpu(self) -> dict:
        return {
            "dns_server": sandbox.cpu_seconds(self.ctx.dns.proc.pid),
            "sinks": sum(sandbox.cpu_seconds(s.proc.pid) for s in self.farm.sinks),
            "monitor": sandbox.cpu_seconds(self.monitor.proc.pid),
            "submitting_process": sum(os.times()[:2]),
        }

    def begin(self, reset_dns: bool = True) -> float:
        """Mark the first submission (call right before it) and reset the DNS counters first."""
        if reset_dns:
            self.ctx.dns.reset_stats()
        self.cpu0 = self._cpu()
        self.t0 = time.time()
        return self.t0

    def submitted(self) -> None:
        """Mark the end of submission."""
        self.t_submitted = time.time()

    def spec_begins(self, spec: Spec, submit: list[Spec], counted: list[Spec]) -> None:
        """Mark ``spec``'s first submission: when it is counted and mail not counted went before it,
        the counted mail is timed from here (the first such mark holds)."""
        if self.t_counted is None and spec in counted and spec is not submit[0]:
            self.t_counted = time.time()

    def wait(self, alive: Callable[[], None] | None = None) -> float:
        """Wait until every message is at the sinks; return the elapsed seconds since ``begin``."""
        last = [time.monotonic()]

        def progress(k: int) -> None:
            if time.monotonic() - last[0] >= 5:
                self.ctx.say(f"   {k}/{self.n} at the sinks")
                last[0] = time.monotonic()

        self.t_done = self.monitor.wait_complete(self.timeout, alive=alive, on_progress=progress)
        if self.reply_delay:
            # The last message is accepted when the sink answers its dot: wait for that too, so
            # that the sender sees every reply before the sinks are stopped.
            self.t_done += self.reply_delay
            while time.time() < self.t_done + 0.05:
                if alive is not None:
                    alive()
                time.sleep(min(0.1, max(0.0, self.t_done + 0.05 - time.time())))
        cpu1 = self._cpu()
        self.cpu = {k: round(cpu1[k] - self.cpu0[k], 2) for k in cpu1}
        return self.t_done - self.t0

    def finish(self, expected_ids: set[str] | None) -> dict:
        """Settle, stop the sinks, read the dumps: the timing, latency, sink and DNS fields."""
        time.sleep(self.ctx.settle)
        dns_stats = self.ctx.dns.stats()
        dns_queries = dns_stats["total"]
        # Sessions the sinks accepted: smtp-sink's -c counts a session when it ends, so add those still open.
        sessions = self.farm.sessions_total() + sandbox.established(25)
        self.farm.stop()
        tally = self.monitor.finish()
        self.tally = tally
        counter = self.farm.counter_total()
        seen = set(tally["ids"])
        if expected_ids is not None:
            missing = len(expected_ids - seen)
            unexpected = len(seen - expected_ids)
        else:
            missing = max(0, self.n - len(seen))
            unexpected = 0
        n = self.n
        exactly_once = (tally["records"] == n and counter == n and len(seen) == n
                        and tally["duplicates"] == 0 and missing == 0 and unexpected == 0)
        # Mail not counted submitted first (the dead stage's dead domains): the counted mail's rate is
        # timed from its own first submission; the figure from the very first is kept beside it.
        seconds = self.t_done - (self.t_counted or self.t0)
        lat = [x + self.reply_delay for x in tally["latencies"]]
        res = empty_result()
        res.update(
            messages=n,
            seconds=round(seconds, 3),
            msgs_per_sec=(round(n / seconds, 1 if n / seconds >= 100 else 3)) if seconds > 0 else None,
            submit_seconds=round(self.t_submitted - self.t0, 3) if self.t_submitted else None,
            latency_ms=({
                "p50": round(sandbox.percentile(lat, 0.50) * 1000, 1),
                "p99": round(sandbox.percentile(lat, 0.99) * 1000, 1),
                "max": round(max(lat) * 1000, 1),
                "samples": len(lat),
                "resolution_ms": round(self.interval * 1000),
            } if lat else None),
            sinks={
                "records": tally["records"],
                "smtp_sink_counter": counter,
                "sessions": sessions,
                "unique_ids": len(seen),
                "duplicates": tally["duplicates"],
                "missing": missing,
                "unexpected": unexpected,
                "exactly_once": exactly_once,
                "bytes_per_record": round(tally["dump_bytes"] / tally["records"]) if tally["records"] else None,
                "sinks": len(self.farm.sinks),
            },
            dns_queries=dns_queries,
            dns=sandbox.dns_breakdown(dns_stats),
            harness_cpu_seconds=self.cpu,
            notes=[],
            timeline=timeline(tally["arrivals"], self.t0, self.t_submitted, self.t_counted, self.t_done, n),
        )
        if self.reply_delay:
            res["notes"].append(f"the sinks answer each final dot {self.reply_delay:g} s after it arrives: a message "
                                f"counts as accepted then (arrival at the sink + {self.reply_delay:g} s)")
        if not exactly_once:
            res["notes"].append(f"NOT exactly once: {res['sinks']}; duplicate ids e.g. {tally['duplicate_ids'][:5]}")
        return res

    def abort(self) -> None:
        """Stop the sinks and the monitor after a failure."""
        self.farm.stop()
        self.monitor.kill()


def timeline(arrivals: list[float], t0: float, t_submitted: float | None,
             t_counted: float | None = None, t_done: float | None = None,
             n: int | None = None) -> dict | None:
    """When the messages reached the sinks, from the first submission (``t0``): the first arrival,
    the end of submission, when a tenth, a quarter, half, three quarters and nine tenths had arrived
    (``quantiles_s``), and arrivals per second (``per_second[i]``: in second i after t0); when mail
    not counted was submitted first, when the counted mail's submission began (``counted_from_s``)
    and, with ``t_done`` (all ``n`` counted messages accepted), the figures timed from the very first
    submission (``seconds_from_first_submission``, ``msgs_per_sec_from_first_submission``)."""
    if not arrivals:
        return None
    per = [0] * (int(max(arrivals[-1] - t0, 0.0)) + 1)
    for a in arrivals:
        per[max(0, int(a - t0))] += 1
    return {"first_arrival_s": round(arrivals[0] - t0, 3),
            "submitted_s": round(t_submitted - t0, 3) if t_submitted else None,
            "quantiles_s": [round(arrivals[min(len(arrivals) - 1, int(q * len(arrivals)))] - t0, 3)
                            for q in (0.1, 0.25, 0.5, 0.75, 0.9)],
            "per_second": per,
            **(_from_first(len(arrivals) if n is None else n, t0, t_counted, t_done) if t_counted else {})}


def _from_first(n: int, t0: float, t_counted: float, t_done: float | None) -> dict:
    """``timeline``'s fields for counted mail submitted after mail not counted."""
    out = {"counted_from_s": round(t_counted - t0, 3)}
    if t_done is not None and t_done > t0:
        out.update(seconds_from_first_submission=round(t_done - t0, 3),
                   msgs_per_sec_from_first_submission=round(n / (t_done - t0), 1))
    return out


def redis_fields(r: sandbox.Redis, delivered: int, mem_per_msg: float | None, probe: int | None) -> dict:
    """Redis command counts since the last RESETSTAT, per delivered message, plus the memory probe."""
    total, per = r.command_calls()
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:12])
    return {
        "commands_total": total,
        "commands_per_message": round(total / delivered, 2) if delivered else None,
        "top_commands": top,
        "memory_per_queued_message": round(mem_per_msg) if mem_per_msg is not None else None,
        "memory_probe_messages": probe,
        "tasks": None,                  # the mxq stage: task_fields()
        "tasks_per_message": None,
    }


_TASK_RECEIVED = re.compile(r"Task (mxq\.[a-z_]+)\[[^\]]*\] received")


def task_fields(procs: list[tuple], delivered: int) -> dict:
    """Celery tasks the workers ran (``Task NAME[id] received`` lines of their logs, ``-l INFO``):
    ``tasks`` by name and ``tasks_per_message`` (all of them over the delivered messages).  A task
    costs 2-3 ms of worker CPU and a dozen Redis commands (publish, receive, events, ack), so
    this is the figure behind much of the commands per message."""
    by: dict[str, int] = {}
    for _, log, _ in procs:
        try:
            text = Path(log).read_text(errors="replace")
        except OSError:
            continue
        for m in _TASK_RECEIVED.finditer(text):
            by[m.group(1)] = by.get(m.group(1), 0) + 1
    total = sum(by.values())
    return {"tasks": dict(sorted(by.items())),
            "tasks_per_message": round(total / delivered, 4) if delivered else None}


def worker_fields(pids: list[int]) -> list[dict]:
    """Peak RSS of each worker process (main and pool children)."""
    return sandbox.peak_rss(pids)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(OPS), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _wait_log(path: Path, needle: str | Callable[[str], bool], proc: subprocess.Popen, timeout: float) -> None:
    """Wait until ``path`` holds ``needle`` (or ``needle(text)`` is true); BenchError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[:4]} exited ({proc.returncode}): {path.read_text(errors='replace')[-3000:]}")
        try:
            text = path.read_text(errors="replace")
            if needle(text) if callable(needle) else needle in text:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{proc.args[:4]} not ready within {timeout}s: {path.read_text(errors='replace')[-3000:]}")


# --------------------------------------------------------------------------- limit


def limit(ctx: Context) -> dict:
    """smtp-source straight into one smtp-sink: the loopback SMTP limit of this machine.

    ``smtp-source -s SESSIONS -m N -l PAYLOAD``: SESSIONS parallel sessions,
    a new connection per message (as in the reference figures), one
    recipient, PAYLOAD bytes of body so the message is about S bytes.  The
    messages are smtp-source's own; identity at the sink is its Message-Id.
    """
    meas = Measure(ctx, "limit", [sandbox.LIMIT_SINK], id_header="Message-Id", submitted_header=None)
    try:
        payload = max(1, ctx.size - 150)           # smtp-source adds about 150 bytes of headers
        argv = ["smtp-source", "-s", str(ctx.limit_sessions), "-m", str(ctx.n), "-l", str(payload),
                "-f", messages.SENDER, "-t", f"u0@{messages.domain(0)}", "-M", "source.bench.test",
                f"{sandbox.LIMIT_SINK}:25"]
        log = ctx.stage_dir("limit") / "smtp-source.log"
        meas.begin()
        proc = sandbox.spawn(argv, log=log)

        def alive() -> None:
            if proc.poll() not in (None, 0):
                raise BenchError(f"smtp-source failed ({proc.returncode}): {log.read_text()[-2000:]}")

        meas.wait(alive)
        proc.wait(30)
        meas.submitted()
        alive()
        res = meas.finish(None)
        res["notes"].append(f"smtp-source -s {ctx.limit_sessions} -m {ctx.n} -l {payload}, "
                            f"a new connection per message, one sink")
        return res
    except BaseException:
        meas.abort()
        raise


# --------------------------------------------------------------------------- Postfix


def postfix(ctx: Context) -> dict:
    """Postfix 3.7 end to end: our SMTP clients -> its smtpd -> its queue -> its smtp client -> the sinks.

    The same N messages as mxq, submitted over ``postfix_clients`` parallel
    SMTP connections (each reused for its share of the messages); Postfix
    routes each by an MX lookup against the sandbox DNS server.
    """
    spec = ctx.spec("postfix")
    return postfix_deliver(ctx, "postfix", [spec], [spec], [sandbox.domain_address(j) for j in range(ctx.m)],
                           dnsmasq=ctx.postfix_dns == "dnsmasq")


def postfix_deliver(ctx: Context, stage: str, submit: list[Spec], counted: list[Spec], addrs: list[str], *,
                    sink_flags: tuple = (), reply_delay: float = 0.0, main_cf: str = "", dnsmasq: bool = False) -> dict:
    """Submit ``submit``'s messages (one spec after the other) into a fresh Postfix; time ``counted``'s.

    Sinks listen on ``addrs`` (with ``sink_flags``); the stage completes when
    every message of ``counted`` is at the sinks, timed from their first
    submission.  Messages of a spec not counted (dead domains) are submitted
    all the same, before the next spec's (``Measure.spec_begins``); ``main_cf`` is appended to Postfix's main.cf.
    """
    st = ctx.stage_dir(stage)
    count = sum(s.count for s in counted)
    total = sum(s.count for s in submit)
    meas = Measure(ctx, stage, addrs, count=count, timeout=ctx.timeout_for(total), sink_flags=sink_flags,
                   reply_delay=reply_delay)
    pf = Postfix(st, main_cf_extra=main_cf)
    try:
        if dnsmasq:
            _dnsmasq(ctx, st)
        pf.start()
        bodies = [s.body() for s in submit]
        errors: list[str] = []
        # Every client finishes its share of one spec before any starts the next: a spec is
        # submitted whole before the next one (the dead domains' mail first, as the issue says).
        barrier = threading.Barrier(ctx.postfix_clients)

        def client(k: int) -> None:
            try:
                with smtplib.SMTP(POSTFIX_LISTEN, 25, local_hostname="client.bench.test", timeout=60) as s:
                    for spec, body in zip(submit, bodies):
                        meas.spec_begins(spec, submit, counted)
                        for i in range(k, spec.count, ctx.postfix_clients):
                            s.sendmail(messages.SENDER, [spec.recipient(i)], spec.render(i, time.time(), body))
                        barrier.wait(ctx.timeout)
            except Exception as e:
                errors.append(f"client {k}: {type(e).__name__}: {e}")
                barrier.abort()

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(ctx.postfix_clients)]
        meas.begin()
        for t in threads:
            t.start()

        def alive() -> None:
            if errors:
                raise BenchError(f"submission to Postfix failed: {errors[:3]}")

        def progress_wait() -> None:
            for t in threads:
                t.join(ctx.timeout)
            meas.submitted()

        waiter = threading.Thread(target=progress_wait, daemon=True)
        waiter.start()
        try:
            meas.wait(alive)
        except StageTimeout as e:
            e.args = (f"{e}; Postfix queue holds {pf.queue_size()}; log tail: {pf.log_text()[-1500:]}",)
            raise
        except BenchError as e:
            raise BenchError(f"{e}; Postfix queue holds {pf.queue_size()}; log tail: "
                             f"{pf.log_text()[-1500:]}") from None
        waiter.join(ctx.timeout)
        alive()
        workers = worker_fields(pf.processes())
        queued = pf.queue_size()
        res = meas.finish({i for s in counted for i in s.ids()})
        res["workers"] = workers
        res["notes"].append(f"{ctx.postfix_clients} submitting SMTP connections; queue on disk "
                            f"({pf.spool}); MX lookups via /etc/resolv.conf -> sandbox DNS"
                            + (f"; {queued} messages still queued at the end" if queued else ""))
        return res
    except BaseException:
        meas.abort()
        raise
    finally:
        pf.stop()
        if ctx.resolv_conf is not None:
            sandbox.write_resolv_conf(ctx.resolv_conf, sandbox.DNS_HOST)


CACHE_DNS = "127.0.0.1"


def _dnsmasq(ctx: Context, st: Path) -> None:
    """A caching dnsmasq on 127.0.0.1:53 in front of the sandbox DNS server, named in /etc/resolv.conf.

    Postfix has no DNS cache of its own: in production it sits behind a
    caching resolver.  With it, the sandbox server counts only cache misses,
    as it does for mxq (which caches in Redis).
    """
    import shutil as _sh
    exe = _sh.which("dnsmasq")
    if exe is None:
        raise BenchError("--postfix-dns dnsmasq needs dnsmasq (apt-get install dnsmasq-base)")
    proc = sandbox.spawn([exe, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                          "--user=root", "--pid-file=", "--bind-interfaces", f"--listen-address={CACHE_DNS}",
                          "--port=53", f"--server={sandbox.DNS_HOST}#53", "--cache-size=10000", "--cache-rr=MX",
                          "--log-facility=-"], log=st / "dnsmasq.log")
    import dns.resolver as _r                      # dnspython: check it answers before Postfix relies on it
    res = _r.Resolver(configure=False)
    res.nameservers = [CACHE_DNS]
    deadline = time.monotonic() + 10
    while True:
        try:
            res.resolve(messages.domain(0), "MX", lifetime=1)
            break
        except Exception as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"dnsmasq did not answer: {e}: {(st / 'dnsmasq.log').read_text()[-1000:]}")
            time.sleep(0.05)
    sandbox.write_resolv_conf(ctx.resolv_conf, CACHE_DNS)


# --------------------------------------------------------------------------- django-celery-email


def django_celery_email(ctx: Context) -> dict:
    """django-celery-email 3.0: ``send_messages`` of N messages, Celery prefork -c 2 on Redis, chunk 10.

    Django's SMTP backend hands every message to one smtp-sink (it has no MX
    routing).  Before the timed run, ``probe`` messages are queued with no
    worker running to measure Redis memory per queued message, then the
    database is flushed.
    """
    st = ctx.stage_dir("django")
    meas = Measure(ctx, "django", [sandbox.LIMIT_SINK])
    try:
        r = sandbox.start_redis(st / "redis")
        os.environ["BENCH_DJ_BROKER"] = r.url
        os.environ["BENCH_DJ_SINK"] = sandbox.LIMIT_SINK
        os.environ["BENCH_DJ_CHUNK"] = "10"
        try:
            from . import djapp
        except ImportError as e:
            raise BenchError(f"django / django-celery-email not installed ({e}); "
                             f"pip install -e '.[bench]' (ops/bench does it)") from e
        from django.core.mail import EmailMessage
        if djapp.app.conf.broker_url != r.url:        # imported earlier in this process: re-point it
            djapp.app.conf.broker_url = r.url
            djapp.app.pool.force_close_all()
            djapp.app._pool = None                   # a closed pool refuses every acquire: a new one,
            djapp.app.amqp._producer_pool = None     # and producers on it, for the new broker (--rounds)
        spec = ctx.spec("django")
        body = spec.body().replace("\r\n", "\n")

        def emails(idx: range, submitted: float) -> list:
            return _django_emails(EmailMessage, spec, idx, submitted, body)

        # Redis memory per queued message: queue a warm-up chunk, measure, queue `probe` more, measure.
        client = r.client()
        djapp.send(emails(range(10), time.time()))
        before = r.used_memory()
        probe = min(ctx.probe, ctx.n)
        djapp.send(emails(range(probe), time.time()))
        mem_per_msg = (r.used_memory() - before) / probe
        client.flushall()

        log = st / "celery-worker.log"
        worker = sandbox.spawn([sys.executable, "-m", "celery", "-A", "bench_lib.djapp", "worker", "-c", "2",
                                "--pool", "prefork", "-n", "djbench@%h", "-l", "info"],
                               log=log, env=_env(), cwd=str(ROOT), session=True)
        _wait_log(log, " ready.", worker, 60)
        client.config_resetstat()

        def alive() -> None:
            if worker.poll() is not None:
                raise BenchError(f"celery worker exited ({worker.returncode}): {log.read_text()[-2000:]}")

        t0 = meas.begin()
        queued = djapp.send(emails(range(spec.count), t0))
        meas.submitted()
        meas.wait(alive)
        redis_res = redis_fields(r, ctx.n, mem_per_msg, probe)
        workers = worker_fields(sandbox.process_tree(worker.pid))
        res = meas.finish(spec.ids())
        res["redis"] = redis_res
        res["workers"] = workers
        res["notes"].append(f"{queued} tasks of up to 10 messages; celery -c 2 --pool prefork; "
                            f"Django SMTP backend -> one smtp-sink")
        sandbox.stop(worker)
        r.stop()
        return res
    except BaseException:
        meas.abort()
        raise


# --------------------------------------------------------------------------- mxq


def _mxq_modules():
    """``(tasks, mxq.tasks.app module, worker_argv, scheduler_argv)``, or BenchError if the pipeline is unusable."""
    try:
        import importlib
        from mxq import tasks                             # noqa: F401
        from mxq.tasks.cli import scheduler_argv
        app_module = importlib.import_module("mxq.tasks.app")
    except Exception as e:                                # ImportError, or a half-landed pipeline
        raise BenchError(f"the mxq pipeline is not usable: {type(e).__name__}: {e}") from e
    return tasks, app_module, mxq_worker_argv, scheduler_argv


def mxq_worker_argv(extra: list[str]) -> list[str]:
    """``mxq worker EXTRA``: the command a user runs (whatever it starts: Celery, or a supervisor of several)."""
    return [sys.executable, "-m", "mxq.tasks.cli", "worker", *extra]


_PROCESSES = re.compile(r"mxq worker: (\d+) process")


def worker_ready(text: str) -> bool:
    """Whether ``mxq worker``'s log says every process it started is ready.

    Celery logs ``<node> ready.`` once per worker process; a ``mxq worker``
    that starts several says how many first (``mxq worker: N process(es) ...``).
    """
    m = _PROCESSES.search(text)
    return text.count(" ready.") >= (int(m.group(1)) if m else 1)


def _mxq_redis(ctx: Context, st: Path, app_module) -> tuple[sandbox.Redis, dict]:
    """A fresh Redis for one mxq stage; this process (the producer) pointed at it; the workers' env."""
    r = sandbox.start_redis(st / "redis")
    env = _env()
    env.update({
        "MXQ_REDIS_URL": r.url,
        "MXQ_DNS_SERVERS": ctx.dns.address,
        "MXQ_HELO_NAME": "mxq.bench.test",
        "MXQ_ALLOW_PRIVATE_DESTINATIONS": "1",        # the bench's exchanges are on loopback
        "PYTHONUNBUFFERED": "1",
    })
    os.environ.update({k: env[k] for k in ("MXQ_REDIS_URL", "MXQ_DNS_SERVERS", "MXQ_HELO_NAME",
                                           "MXQ_ALLOW_PRIVATE_DESTINATIONS")})
    app_module.rebind(r.url)
    return r, env


def _start_mxq(ctx: Context, st: Path, env: dict, worker_argv, scheduler_argv, on_spawn=None) -> list[tuple]:
    """Start ``mxq_workers`` workers and ``mxq scheduler``; wait until each is ready.

    Returns ``[(Popen, log, ready-needle)]``, the workers first and the scheduler last.
    ``on_spawn(worker_pids)`` is called once every worker has been spawned,
    before the readiness wait (the backlog stage starts its clock there).
    """
    procs = []
    for w in range(ctx.mxq_workers):
        log = st / f"worker{w}.log"
        extra = ["-n", f"bench{w}@%h", "-l", "INFO", *ctx.worker_flags()]
        p = sandbox.spawn(worker_argv(extra), log=log, env=env, cwd=str(ROOT), session=True)
        procs.append((p, log, worker_ready))
    beat_dir = st / "beat"
    beat_dir.mkdir()
    beat = sandbox.spawn(scheduler_argv(["--schedule", str(beat_dir / "schedule"), "-l", "INFO",
                                         "--pidfile="]), log=st / "beat.log", env=env, cwd=str(ROOT),
                         session=True)
    procs.append((beat, st / "beat.log", "mxq scheduler ready"))
    if on_spawn is not None:
        on_spawn([p.pid for p, _, _ in procs[:-1]])
    for p, log, needle in procs:
        _wait_log(log, needle, p, 60)
    return procs


def _mxq_alive(procs: list[tuple]) -> Callable[[], None]:
    """A check that raises BenchError (with the log tail) if a worker or the scheduler has exited."""
    def alive() -> None:
        for p, log, _ in procs:
            if p.poll() is not None:
                raise BenchError(f"{p.args[3:6]} exited ({p.returncode}): {log.read_text()[-2000:]}")
    return alive


def _mxq_wait(meas: Measure, procs: list[tuple]) -> None:
    try:
        meas.wait(_mxq_alive(procs))
    except BenchError as e:
        logs = "\n".join(log.read_text(errors="replace")[-1500:] for _, log, _ in procs[:1])
        e.args = (f"{e}; worker log tail: {logs}",)
        raise


def _mxq_stop(procs: list[tuple], r: sandbox.Redis, timeout: float = 10.0) -> None:
    """Stop the workers, the scheduler and the stage's Redis (SIGKILL ``timeout`` s after SIGTERM)."""
    for p, _, _ in procs:
        sandbox.stop(p, timeout)
    r.stop()


def _mxq_workers(procs: list[tuple]) -> list[dict]:
    workers = []
    for p, _, _ in procs:
        workers += worker_fields(sandbox.process_tree(p.pid))
    return workers


def _mxq_cpu(procs: list[tuple], r: sandbox.Redis) -> dict:
    """CPU seconds used so far by the workers (every process of their trees) and by redis-server;
    ``each``: {pid: CPU seconds} of every process of the workers' trees."""
    info = r.client().info("cpu")
    each = {p: sandbox.cpu_seconds(p) for proc, _, _ in procs[:-1] for p in sandbox.process_tree(proc.pid)}
    return {"workers": sum(each.values()), "each": each,
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"])}


def _cpu_since(before: dict, after: dict) -> dict:
    out = {k: round(after[k] - before[k], 2) for k in before if k != "each"}
    if "each" in before:        # the worker processes that used CPU meanwhile, busiest first
        out["each"] = sorted((round(v - before["each"].get(p, 0.0), 2) for p, v in after["each"].items()
                              if v - before["each"].get(p, 0.0) >= 0.01), reverse=True)
    return out


def _mxq_agrees(tasks_mod, ids: list[str], res: dict) -> str:
    """mxq's own bookkeeping must agree with the sinks: a sample of jobs is done and delivered."""
    sample = ids[:: max(1, len(ids) // 20)]
    states = [tasks_mod.status(j) for j in sample]
    bad = [s for s in states if s["state"] != "done" or s["recipients"][0]["state"] != "delivered"]
    if bad:
        res["notes"].append(f"mxq.tasks.status disagrees with the sinks for {len(bad)} of {len(sample)} "
                            f"sampled jobs, e.g. {bad[0]}")
        res["sinks"]["exactly_once"] = False
    return f"mxq.tasks.status agrees for {len(sample) - len(bad)}/{len(sample)} sampled jobs"


def _workers_note(ctx: Context) -> str:
    flags = " ".join(ctx.worker_flags()) or "no tuning flags (the worker's defaults)"
    return f"{ctx.mxq_workers} x mxq worker, {flags}; mxq scheduler"


def mxq(ctx: Context) -> dict:
    """mxq: ``mxq.tasks.submit_many`` of N messages in batches, delivered by ``mxq worker`` processes.

    The pipeline as deployed (``mxq worker`` and ``mxq scheduler``),
    ``mxq_workers`` worker processes (one by default) with no tuning flags
    unless ``--mxq-pool``/``--mxq-concurrency`` are given, on a fresh Redis,
    MX lookups against the sandbox DNS server (``MXQ_DNS_SERVERS``).  Other
    settings are the pipeline's defaults.
    Before the timed run, ``probe`` messages are submitted with no worker
    running to measure Redis memory per queued message, then Redis is flushed.
    """
    st = ctx.stage_dir("mxq")
    tasks, app_module, worker_argv, scheduler_argv = _mxq_modules()
    from mxq.tasks import Item, submit_many
    addrs = [sandbox.domain_address(j) for j in range(ctx.m)]
    meas = Measure(ctx, "mxq", addrs)
    try:
        r, env = _mxq_redis(ctx, st, app_module)
        spec = ctx.spec("mxq")
        body = spec.body()

        def items(idx: range, submitted: float) -> list:
            return [Item(message=spec.render(i, submitted, body), sender=messages.SENDER,
                         recipients=[spec.recipient(i)]) for i in idx]

        # Redis memory per queued message: no worker yet, so what is submitted stays queued.
        client = r.client()
        submit_many(items(range(min(10, ctx.n)), time.time()))
        before = r.used_memory()
        probe = min(ctx.probe, ctx.n)
        for k in range(0, probe, ctx.batch):
            submit_many(items(range(k, min(probe, k + ctx.batch)), time.time()))
        mem_per_msg = (r.used_memory() - before) / probe
        client.flushall()

        procs = _start_mxq(ctx, st, env, worker_argv, scheduler_argv)
        client.config_resetstat()

        ids: list[str] = []
        cpu0 = _mxq_cpu(procs, r)
        meas.begin()
        for k in range(0, spec.count, ctx.batch):
            ids += submit_many(items(range(k, min(spec.count, k + ctx.batch)), time.time()))
        meas.submitted()
        _mxq_wait(meas, procs)
        cpu = _cpu_since(cpu0, _mxq_cpu(procs, r))
        redis_res = redis_fields(r, ctx.n, mem_per_msg, probe)
        redis_res.update(task_fields(procs, ctx.n))
        workers = _mxq_workers(procs)
        res = meas.finish(spec.ids())
        agrees = _mxq_agrees(tasks, ids, res)
        res["redis"] = redis_res
        res["workers"] = workers
        res["harness_cpu_seconds"].update(mxq_workers=cpu["workers"], redis=cpu["redis"],
                                          mxq_worker_processes=cpu["each"])
        res["notes"].append(f"submit_many in batches of {ctx.batch}; {_workers_note(ctx)}; {agrees}")
        _mxq_stop(procs, r)
        return res
    except BaseException:
        meas.abort()
        raise


def mxq_deliver(ctx: Context, stage: str, submit: list[Spec], counted: list[Spec], addrs: list[str], *,
                sink_flags: tuple = (), reply_delay: float = 0.0, env_extra: dict | None = None,
                max_connections: int = 1024,
                probe: str | None = None, on_ready: Callable | None = None, after: Callable | None = None,
                finished: Callable | None = None, on_timeout: Callable | None = None,
                stop_timeout: float = 10.0) -> dict:
    """mxq on a fresh Redis and fresh sinks: submit ``submit``'s messages (spec after spec), time ``counted``'s.

    ``submit_many`` in batches of ``batch``, every spec in turn (a spec not
    counted, such as the dead domains' mail, goes first and is never at a
    sink).  The stage completes when every message of ``counted`` is at the
    sinks on ``addrs`` (``sink_flags``, ``max_connections``, ``probe`` as for
    ``SinkFarm``; ``reply_delay`` as for ``Measure``), timed from their first submission
    (``Measure.spec_begins``; from the very first in the timeline's ``seconds_from_first_submission``).  Hooks, each optional:
    ``on_ready(procs)`` once the workers are ready, before submission;
    ``after(procs, ids)`` with the workers still running once the counted
    mail is at the sinks (``ids``: ``{spec.run: [job id]}``), returning a dict
    merged into the result; ``finished(tally)`` with the sink monitor's tally
    (``arrivals`` among it) once the sinks stopped, returning a dict merged
    into the result; ``on_timeout(tally)`` with the sink monitor's
    tally when the sinks did not get every message in time, returning what
    goes into the failed stage's ``partial``.  ``env_extra``: more
    environment for the workers (e.g. ``MXQ_CONNECT_TIMEOUT``).  ``stop_timeout``:
    seconds the workers get to stop after SIGTERM before SIGKILL (a run whose
    figures are taken need not wait for deliveries still under way).
    """
    st = ctx.stage_dir(stage)
    tasks, app_module, worker_argv, scheduler_argv = _mxq_modules()
    from mxq.tasks import Item, submit_many
    count = sum(s.count for s in counted)
    total = sum(s.count for s in submit)
    meas = Measure(ctx, stage, addrs, count=count, timeout=ctx.timeout_for(total), sink_flags=sink_flags,
                   max_connections=max_connections, probe=probe, reply_delay=reply_delay)
    try:
        r, env = _mxq_redis(ctx, st, app_module)
        env.update(env_extra or {})
        procs = _start_mxq(ctx, st, env, worker_argv, scheduler_argv)
        r.client().config_resetstat()
        if on_ready is not None:
            on_ready(procs)
        ids: dict[str, list[str]] = {s.run: [] for s in submit}
        bodies = [s.body() for s in submit]
        cpu0 = _mxq_cpu(procs, r)
        meas.begin()
        for spec, body in zip(submit, bodies):
            meas.spec_begins(spec, submit, counted)
            for k in range(0, spec.count, ctx.batch):
                ids[spec.run] += submit_many([
                    Item(message=spec.render(i, time.time(), body), sender=messages.SENDER,
                         recipients=[spec.recipient(i)]) for i in range(k, min(spec.count, k + ctx.batch))])
        meas.submitted()
        try:
            _mxq_wait(meas, procs)
        except StageTimeout as e:
            if on_timeout is not None:
                meas.farm.stop()
                e.partial = on_timeout(meas.monitor.finish())
            raise
        cpu = _cpu_since(cpu0, _mxq_cpu(procs, r))
        redis_res = redis_fields(r, count, None, None)
        redis_res.update(task_fields(procs, count))
        extra = after(procs, ids) if after is not None else None
        workers = _mxq_workers(procs)
        res = meas.finish({i for s in counted for i in s.ids()})
        agrees = _mxq_agrees(tasks, [j for s in counted for j in ids[s.run]], res)
        res["redis"] = redis_res
        res["workers"] = workers
        res["harness_cpu_seconds"].update(mxq_workers=cpu["workers"], redis=cpu["redis"],
                                          mxq_worker_processes=cpu["each"])
        res["notes"].append(f"submit_many in batches of {ctx.batch}; {_workers_note(ctx)}"
                            + "".join(f"; {k}={v}" for k, v in sorted((env_extra or {}).items())) + f"; {agrees}")
        res.update(extra or {})
        if finished is not None:
            res.update(finished(meas.tally) or {})
        _mxq_stop(procs, r, stop_timeout)
        return res
    except BaseException:
        meas.abort()
        raise


def mxq_django(ctx: Context) -> dict:
    """mxq through Django: N ``django.core.mail.EmailMessage`` objects to ``mxq.contrib.django.EmailBackend``.

    What a Django user does: ``get_connection("mxq.contrib.django.EmailBackend").send_messages(messages)``,
    all N in one call (all or nothing: every message rendered and validated,
    then one ``submit_many``).  The messages are built as in the
    django-celery-email stage (same headers and body) and timed the same
    way: from building them, right before ``send_messages``, until the sinks
    hold every one.  Delivery as in the ``mxq`` stage: the pipeline's
    defaults, MX routing to the M domains' sinks.
    """
    st = ctx.stage_dir("mxq_django")
    tasks, app_module, worker_argv, scheduler_argv = _mxq_modules()
    try:
        from . import djapp                               # configures Django's settings (once per process)
        from django.core.mail import EmailMessage, get_connection
    except ImportError as e:
        raise BenchError(f"django not installed ({e}); pip install -e '.[bench]' (ops/bench does it)") from e
    addrs = [sandbox.domain_address(j) for j in range(ctx.m)]
    spec = ctx.spec("mxq_django")
    meas = Measure(ctx, "mxq_django", addrs, count=spec.count, timeout=ctx.timeout_for(spec.count))
    try:
        r, env = _mxq_redis(ctx, st, app_module)
        body = spec.body().replace("\r\n", "\n")
        procs = _start_mxq(ctx, st, env, worker_argv, scheduler_argv)
        r.client().config_resetstat()
        backend = get_connection("mxq.contrib.django.EmailBackend")
        cpu0 = _mxq_cpu(procs, r)
        t0 = meas.begin()
        emails = _django_emails(EmailMessage, spec, range(spec.count), t0, body)
        sent = backend.send_messages(emails)
        meas.submitted()
        if sent != spec.count:
            raise BenchError(f"send_messages queued {sent} of {spec.count} messages")
        _mxq_wait(meas, procs)
        cpu = _cpu_since(cpu0, _mxq_cpu(procs, r))
        redis_res = redis_fields(r, spec.count, None, None)
        redis_res.update(task_fields(procs, spec.count))
        workers = _mxq_workers(procs)
        res = meas.finish(spec.ids())
        agrees = _mxq_agrees(tasks, [m.mxq_job_id for m in emails], res)
        res["redis"] = redis_res
        res["workers"] = workers
        res["harness_cpu_seconds"].update(mxq_workers=cpu["workers"], redis=cpu["redis"],
                                          mxq_worker_processes=cpu["each"])
        res["notes"].append(f"one EmailBackend.send_messages call of {spec.count} Django EmailMessage objects "
                            f"({djapp.__name__} settings, MXQ_* from the environment); {_workers_note(ctx)}; {agrees}")
        _mxq_stop(procs, r)
        return res
    except BaseException:
        meas.abort()
        raise


def _django_emails(EmailMessage, spec: Spec, idx: range, submitted: float, body: str) -> list:
    """Django ``EmailMessage`` objects for messages ``idx`` of ``spec`` (the same for both Django stages)."""
    out = []
    for i in idx:
        headers = dict(spec.headers(i, submitted))
        headers["Date"] = "Sat, 01 Jan 2000 00:00:00 +0000"
        out.append(EmailMessage(subject=spec.subject(i), body=body, from_email=f"mxq bench <{messages.SENDER}>",
                                to=[spec.recipient(i)], headers=headers))
    return out


#: Latency resolution of the steady-rate stage: the sink monitor polls every 5 ms (not 10-20 ms as
#: in the throughput stages), since its p50 is judged against 50 ms.
STEADY_MONITOR_INTERVAL = 0.005
#: A submission that starts this much after its slot counts as late (the pace was not kept).
STEADY_LATE_S = 0.005


def mxq_steady(ctx: Context) -> dict:
    """mxq when not saturated: ``steady_n`` messages at a steady ``steady_rate`` per second.

    One ``mxq.tasks.submit`` per message; message ``i`` is due ``i / rate``
    seconds after the first, on the monotonic clock (a late submission is
    not caught up with a burst: the next one is simply due at its own slot).
    Latency is taken per message from its ``X-Bench-Submitted`` stamp (set
    right before its ``submit`` call) to its arrival at a sink, as in the
    other stages, with the monitor polling every 5 ms.  Same workers, beat
    and fresh Redis as the ``mxq`` stage; ``seconds``/``msgs_per_sec`` here
    measure the offered pace, not capacity.
    """
    st = ctx.stage_dir("mxq_steady")
    tasks, app_module, worker_argv, scheduler_argv = _mxq_modules()
    n, rate = ctx.steady_n, ctx.steady_rate
    addrs = [sandbox.domain_address(j) for j in range(ctx.m)]
    meas = Measure(ctx, "mxq_steady", addrs, count=n, interval=STEADY_MONITOR_INTERVAL,
                   timeout=ctx.timeout_for(n))
    try:
        r, env = _mxq_redis(ctx, st, app_module)
        procs = _start_mxq(ctx, st, env, worker_argv, scheduler_argv)
        alive = _mxq_alive(procs)
        r.client().config_resetstat()
        spec = ctx.spec("mxq_steady", n)
        body = spec.body()
        ids: list[str] = []
        lags: list[float] = []
        calls: list[float] = []
        starts: list[float] = []
        every = max(1, int(rate))                    # check the workers about once a second
        meas.begin()
        t_first = time.monotonic()
        for i in range(n):
            due = t_first + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)                # pacing to the schedule, not synchronisation
            t = time.monotonic()
            lags.append(max(0.0, t - due))
            starts.append(t)
            ids.append(tasks.submit(spec.render(i, time.time(), body), sender=messages.SENDER,
                                    recipients=[spec.recipient(i)]))
            calls.append(time.monotonic() - t)
            if i % every == every - 1:
                alive()
        meas.submitted()
        _mxq_wait(meas, procs)
        redis_res = redis_fields(r, n, None, None)
        workers = _mxq_workers(procs)
        res = meas.finish(spec.ids())
        agrees = _mxq_agrees(tasks, ids, res)
        span = starts[-1] - starts[0]
        res["steady"] = {
            "rate_target": rate,
            "rate_achieved": round((n - 1) / span, 1) if n > 1 and span > 0 else None,
            "late_submissions": sum(1 for x in lags if x > STEADY_LATE_S),
            "max_lag_ms": round(max(lags) * 1000, 1),
            "submit_call_ms": {"p50": round(sandbox.percentile(calls, 0.5) * 1000, 2),
                               "p99": round(sandbox.percentile(calls, 0.99) * 1000, 2),
                               "max": round(max(calls) * 1000, 2)},
            "monitor_interval_ms": round(STEADY_MONITOR_INTERVAL * 1000, 1),
        }
        res["redis"] = redis_res
        res["workers"] = workers
        res["notes"].append(f"one mxq.tasks.submit per message at {rate:g}/s (monotonic schedule, late "
                            f"submissions not caught up); {_workers_note(ctx)}; {agrees}; latency "
                            f"resolution {STEADY_MONITOR_INTERVAL * 1000:g} ms")
        _mxq_stop(procs, r)
        return res
    except BaseException:
        meas.abort()
        raise


def mxq_backlog(ctx: Context) -> dict:
    """mxq with a backlog: ``backlog_n`` messages queued with no worker running, then drained.

    Submission (``submit_many`` in batches of ``batch``) into a fresh Redis
    with no worker: Redis ``used_memory`` after it, minus before it, over
    the bytes of message content submitted, is the memory per content byte.
    Then the workers and beat start; from their spawning until the sinks
    hold every message is ``seconds`` (start-up included); meanwhile the RSS
    of every worker process (main and pool children, not beat) is sampled
    every ``rss_interval`` seconds and judged by ``sandbox.RSS_RULE``.
    Latency here is time in the queue (submission to sink), not a target.
    Redis commands are counted from before submission, DNS queries likewise.
    """
    st = ctx.stage_dir("mxq_backlog")
    tasks, app_module, worker_argv, scheduler_argv = _mxq_modules()
    from mxq.tasks import Item, submit_many
    n = ctx.backlog_n
    addrs = [sandbox.domain_address(j) for j in range(ctx.m)]
    meas = Measure(ctx, "mxq_backlog", addrs, count=n, timeout=ctx.timeout_for(n))
    sampler: list[sandbox.RssSampler] = []
    try:
        r, env = _mxq_redis(ctx, st, app_module)
        client = r.client()
        spec = ctx.spec("mxq_backlog", n)
        body = spec.body()
        ctx.dns.reset_stats()
        client.config_resetstat()
        baseline = r.used_memory()
        content = 0
        ids: list[str] = []
        t_sub = time.time()
        for k in range(0, n, ctx.batch):
            now = time.time()
            batch = [spec.render(i, now, body) for i in range(k, min(n, k + ctx.batch))]
            content += sum(len(m) for m in batch)
            ids += submit_many([Item(message=m, sender=messages.SENDER, recipients=[spec.recipient(i)])
                                for i, m in zip(range(k, k + len(batch)), batch)])
            if k % (100 * ctx.batch) == 0 and k:
                ctx.say(f"   {k}/{n} queued")
        submit_seconds = time.time() - t_sub
        queued = r.used_memory()
        ctx.say(f"   {n} queued in {submit_seconds:.1f} s; Redis used_memory +{(queued - baseline) / 1e6:.1f} MB "
                f"for {content / 1e6:.1f} MB of content; starting the workers")

        def on_spawn(pids: list[int]) -> None:
            meas.begin(reset_dns=False)
            sampler.append(sandbox.RssSampler(pids, ctx.rss_interval).start())

        procs = _start_mxq(ctx, st, env, worker_argv, scheduler_argv, on_spawn=on_spawn)
        t_ready = time.time()                       # every worker and beat said it is ready
        _mxq_wait(meas, procs)
        samples = sampler[0].stop()
        # RSS is judged over the drain proper: from "ready" (start-up growth is not a leak) to done.
        rss = sandbox.rss_verdict(samples, min(t_ready, meas.t_done), meas.t_done)
        redis_res = redis_fields(r, n, None, None)
        workers = _mxq_workers(procs)
        res = meas.finish(spec.ids())
        agrees = _mxq_agrees(tasks, ids, res)
        drained = r.used_memory()
        drain = meas.t_done - meas.t0
        res["submit_seconds"] = round(submit_seconds, 3)
        res["backlog"] = {
            "messages": n,
            "batch": ctx.batch,
            "content_bytes": content,
            "submit_seconds": round(submit_seconds, 3),
            "redis_used_memory_baseline": baseline,
            "redis_used_memory_queued": queued,
            "redis_used_memory_drained": drained,
            "redis_memory_per_content_byte": round((queued - baseline) / content, 3),
            "redis_bytes_per_message": round((queued - baseline) / n),
            "drain_seconds": round(drain, 3),
            "drain_msgs_per_sec": round(n / drain, 1) if drain > 0 else None,
            "rss": {"interval_s": ctx.rss_interval, "ready_seconds": round(t_ready - meas.t0, 3), **rss},
        }
        res["redis"] = redis_res
        res["workers"] = workers
        res["notes"].append(f"{n} messages queued by submit_many in batches of {ctx.batch} with no worker, "
                            f"then drained by {_workers_note(ctx)}; seconds = worker spawn -> all at the "
                            f"sinks (start-up included); latency = time in the queue; {agrees}")
        _mxq_stop(procs, r)
        return res
    except BaseException:
        if sampler:
            sampler[0].stop()
        meas.abort()
        raise

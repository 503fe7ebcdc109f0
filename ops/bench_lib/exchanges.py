"""Stages against real-world exchanges (issue 8): slow, dead, and a thousand deliveries in flight.

Each contender runs on fresh sinks (and, for mxq, a fresh Redis and fresh
workers at their defaults), timed like the loopback stages: from the first
submission until the sinks hold every counted message.

* ``slow``: ``slow_domains`` x ``slow_per_domain`` messages, each domain its
  own ``smtp-sink -p -W .:<slow_delay>`` (no PIPELINING: with a delay,
  smtp-sink answers pipelined commands ahead of the delayed dot reply).
  Postfix, then mxq.  The ideal is what the destinations allow:
  ``ceil(per_domain / slow_concurrency)`` rounds of ``slow_delay`` seconds.
* ``dead``: ``dead_healthy_domains`` instant domains x ``dead_per_domain``
  messages, plus ``dead_domains`` domains whose exchanges drop every SYN
  (an nftables rule in the benchmark's own network namespace), their mail
  submitted first.  Each contender runs without the dead domains (``*_base``)
  and with them; the figure is the healthy mail's msg/s.  mxq must then show
  every dead-domain recipient deferred with its reason (``mxq.tasks.status``).
* ``inflight``: ``inflight_n`` messages over ``inflight_domains`` domains to
  one sink (``smtp-sink -p -W .:<inflight_delay>`` on every local address,
  each domain its own exchange address) while every worker process's RSS and
  the sink's open connections are sampled.  A delivery is counted in flight
  while the sink holds its message and has not yet answered its final dot:
  the sink answers each dot ``inflight_delay`` s after it arrives, so the
  deliveries in flight at time t are the messages that arrived at the sink in
  (t - delay + 0.1 s, t] (arrival times from the sink monitor, which sees a
  record up to one poll later).  The open connections at the sink are
  counted too (``/proc/net/tcp``), as a cross-check.
"""

from __future__ import annotations

import bisect
import math
import os
import statistics
import threading
import time

from . import sandbox
from .stages import Context, mxq_deliver, postfix_deliver

# --------------------------------------------------------------------------- slow


def _slow_sinks(ctx: Context) -> tuple[list[str], tuple[str, ...]]:
    return ([sandbox.domain_address(j, "s") for j in range(ctx.slow_domains)],
            ("-p", "-W", f".:{ctx.slow_delay}"))


def _slow_spec(ctx: Context, stage: str):
    return ctx.spec(stage, ctx.slow_domains * ctx.slow_per_domain, ctx.slow_domains, "s")


def slow_block(ctx: Context, res: dict) -> dict:
    """The ``slow`` block: the stage's shape, and the ideal the destinations' limits allow."""
    rounds = math.ceil(ctx.slow_per_domain / max(1, ctx.slow_concurrency))
    ideal = rounds * ctx.slow_delay
    n = ctx.slow_domains * ctx.slow_per_domain
    rate = res.get("msgs_per_sec")
    return {"domains": ctx.slow_domains, "per_domain": ctx.slow_per_domain, "delay_s": ctx.slow_delay,
            "concurrency_per_domain": ctx.slow_concurrency, "ideal_seconds": ideal,
            "ideal_msgs_per_sec": round(n / ideal, 1) if ideal else None,
            "of_ideal": round(rate / (n / ideal), 3) if rate and ideal else None}


def slow_postfix(ctx: Context) -> dict:
    """Postfix (Debian defaults) to 50 slow exchanges, each waiting 1 s before answering the final dot."""
    addrs, flags = _slow_sinks(ctx)
    spec = _slow_spec(ctx, "slow_postfix")
    res = postfix_deliver(ctx, "slow_postfix", [spec], [spec], addrs, sink_flags=flags, reply_delay=ctx.slow_delay)
    res["slow"] = slow_block(ctx, res)
    return res


def slow_mxq(ctx: Context) -> dict:
    """mxq at its defaults (one ``mxq worker``, no tuning flags) to the same slow exchanges, fresh sinks."""
    addrs, flags = _slow_sinks(ctx)
    spec = _slow_spec(ctx, "slow_mxq")
    res = mxq_deliver(ctx, "slow_mxq", [spec], [spec], addrs, sink_flags=flags, reply_delay=ctx.slow_delay)
    res["slow"] = slow_block(ctx, res)
    return res


# --------------------------------------------------------------------------- dead


def _dead_env(ctx: Context) -> dict:
    return {} if ctx.dead_connect_timeout is None else {"MXQ_CONNECT_TIMEOUT": f"{ctx.dead_connect_timeout:g}"}


def _dead_main_cf(ctx: Context) -> str:
    return "" if ctx.dead_connect_timeout is None else f"smtp_connect_timeout = {ctx.dead_connect_timeout:g}s\n"


def _healthy(ctx: Context, stage: str):
    spec = ctx.spec(f"{stage}-h", ctx.dead_healthy_domains * ctx.dead_per_domain, ctx.dead_healthy_domains, "h")
    return spec, [sandbox.domain_address(j, "h") for j in range(ctx.dead_healthy_domains)]


def _dead(ctx: Context, stage: str):
    return ctx.spec(f"{stage}-x", ctx.dead_domains * ctx.dead_per_domain, ctx.dead_domains, "x")


def _dead_note(ctx: Context, with_dead: bool) -> str:
    timeout = "default connect timeout" if ctx.dead_connect_timeout is None else \
        f"connect timeout {ctx.dead_connect_timeout:g} s"
    if not with_dead:
        return f"healthy mail only ({ctx.dead_healthy_domains} instant domains x {ctx.dead_per_domain})"
    return (f"{ctx.dead_domains} dead domains x {ctx.dead_per_domain} submitted first (SYNs to "
            f"{sandbox.family_network('x')}:25 dropped by nftables), then {ctx.dead_healthy_domains} instant "
            f"domains x {ctx.dead_per_domain}; msg/s of the healthy mail, timed from its first submission "
            f"(timeline: when that was, and the figures from the dead mail's); {timeout}")


def dead_postfix_base(ctx: Context) -> dict:
    """Postfix, healthy domains only: the reference rate of the dead stage."""
    spec, addrs = _healthy(ctx, "dead_postfix_base")
    res = postfix_deliver(ctx, "dead_postfix_base", [spec], [spec], addrs, main_cf=_dead_main_cf(ctx))
    res["notes"].append(_dead_note(ctx, False))
    return res


def dead_postfix(ctx: Context) -> dict:
    """Postfix with the dead domains' mail submitted first; msg/s of the healthy mail."""
    spec, addrs = _healthy(ctx, "dead_postfix")
    dead = _dead(ctx, "dead_postfix")
    sandbox.drop_syns(sandbox.family_network("x"))
    try:
        res = postfix_deliver(ctx, "dead_postfix", [dead, spec], [spec], addrs, main_cf=_dead_main_cf(ctx))
    finally:
        sandbox.allow_syns()
    res["notes"].append(_dead_note(ctx, True))
    return res


def dead_mxq_base(ctx: Context) -> dict:
    """mxq at its defaults, healthy domains only: the rate the dead stage is judged against (its first pair's half)."""
    ctx.dead_base = None
    res, ctx.dead_base = _dead_mxq_run(ctx, "dead_mxq_base", with_dead=False)
    return res


#: Seconds between two status sweeps over the dead domains' jobs.
DEAD_POLL = 0.5
#: Seconds between two counts of the connection attempts stuck on the dead exchanges (SYN-SENT sockets).
#: A count reads /proc/net/tcp, which walks the kernel's whole established hash (262,144 buckets here):
#: 4.4 ms of system CPU a read whatever the sockets, 9% of a core at 0.05 s, spent only in the runs with
#: the dead domains.  An attempt stuck on a dead exchange stays SYN-SENT for its whole connect timeout
#: (seconds), so a count every 0.5 s sees every one that is stuck at all.
CONNECTING_INTERVAL = 0.5
#: Seconds a further pair's run gives its workers to stop before SIGKILL: its figures are taken, and its
#: connections to the dead exchanges would hold a warm shutdown until their connect timeout.
PAIR_STOP_TIMEOUT = 2.0


class _Connecting(threading.Thread):
    """Counts, every ``CONNECTING_INTERVAL`` s, the connection attempts stuck on ``network`` (``sandbox.connecting``)."""

    def __init__(self, network: str):
        super().__init__(name="bench-connecting", daemon=True)
        self.network = network
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, sandbox.connecting(self.network))
            self.samples += 1
            self.halt.wait(CONNECTING_INTERVAL)

    def stop(self) -> dict:
        """Stop sampling: ``{peak, now}`` (the most at one sample, and how many right now)."""
        now = sandbox.connecting(self.network)
        self.halt.set()
        self.join(5)
        return {"peak": max(self.peak, now), "now": now}


def _dead_sweep(jobs: list[str]) -> dict:
    """``mxq.tasks.status`` of the dead domains' jobs: states, recipients deferred with a reason, jobs lost."""
    from mxq import tasks

    states: dict[str, int] = {}
    lost, with_reason, reasons = 0, 0, {}
    for j in jobs:
        try:
            st = tasks.status(j)
        except KeyError:
            lost += 1
            continue
        for rcpt in st["recipients"]:
            states[rcpt["state"]] = states.get(rcpt["state"], 0) + 1
            if rcpt["state"] == "deferred" and (rcpt.get("text") or "").strip():
                with_reason += 1
                reasons[rcpt["text"]] = reasons.get(rcpt["text"], 0) + 1
    return {"states": states, "lost": lost, "with_reason": with_reason, "reasons": reasons}


def _dead_mxq_run(ctx: Context, stage: str, *, with_dead: bool, check: bool = True,
                  stop_timeout: float = 10.0) -> tuple[dict, dict]:
    """One mxq run of the dead stage on a fresh Redis, sinks and workers: ``(result, summary)``.

    ``with_dead``: the dead domains' mail is submitted first and their
    exchanges drop SYNs.  Such a run counts the connection attempts stuck on
    them (SYN-SENT sockets) while the healthy mail flows, and then, with
    ``check``, sweeps ``mxq.tasks.status`` of every dead-domain job every
    ``DEAD_POLL`` s until each recipient is ``deferred`` with a reason (its
    ``text``) or the stage's time is up (``dead`` block); without ``check``,
    once: no job lost and no recipient in a final state (``lost``, ``states``).
    A job mxq no longer knows (KeyError) is lost; a recipient delivered,
    bounced or expired is wrong.  The summary is what the pairs compare
    (``_summary``).
    """
    spec, addrs = _healthy(ctx, stage)
    dead = _dead(ctx, stage)
    t_start: list[float] = []
    network = sandbox.family_network("x")
    watch: dict = {}

    def on_ready(procs) -> None:
        if with_dead:
            watch["thread"] = _Connecting(network)
            watch["thread"].start()
        t_start.append(time.time())

    def after(procs, ids) -> dict:
        if not with_dead:
            return {}
        connecting = watch["thread"].stop()
        block = {"dead_domains": ctx.dead_domains, "dead_messages": dead.count, "healthy_messages": spec.count,
                 "connect_timeout": ctx.dead_connect_timeout,
                 "connecting_peak": connecting["peak"], "connecting_at_done": connecting["now"],
                 "syns_dropped_at_done": sandbox.dropped_syns()}
        if not check:
            sweep = _dead_sweep(ids[dead.run])
            block.update(lost=sweep["lost"], states=sweep["states"])
            return {"dead": block}
        deadline = t_start[0] + ctx.timeout_for(dead.count + spec.count)
        sweeps = 0
        while True:
            sweeps += 1
            sweep = _dead_sweep(ids[dead.run])
            done = sweep["with_reason"] == dead.count and not sweep["lost"]
            if done or time.time() >= deadline:
                break
            time.sleep(DEAD_POLL)
        block.update({
            "deferred_with_reason": sweep["with_reason"], "lost": sweep["lost"], "states": sweep["states"],
            "all_deferred": done,
            "seconds_to_all_deferred": round(time.time() - t_start[0], 3) if done else None,
            "reasons": dict(sorted(sweep["reasons"].items(), key=lambda kv: -kv[1])[:3]), "sweeps": sweeps,
            "syns_dropped": sandbox.dropped_syns(),
            "queue": _queue_by_domain(dead),
        })
        return {"dead": block}

    if with_dead:
        sandbox.drop_syns(network)
    try:
        res = mxq_deliver(ctx, stage, [dead, spec] if with_dead else [spec], [spec], addrs,
                          env_extra=_dead_env(ctx), on_ready=on_ready, after=after, stop_timeout=stop_timeout)
    finally:
        if "thread" in watch:
            watch["thread"].halt.set()
        if with_dead:
            sandbox.allow_syns()
    res["notes"].append(_dead_note(ctx, with_dead))
    if with_dead and check and not res["dead"]["all_deferred"]:
        res["notes"].append(f"NOT every dead-domain recipient deferred with a reason: {res['dead']}")
    return res, _summary(res, spec.count, with_dead)


def _summary(res: dict, healthy: int, with_dead: bool) -> dict:
    """One run's figures for the pairs: healthy msg/s, worker CPU per healthy message, the Redis
    commands, Celery tasks and sink sessions until the healthy mail was in, stuck connections."""
    cpu = res.get("harness_cpu_seconds") or {}
    workers = cpu.get("mxq_workers")
    out = {"msgs_per_sec": res["msgs_per_sec"], "seconds": res["seconds"], "worker_cpu_s": workers,
           "worker_cpu_ms_per_msg": round(workers * 1000 / healthy, 3) if workers is not None else None,
           "redis_cpu_s": cpu.get("redis"), "exactly_once": res["sinks"]["exactly_once"],
           "redis_commands": (res.get("redis") or {}).get("commands_total"),
           "tasks": (res.get("redis") or {}).get("tasks"), "sessions": res["sinks"].get("sessions"),
           "load1": round(os.getloadavg()[0], 2),
           "timeline": {k: v for k, v in (res.get("timeline") or {}).items() if k != "per_second"}}
    if with_dead:
        dead = res.get("dead") or {}
        out.update(connecting_peak=dead.get("connecting_peak"), syns_dropped=dead.get("syns_dropped_at_done"),
                   lost=dead.get("lost"),
                   final=sum(v for k, v in (dead.get("states") or {}).items() if k in ("delivered", "bounced",
                                                                                        "expired")))
    return out


def _pair(k: int, without: dict, with_: dict, order: str) -> dict:
    ratio = lambda a, b: round(a / b, 4) if a and b else None        # noqa: E731
    return {"pair": k, "order": order, "without": without, "with": with_,
            "ratio": ratio(with_["msgs_per_sec"], without["msgs_per_sec"]),
            "ratio_from_first_submission": ratio((with_.get("timeline") or {}).get(
                "msgs_per_sec_from_first_submission"), without["msgs_per_sec"]),
            "cpu_ratio": ratio(with_["worker_cpu_ms_per_msg"], without["worker_cpu_ms_per_msg"])}


def pairs_block(pairs: list[dict]) -> dict:
    """The verdict of the dead stage's pairs: the median with/without ratio, its spread, worker CPU per message."""
    def med(vals):
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 4) if vals else None

    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {
        "pairs": pairs,
        "ratios": ratios,
        "ratio_median": med(ratios),
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "ratio_from_first_submission_median": med(p.get("ratio_from_first_submission") for p in pairs),
        "dead_submission_s_median": med((p["with"].get("timeline") or {}).get("counted_from_s") for p in pairs),
        "cpu_ms_per_msg_median": {"without": med(p["without"]["worker_cpu_ms_per_msg"] for p in pairs),
                                  "with": med(p["with"]["worker_cpu_ms_per_msg"] for p in pairs)},
        "cpu_ratio_median": med(p["cpu_ratio"] for p in pairs),
        "connecting_peak_max": max((p["with"].get("connecting_peak") or 0 for p in pairs), default=None),
    }


def dead_mxq(ctx: Context) -> dict:
    """mxq with the dead domains' mail submitted first, then ``dead_pairs - 1`` more pairs; the verdict is their median.

    The first run (with the dead domains) completes the first pair, whose
    other half is ``dead_mxq_base``; it also waits until every dead-domain
    recipient is deferred with a reason (``_dead_mxq_run``).  A healthy half
    lasts about a second, so one pair cannot tell 10% from noise: each further
    pair runs its two halves in the opposite order to the pair before it (so
    order and drift cancel), each on a fresh Redis, sinks and workers, and
    checks only that no dead-domain job is lost or final.  ``dead.pairs``
    holds every pair; the ratio judged is their median (``ratio_median``,
    with ``ratio_min``/``ratio_max``), and the workers' CPU seconds per
    healthy message with and without tell a real cost from scheduling noise.
    """
    res, first = _dead_mxq_run(ctx, "dead_mxq", with_dead=True)
    base = ctx.dead_base
    if base is None:                                # dead_mxq_base did not run or failed: its half now
        _, base = _dead_mxq_run(ctx, "dead_mxq_pair1_base", with_dead=False, stop_timeout=PAIR_STOP_TIMEOUT)
    pairs = [_pair(1, base, first, "without first")]
    for k in range(2, ctx.dead_pairs + 1):
        order = (True, False) if k % 2 == 0 else (False, True)
        halves = {}
        for with_dead in order:
            name = f"dead_mxq_pair{k}_{'with' if with_dead else 'without'}"
            _, halves[with_dead] = _dead_mxq_run(ctx, name, with_dead=with_dead, check=False,
                                                 stop_timeout=PAIR_STOP_TIMEOUT)
            ctx.say(f"   pair {k}, {'with' if with_dead else 'without'} the dead domains: "
                    f"{halves[with_dead]['msgs_per_sec']} msg/s, worker CPU "
                    f"{halves[with_dead]['worker_cpu_ms_per_msg']} ms a message")
        pairs.append(_pair(k, halves[False], halves[True], "with first" if order[0] else "without first"))
    block = pairs_block(pairs)
    res["dead"].update(block)
    bad = [p["pair"] for p in pairs if not (p["without"]["exactly_once"] and p["with"]["exactly_once"])]
    if bad:
        res["sinks"]["exactly_once"] = False
        res["notes"].append(f"NOT exactly once in the runs of pair(s) {bad}")
    wrong = [p["pair"] for p in pairs if p["with"].get("lost") or p["with"].get("final")]
    res["dead"]["pairs_wrong"] = wrong
    if wrong:
        res["notes"].append(f"dead-domain mail lost or in a final state in pair(s) {wrong}")
    res["notes"].append(f"{len(pairs)} pairs without / with the dead domains, alternating which runs first; "
                        f"healthy msg/s ratios {block['ratios']}: median {block['ratio_median']}")
    return res


def _queue_by_domain(dead) -> dict | None:
    """``mxq queue``'s view of the dead domains (ready / in flight / deferred work items), if available."""
    try:
        from mxq.tasks.admin import Admin
        from mxq.tasks.store import get_store
        doc = Admin(get_store()).snapshot(oldest=0)
    except Exception as e:                                   # informative only; the status sweep decides
        return {"error": f"{type(e).__name__}: {e}"}
    names = {f"x{j}.bench.test" for j in range(dead.domains)}
    return {d["domain"]: {k: d[k] for k in ("ready", "in_flight", "deferred")}
            for d in doc.get("domains", []) if d["domain"] in names}


# --------------------------------------------------------------------------- in flight


class _Sampler:
    """Every ``interval`` s: the RSS of every process in the worker trees, and the sink's open connections."""

    def __init__(self, roots: list[int], interval: float):
        self.roots = roots
        self.interval = interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inflight-sampler", daemon=True)

    def sample(self) -> dict:
        t = time.time()
        procs = {}
        for root in self.roots:
            for pid in sandbox.process_tree(root):
                kb = sandbox.rss_kb(pid)
                if kb is not None:
                    procs[pid] = kb
        row = {"t": t, "rss_kb": sum(procs.values()), "procs": procs, "connections": sandbox.established(25)}
        self.samples.append(row)
        return row

    def start(self) -> "_Sampler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


#: Seconds by which the in-flight window is shorter than the sink's delay (see ``inflight_block``).
WINDOW_MARGIN = 0.1


def inflight_block(ctx: Context, before: dict, samples: list[dict], arrivals: list[float]) -> dict:
    """Deliveries in flight at each sample (arrivals at the sink in the last ``inflight_delay`` s) and RSS at the peak.

    The peak is the sample with the most deliveries in flight (the first such
    sample); RSS growth is the worker processes' total RSS there minus before
    submission, over the deliveries in flight there.
    """
    delay = ctx.inflight_delay
    # The monitor sees a record up to one poll interval (20 ms) after it arrived: a window a little
    # shorter than the delay never counts a delivery whose reply was already sent.
    window = delay - WINDOW_MARGIN
    rows = []
    for s in samples:
        waiting = bisect.bisect_right(arrivals, s["t"]) - bisect.bisect_right(arrivals, s["t"] - window)
        rows.append((waiting, s))
    peak_waiting, peak = max(rows, key=lambda r: r[0]) if rows else (0, None)
    growth = peak["rss_kb"] - before["rss_kb"] if peak else None
    per = round(growth / peak_waiting, 1) if peak and peak_waiting else None
    return {
        "deliveries": ctx.inflight_n, "domains": ctx.inflight_domains, "delay_s": delay,
        "interval_s": ctx.inflight_interval, "samples": len(samples),
        "peak_in_flight": peak_waiting,
        "peak_connections": max((s["connections"] for s in samples), default=0),
        "connections_at_peak": peak["connections"] if peak else None,
        "rss_kb_before": before["rss_kb"], "rss_kb_at_peak": peak["rss_kb"] if peak else None,
        "rss_growth_kb": growth, "rss_kb_per_delivery": per,
        "processes_before": len(before["procs"]), "processes_at_peak": len(peak["procs"]) if peak else None,
        "seconds_to_peak": round(peak["t"] - before["t"], 3) if peak else None,
    }


def inflight_mxq(ctx: Context) -> dict:
    """mxq at its defaults with ``inflight_n`` deliveries against a sink that waits ``inflight_delay`` s at the dot."""
    n, d = ctx.inflight_n, ctx.inflight_domains
    spec = ctx.spec("inflight_mxq", n, d, "f")
    # One smtp-sink on every local address (each domain's exchange has its own 127.5.x.y).
    probe = sandbox.domain_address(0, "f")
    state: dict = {}

    def on_ready(procs) -> None:
        roots = [p.pid for p, _, _ in procs[:-1]]            # the workers, not the scheduler
        sampler = _Sampler(roots, ctx.inflight_interval)
        state["before"] = sampler.sample()
        sampler.samples.clear()
        state["sampler"] = sampler.start()

    def after(procs, ids) -> dict:
        state["samples"] = state["sampler"].stop()
        return {}

    def finished(tally: dict) -> dict:
        return {"inflight": inflight_block(ctx, state["before"], state["samples"], tally["arrivals"])}

    def on_timeout(tally: dict) -> dict:
        samples = state["sampler"].stop() if "sampler" in state else []
        return {"inflight": inflight_block(ctx, state["before"], samples, tally["arrivals"])} if "before" in state else {}

    try:
        res = mxq_deliver(ctx, "inflight_mxq", [spec], [spec], ["0.0.0.0"], sink_flags=("-p", "-W", f".:{ctx.inflight_delay}"),
                          reply_delay=ctx.inflight_delay,
                          max_connections=max(1024, 2 * n + 64), probe=probe, on_ready=on_ready, after=after,
                          finished=finished, on_timeout=on_timeout)
    finally:
        if "sampler" in state:
            state["sampler"].stop()
    res["notes"].append(f"{n} deliveries over {d} domains to one smtp-sink -p -W .:{ctx.inflight_delay}; "
                        f"in flight = arrived at the sink within the last {ctx.inflight_delay} s")
    return res

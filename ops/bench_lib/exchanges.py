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
            f"domains x {ctx.dead_per_domain}; msg/s of the healthy mail; {timeout}")


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
    """mxq at its defaults, healthy domains only: the rate the dead stage is judged against."""
    spec, addrs = _healthy(ctx, "dead_mxq_base")
    res = mxq_deliver(ctx, "dead_mxq_base", [spec], [spec], addrs, env_extra=_dead_env(ctx))
    res["notes"].append(_dead_note(ctx, False))
    return res


#: Seconds between two status sweeps over the dead domains' jobs.
DEAD_POLL = 0.5


def dead_mxq(ctx: Context) -> dict:
    """mxq with the dead domains' mail submitted first; then every dead-domain recipient must be deferred.

    After the healthy mail is at the sinks, ``mxq.tasks.status`` of every
    dead-domain job is swept every ``DEAD_POLL`` s until each recipient is
    ``deferred`` with a reason (its ``text``), or the stage's time is up.
    A job mxq no longer knows (KeyError) is lost; a recipient in any other
    final state (delivered, bounced, expired) is wrong.
    """
    from mxq import tasks

    spec, addrs = _healthy(ctx, "dead_mxq")
    dead = _dead(ctx, "dead_mxq")
    t_start: list[float] = []

    def on_ready(procs) -> None:
        t_start.append(time.time())

    def after(procs, ids) -> dict:
        jobs = ids[dead.run]
        deadline = t_start[0] + ctx.timeout_for(dead.count + spec.count)
        sweeps = 0
        while True:
            sweeps += 1
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
            done = with_reason == dead.count and not lost
            if done or time.time() >= deadline:
                break
            time.sleep(DEAD_POLL)
        block = {
            "dead_domains": ctx.dead_domains, "dead_messages": dead.count, "healthy_messages": spec.count,
            "connect_timeout": ctx.dead_connect_timeout, "deferred_with_reason": with_reason,
            "lost": lost, "states": states, "all_deferred": done,
            "seconds_to_all_deferred": round(time.time() - t_start[0], 3) if done else None,
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3]), "sweeps": sweeps,
            "queue": _queue_by_domain(dead),
        }
        return {"dead": block}

    sandbox.drop_syns(sandbox.family_network("x"))
    try:
        res = mxq_deliver(ctx, "dead_mxq", [dead, spec], [spec], addrs, env_extra=_dead_env(ctx),
                          on_ready=on_ready, after=after)
    finally:
        sandbox.allow_syns()
    res["notes"].append(_dead_note(ctx, True))
    if not res["dead"]["all_deferred"]:
        res["notes"].append(f"NOT every dead-domain recipient deferred with a reason: {res['dead']}")
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

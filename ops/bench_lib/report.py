"""The benchmark's output: the human table and the ratios.

The JSON result (``--json PATH``, default ``var/bench/result.json``)::

    benchmark     "mxq issues 5 and 8"
    params        messages, domains, size, quick, stages, settle, timeout, postfix_clients,
                  postfix_dns, limit_sessions, batch, mxq_workers, mxq_concurrency, mxq_pool,
                  steady_messages, steady_rate, backlog_messages, rss_interval, dns_ttl, strict,
                  slow_domains, slow_per_domain, slow_delay, dead_healthy_domains,
                  dead_per_domain, dead_domains, dead_connect_timeout, dead_pairs, rounds, inflight_messages,
                  inflight_domains, inflight_delay
    environment   cpus, loadavg (before), loadavg_after, platform, python, postfix, redis,
                  celery, django, django_celery_email (versions)
    started       UTC time stamp
    stages        {name: STAGE} for the names in STAGE_ORDER that ran
    ratios        {key: numerator msg/s / denominator msg/s} for RATIOS, null unless both
                  stages ran and finished; dead_mxq/dead_mxq_base is the median of the dead
                  stage's pairs (dead.ratio_median) when it has them, and a ratio of stages run
                  in rounds (params.rounds > 1: dce, mxq, django) the median of its rounds' ratios
    targets       {name: TARGET} for every target of issues 5 and 8 (see TARGETS below)
    targets_ok    true if every judged target passes, false if one fails, null if none judged
    ok            true only if every selected stage ran and was exactly-once (targets are
                  reported, not part of it; --strict makes a failing target exit 1 too)
    error         (only when the run itself broke off)

    TARGET:
    value         the measured figure (null when its stage did not run or failed)
    limit         the bound (null: none given, reported only)
    op            "<", "<=" or ">=": pass = value OP limit
    pass          true / false, null when not judged (no value or no limit)
    partial       true when the value comes from a stage that did not finish (it then fails)
    source        the stage(s) the value comes from; by_stage: the figure of each mxq stage

    STAGE:
    status             "ok" | "failed";  error: why it failed (null when ok)
    partial            (failed stages) how far it got: {at_sinks, expected, seconds, msgs_per_sec}
                       for a timeout, plus e.g. the inflight block measured until then
    messages           N
    seconds            first submission -> the sinks hold all N messages (sinks that wait W s
                       before answering the final dot: the last arrival + W, when it is accepted);
                       in the dead stage, whose dead-domain mail (not counted) is submitted first,
                       from the first submission of the N counted messages
    msgs_per_sec       N / seconds
    submit_seconds     first submission -> the last submission call returned
    wall_seconds       the whole stage, set-up and clean-up included
    timeline           {first_arrival_s, submitted_s, quantiles_s, per_second: [arrivals in second i]} from the
                       first submission (null when no message carried an id the monitor saw); with mail
                       not counted submitted first also counted_from_s (when the counted mail's submission
                       began), seconds_from_first_submission and msgs_per_sec_from_first_submission
    latency_ms         {p50, p99, max, samples, resolution_ms}: X-Bench-Submitted -> accepted by
                       the sink (null for the limit stage: smtp-source's messages carry no stamp)
    sinks              {records (dumped), smtp_sink_counter (smtp-sink -c mesg=), sessions (the
                        connections the sinks accepted, each sink's readiness check among them:
                        smtp-sink -c sess=, which counts ended ones, plus those still open), unique_ids, duplicates,
                        missing, unexpected, exactly_once, bytes_per_record, sinks}
    dns_queries        queries the sandbox DNS server answered during the stage
    redis              {commands_total, commands_per_message, top_commands,
                        memory_per_queued_message (bytes), memory_probe_messages, tasks,
                        tasks_per_message} (Celery stages; tasks -- {task name: count}, the Celery
                        tasks the workers ran, from their logs -- in the stages of mxq workers, else null)
    workers            [{pid, cmd, peak_rss_kb}] (VmHWM of each worker / Postfix process)
    harness_cpu_seconds {dns_server, sinks, monitor, submitting_process} CPU used meanwhile; mxq,
                       mxq_django and the slow, dead and inflight stages' mxq runs add mxq_workers
                       (every worker process) and redis; mxq_worker_processes: the CPU
                       seconds of each worker process that used any, busiest first
    notes              how the stage was run; any disagreement found
    rounds, round      (stages run in rounds) every round's {round, status, msgs_per_sec, seconds,
                       submit_seconds, first_arrival_s, sessions, redis_commands (commands_total),
                       tasks, harness_cpu_seconds}; the rest of the
                       stage's fields are those of its round of median msg/s, number ``round``
    dns                {max_per_name_type, name_types, repeated: {"name TYPE": count > 1}} from the
                       sandbox DNS server's per-(name, type) counters over the stage
    steady             (mxq_steady) {rate_target, rate_achieved, late_submissions (started > 5 ms
                       after their slot), max_lag_ms, submit_call_ms {p50, p99, max},
                       monitor_interval_ms}
    backlog            (mxq_backlog) {messages, batch, content_bytes, submit_seconds,
                       redis_used_memory_baseline, _queued, _drained (bytes),
                       redis_memory_per_content_byte, redis_bytes_per_message, drain_seconds,
                       drain_msgs_per_sec, rss: {interval_s, ready_seconds (spawn -> every
                       worker ready), rule, warmup_fraction, limit,
                       processes: [{pid, cmd, samples, first_kb, first_after_warmup_kb, peak_kb,
                       last_kb, ratio, flat}], total: {same, summed}, max_ratio, flat}}
    slow               (slow_postfix, slow_mxq) {domains, per_domain, delay_s,
                       concurrency_per_domain, ideal_seconds, ideal_msgs_per_sec, of_ideal}
    dead               (dead_mxq) {dead_domains, dead_messages, healthy_messages, connect_timeout,
                       deferred_with_reason, lost, states: {state: recipients}, all_deferred,
                       seconds_to_all_deferred, reasons: {text: count} (top 3), sweeps,
                       queue: {domain: {ready, in_flight, deferred}} (mxq queue's view),
                       connecting_peak, connecting_at_done (connection attempts stuck on the dead
                       exchanges -- SYN-SENT sockets -- at most while the healthy mail flowed, and
                       when it was all at the sinks), syns_dropped_at_done, syns_dropped (SYNs the
                       drop rule counted by then, retransmissions included),
                       pairs: [{pair, order ("without first" | "with first"), without, with: RUN,
                       ratio (with / without healthy msg/s), ratio_from_first_submission (the
                       same with the healthy mail timed from the dead mail's first submission),
                       cpu_ratio (of worker CPU per message)}] -- pair 1 is dead_mxq_base and this
                       stage's own run, each further pair two fresh runs in the order opposite to
                       the pair before --, ratios, ratio_median (the verdict), ratio_min, ratio_max,
                       ratio_from_first_submission_median, dead_submission_s_median (seconds from
                       the dead mail's first submission to the healthy mail's), cpu_ms_per_msg_median:
                       {without, with}, cpu_ratio_median, connecting_peak_max, pairs_wrong (pairs
                       whose dead-domain mail was lost or final)}
                       RUN: {msgs_per_sec, seconds, worker_cpu_s, worker_cpu_ms_per_msg (per healthy
                       message), redis_cpu_s, redis_commands, tasks, sessions (until the healthy
                       mail was in), exactly_once, load1, timeline (the stage's, without
                       per_second); with the dead domains also
                       connecting_peak, syns_dropped, lost, final}
    inflight           (inflight_mxq) {deliveries, domains, delay_s, interval_s, samples,
                       peak_in_flight, peak_connections, connections_at_peak, rss_kb_before,
                       rss_kb_at_peak, rss_growth_kb, rss_kb_per_delivery, processes_before,
                       processes_at_peak, seconds_to_peak}
"""

from __future__ import annotations

import statistics

STAGE_ORDER = ("limit", "django_celery_email", "postfix", "mxq", "mxq_django", "mxq_steady", "mxq_backlog",
               "slow_postfix", "slow_mxq", "dead_postfix_base", "dead_postfix", "dead_mxq_base", "dead_mxq",
               "inflight_mxq")
LABELS = {
    "limit": "smtp-source -> smtp-sink (limit)",
    "django_celery_email": "django-celery-email 3.0",
    "postfix": "Postfix end to end",
    "mxq": "mxq",
    "mxq_django": "mxq via Django send_messages",
    "mxq_steady": "mxq steady rate",
    "mxq_backlog": "mxq backlog drain",
    "slow_postfix": "slow: Postfix",
    "slow_mxq": "slow: mxq",
    "dead_postfix_base": "dead: Postfix, no dead domains",
    "dead_postfix": "dead: Postfix, healthy mail",
    "dead_mxq_base": "dead: mxq, no dead domains",
    "dead_mxq": "dead: mxq, healthy mail",
    "inflight_mxq": "inflight: mxq",
}
MXQ_STAGES = ("mxq", "mxq_django", "mxq_steady", "mxq_backlog", "slow_mxq", "dead_mxq_base", "dead_mxq",
              "inflight_mxq")
#: (key, numerator stage, denominator stage): msg/s ratios, each measured in the same invocation.
RATIOS = (("mxq/django_celery_email", "mxq", "django_celery_email"), ("mxq/postfix", "mxq", "postfix"),
          ("mxq/limit", "mxq", "limit"), ("mxq_django/django_celery_email", "mxq_django", "django_celery_email"),
          ("slow_mxq/slow_postfix", "slow_mxq", "slow_postfix"), ("dead_mxq/dead_mxq_base", "dead_mxq", "dead_mxq_base"),
          ("dead_postfix/dead_postfix_base", "dead_postfix", "dead_postfix_base"))


def _ratio(a, b) -> float | None:
    return float(f"{a / b:.4g}") if a and b else None


def ratios(stages: dict) -> dict:
    """``{key: numerator msg/s / denominator msg/s}`` for ``RATIOS`` (null unless both stages ran and completed)."""
    out = {}
    for key, num, den in RATIOS:
        a, b = stages.get(num) or {}, stages.get(den) or {}
        out[key] = _ratio(a.get("msgs_per_sec"), b.get("msgs_per_sec")) \
            if a.get("status") == "ok" and b.get("status") == "ok" else None
    for key, rs in round_ratios(stages).items():
        out[key] = float(f"{statistics.median(rs):.4g}")     # several rounds: their median is the figure
    median = _get(_ok(stages.get("dead_mxq")), "dead", "ratio_median")
    if median is not None:
        out["dead_mxq/dead_mxq_base"] = median          # several pairs: their median is the figure
    return out


def round_ratios(stages: dict) -> dict:
    """``{key: [each round's ratio]}`` for the ``RATIOS`` whose two stages ran in the same rounds
    (``ops/bench --rounds``), every round of both finished."""
    out = {}
    for key, num, den in RATIOS:
        a, b = _ok(stages.get(num)), _ok(stages.get(den))
        ra, rb = (a or {}).get("rounds"), (b or {}).get("rounds")
        if not ra or not rb or len(ra) != len(rb):
            continue
        rs = [_ratio(x["msgs_per_sec"], y["msgs_per_sec"]) for x, y in zip(ra, rb)]
        if all(r is not None for r in rs):
            out[key] = rs
    return out


def _label(name: str, params: dict) -> str:
    if name == "mxq_steady" and params.get("steady_messages"):
        return f"mxq steady {params['steady_messages']} @ {params['steady_rate']:g}/s"
    if name == "mxq_backlog" and params.get("backlog_messages"):
        return f"mxq backlog {params['backlog_messages']} drained"
    if name.startswith("slow_") and params.get("slow_domains") and params.get("slow_delay"):
        return (f"{LABELS[name]} ({params['slow_domains']}x{params['slow_per_domain']}, "
                f"{params['slow_delay']} s at the dot)")
    if name.startswith("dead_") and params.get("dead_domains") and not name.endswith("_base"):
        return f"{LABELS[name]} ({params['dead_domains']} dead domains)"
    if name == "inflight_mxq" and params.get("inflight_messages") and params.get("inflight_delay"):
        return f"inflight: mxq ({params['inflight_messages']} at {params['inflight_delay']} s)"
    return LABELS[name]


def _ok(st: dict | None) -> dict | None:
    return st if st and st.get("status") == "ok" else None


def _get(d, *path):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


#: The targets of issues 5 and 8: (name, label, op, limit, source stage(s), what the value is).
#: A limit of ``"params:KEY"`` is the run's own parameter (the in-flight count asked for).
TARGETS = (
    ("mxq/django_celery_email", "throughput mxq / django-celery-email", ">=", 1.3, "mxq, django_celery_email",
     "msg/s ratio (ratios)"),
    ("mxq/postfix", "throughput mxq / Postfix", None, None, "mxq, postfix", "msg/s ratio (ratios)"),
    ("mxq/limit", "throughput mxq / loopback limit", None, None, "mxq, limit", "msg/s ratio (ratios)"),
    ("mxq_django/django_celery_email", "Django send_messages: mxq / django-celery-email", ">=", 1.3,
     "mxq_django, django_celery_email", "msg/s ratio: the same Django EmailMessage objects through each backend"),
    ("dns_queries_per_name_type", "DNS queries per name+type (max)", "<=", 1, ", ".join(MXQ_STAGES),
     "the most any one (name, type) was asked in any mxq stage (record TTL longer than the stage)"),
    ("redis_commands_per_message", "Redis commands per message", "<=", 10, "mxq",
     "all Redis commands (producer, workers, beat) / delivered messages, throughput stage"),
    ("latency_p50_ms", "latency p50 at steady rate (ms)", "<", 50, "mxq_steady",
     "submission -> sink, p50, at the steady rate"),
    ("redis_memory_per_content_byte", "Redis memory / queued content", "<", 2.0, "mxq_backlog",
     "used_memory growth over the bytes of the queued messages"),
    ("worker_rss_flat", "worker RSS flat while draining (max last/first)", "<=", 1.2, "mxq_backlog",
     "largest last / first-after-warm-up RSS ratio of any worker process (backlog.rss.rule)"),
    ("slow_mxq/slow_postfix", "slow exchanges: mxq / Postfix", ">=", 2.0, "slow_mxq, slow_postfix",
     "msg/s ratio, mxq at its defaults; a stage that did not finish counts its partial rate and fails"),
    ("slow_mxq/ideal", "slow exchanges: mxq / ideal", None, None, "slow_mxq",
     "msg/s over what the destinations allow (slow.ideal_msgs_per_sec)"),
    ("dead_mxq/dead_mxq_base", "dead exchanges: mxq healthy msg/s, with / without", ">=", 0.9,
     "dead_mxq, dead_mxq_base", "healthy-domain msg/s with the dead domains' mail first over without it: "
     "the median of the stage's pairs (dead.pairs), each pair's runs in turn"),
    ("dead_deferred_with_reason", "dead exchanges: recipients deferred with reason", ">=", 1.0, "dead_mxq",
     "fraction of the dead domains' recipients in state deferred with a reason (mxq.tasks.status), none lost"),
    ("dead_postfix/dead_postfix_base", "dead exchanges: Postfix, with / without", None, None,
     "dead_postfix, dead_postfix_base", "Postfix's healthy-mail msg/s ratio (reference)"),
    ("inflight_peak", "deliveries in flight (peak)", ">=", "params:inflight_messages", "inflight_mxq",
     "most messages held by the sink awaiting its delayed final-dot reply at one sample"),
    ("inflight_rss_kb_per_delivery", "worker RSS per delivery in flight (kB)", "<=", 200, "inflight_mxq",
     "RSS of every worker process at the peak minus before submission, over the deliveries in flight then"),
)


def _cmp(value, op, limit) -> bool | None:
    if value is None or limit is None or op is None:
        return None
    return {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]


def _rate(st: dict | None) -> tuple[float | None, bool]:
    """A stage's msg/s, and whether it is only the partial rate of a stage that did not finish."""
    if not st:
        return None, False
    if st.get("status") == "ok":
        return st.get("msgs_per_sec"), False
    return _get(st, "partial", "msgs_per_sec"), True


def targets(result: dict) -> dict:
    """``{name: {value, limit, op, pass, source, what, by_stage, partial}}`` for every target (see TARGETS).

    A ratio whose numerator stage did not finish takes that stage's partial
    rate (``partial`` true) and fails whatever its value; an unjudged target
    (its stage not run, or no limit) has ``pass`` null.
    """
    stages = result.get("stages") or {}
    params = result.get("params") or {}
    ratios_ = result.get("ratios") or {}
    num_den = {key: (num, den) for key, num, den in RATIOS}
    out = {}
    for name, _, op, limit, source, what in TARGETS:
        by_stage = None
        partial = False
        if isinstance(limit, str) and limit.startswith("params:"):
            limit = params.get(limit.split(":", 1)[1])
        if name in num_den:                    # the throughput ratios
            value = ratios_.get(name)
            num, den = num_den[name]
            if value is None and _ok(stages.get(den)):
                rate, partial = _rate(stages.get(num))
                value = _ratio(rate, stages[den].get("msgs_per_sec")) if partial else None
        elif name == "slow_mxq/ideal":
            value = _get(_ok(stages.get("slow_mxq")), "slow", "of_ideal")
        elif name == "dns_queries_per_name_type":
            by_stage = {s: _get(_ok(stages.get(s)), "dns", "max_per_name_type") for s in MXQ_STAGES if s in stages}
            vals = [v for v in by_stage.values() if v is not None]
            value = max(vals) if vals else None
        elif name == "redis_commands_per_message":
            by_stage = {s: _get(_ok(stages.get(s)), "redis", "commands_per_message") for s in MXQ_STAGES
                        if s in stages}
            value = by_stage.get("mxq")
        elif name == "latency_p50_ms":
            value = _get(_ok(stages.get("mxq_steady")), "latency_ms", "p50")
        elif name == "redis_memory_per_content_byte":
            value = _get(_ok(stages.get("mxq_backlog")), "backlog", "redis_memory_per_content_byte")
        elif name == "worker_rss_flat":
            value = _get(_ok(stages.get("mxq_backlog")), "backlog", "rss", "max_ratio")
        elif name == "dead_deferred_with_reason":
            dead = _get(_ok(stages.get("dead_mxq")), "dead")
            value = round(dead["deferred_with_reason"] / dead["dead_messages"], 4) \
                if dead and dead.get("dead_messages") else None
        elif name in ("inflight_peak", "inflight_rss_kb_per_delivery"):
            st = stages.get("inflight_mxq") or {}
            block = st.get("inflight") or _get(st, "partial", "inflight")
            partial = bool(block) and st.get("status") != "ok"
            value = _get(block, "peak_in_flight" if name == "inflight_peak" else "rss_kb_per_delivery")
        else:                                   # pragma: no cover - TARGETS and this list go together
            value = None
        verdict = _cmp(value, op, limit)
        if name == "worker_rss_flat" and value is not None:
            verdict = _get(stages, "mxq_backlog", "backlog", "rss", "flat")
        if name == "dead_deferred_with_reason" and value is not None:
            verdict = bool(verdict) and _get(stages, "dead_mxq", "dead", "lost") == 0 \
                and not _get(stages, "dead_mxq", "dead", "pairs_wrong")
        if partial and verdict is not None:
            verdict = False
        out[name] = {"value": value, "limit": limit, "op": op, "pass": verdict, "source": source,
                     "what": what, "by_stage": by_stage, "partial": partial}
    return out


def targets_ok(tg: dict) -> bool | None:
    """False if a judged target fails, True if every judged target passes, None if none was judged."""
    judged = [t["pass"] for t in tg.values() if t["pass"] is not None]
    return all(judged) if judged else None


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def table(result: dict) -> str:
    """The results as a fixed-width text table, then the ratios."""
    cols = ("stage", "status", "msg/s", "secs", "p50 ms", "p99 ms", "exactly once", "DNS q",
            "DNS max/key", "redis cmd/msg", "redis B/queued", "peak RSS MB (max, sum)")
    params = result.get("params") or {}
    rows = [cols]
    for name in STAGE_ORDER:
        st = result["stages"].get(name)
        if st is None:
            continue
        lat = st.get("latency_ms") or {}
        sinks = st.get("sinks") or {}
        redis = st.get("redis") or {}
        workers = st.get("workers") or []
        rss = [w["peak_rss_kb"] / 1024 for w in workers]
        backlog = st.get("backlog") or {}
        mem = redis.get("memory_per_queued_message")
        if mem is None and backlog.get("redis_bytes_per_message") is not None:
            mem = backlog["redis_bytes_per_message"]
        part = st.get("partial") or {}
        rate = _fmt(st.get("msgs_per_sec"), ".0f")
        secs = _fmt(st.get("seconds"), ".2f")
        if st["status"] != "ok" and part.get("msgs_per_sec") is not None:
            # How far a stage that broke off got: "(rate)" and "(seconds, at_sinks/expected)".
            rate = f"({part['msgs_per_sec']:.{0 if part['msgs_per_sec'] >= 10 else 1}f})"
            secs = f"({part['seconds']:.0f}: {part['at_sinks']}/{part['expected']})"
        rows.append((
            _label(name, params), st["status"], rate, secs,
            _fmt(lat.get("p50"), ".0f"), _fmt(lat.get("p99"), ".0f"),
            ("yes" if sinks.get("exactly_once") else "NO") if sinks else "-",
            _fmt(st.get("dns_queries")), _fmt((st.get("dns") or {}).get("max_per_name_type")),
            _fmt(redis.get("commands_per_message"), ".1f"), _fmt(mem),
            f"{max(rss):.0f}, {sum(rss):.0f} ({len(rss)} procs)" if rss else "-",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
                               for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    env = result.get("environment", {})
    if env.get("loadavg"):
        after = env.get("loadavg_after") or [None]
        lines.append(f"load average (1 min) before {env['loadavg'][0]:.2f}, after {_fmt(after[0], '.2f')} "
                     f"on {env.get('cpus')} CPUs: other work on the machine skews the figures")
    rounds = round_ratios(result["stages"])
    for key, val in result["ratios"].items():
        lines.append(f"{key:<31} {_fmt(val, '.2f')}" + (
            f"  (median of {len(rounds[key])} rounds: {', '.join(_fmt(r, '.2f') for r in rounds[key])})"
            if key in rounds else ""))
    tg = result.get("targets")
    if tg:
        lines.append("")
        labels = {name: label for name, label, *_ in TARGETS}
        trows = [("target (issues 5, 8)", "value", "limit", "verdict")]
        for name, t in tg.items():
            v = t["value"]
            val = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
            if t.get("partial") and v is not None:
                val += " (did not finish)"
            lim = "-" if t["limit"] is None else f"{t['op']} {t['limit']:g}"
            verdict = {True: "PASS", False: "FAIL", None: "-" if v is None else "(reported)"}[t["pass"]]
            trows.append((labels.get(name, name), val, lim, verdict))
        tw = [max(len(r[i]) for r in trows) for i in range(4)]
        for k, r in enumerate(trows):
            lines.append("  ".join(c.ljust(tw[i]) if i == 0 else c.rjust(tw[i]) for i, c in enumerate(r)))
            if k == 0:
                lines.append("  ".join("-" * w for w in tw))
        steady = _get(_ok(result["stages"].get("mxq_steady")), "steady")
        if steady:
            lines.append(f"steady stage: offered {steady['rate_target']:g}/s, achieved {_fmt(steady['rate_achieved'])}/s, "
                         f"{steady['late_submissions']} late submissions (max lag {steady['max_lag_ms']} ms), "
                         f"submit call p50 {steady['submit_call_ms']['p50']} ms")
        bl = _get(_ok(result["stages"].get("mxq_backlog")), "backlog")
        if bl:
            rss = bl["rss"]["total"]
            lines.append(f"backlog stage: {bl['messages']} queued in {bl['submit_seconds']:.1f} s, Redis "
                         f"+{(bl['redis_used_memory_queued'] - bl['redis_used_memory_baseline']) / 1e6:.1f} MB for "
                         f"{bl['content_bytes'] / 1e6:.1f} MB of content; drained in {bl['drain_seconds']:.1f} s "
                         f"({_fmt(bl['drain_msgs_per_sec'], '.0f')} msg/s); worker RSS total first/after-warm-up/"
                         f"peak/last {_fmt(rss['first_kb'])}/{_fmt(rss['first_after_warmup_kb'])}/"
                         f"{_fmt(rss['peak_kb'])}/{_fmt(rss['last_kb'])} kB")
            lines.append(f"  RSS rule: {bl['rss']['rule']}")
        lines += _exchange_lines(result)
    for name in STAGE_ORDER:
        st = result["stages"].get(name)
        if st and st["status"] != "ok":
            lines.append(f"{name} FAILED: {str(st['error']).splitlines()[0] if st['error'] else '?'}")
    return "\n".join(lines)


def _exchange_lines(result: dict) -> list[str]:
    """Summary lines of the slow, dead and inflight stages (issue 8)."""
    stages = result["stages"]
    lines = []
    slow = {name: (stages.get(name) or {}).get("slow") for name in ("slow_postfix", "slow_mxq")}
    sl = slow["slow_mxq"] or slow["slow_postfix"]
    if sl:
        lines.append(f"slow stage: ideal {sl['ideal_msgs_per_sec']:g} msg/s ({sl['concurrency_per_domain']} connections "
                     f"x {sl['domains']} domains, {sl['per_domain']} messages each: {sl['ideal_seconds']:g} s); "
                     + ", ".join(f"{LABELS[k].split(': ')[1]} {_fmt(v['of_ideal'])} of it"
                                 for k, v in slow.items() if v))
    dead = _get(stages, "dead_mxq", "dead")
    if dead:
        lines.append(f"dead stage (mxq): {dead['deferred_with_reason']}/{dead['dead_messages']} dead-domain recipients "
                     f"deferred with a reason, {dead['lost']} lost, states {dead['states']}"
                     + (f", all deferred {dead['seconds_to_all_deferred']} s after the first submission"
                        if dead.get("all_deferred") else "")
                     + (f"; e.g. {next(iter(dead['reasons']))!r}" if dead.get("reasons") else ""))
        if dead.get("pairs"):
            cpu = dead["cpu_ms_per_msg_median"]
            lines.append(f"dead stage (mxq) pairs: healthy msg/s with / without {dead['ratios']} "
                         f"(median {_fmt(dead['ratio_median'])}, {_fmt(dead['ratio_min'])}-{_fmt(dead['ratio_max'])}; "
                         f"timed from the dead mail's first submission instead, median "
                         f"{_fmt(dead.get('ratio_from_first_submission_median'))}: submitting it took "
                         f"{_fmt(dead.get('dead_submission_s_median'))} s); "
                         f"worker CPU per healthy message {_fmt(cpu['without'])} ms without, {_fmt(cpu['with'])} ms "
                         f"with (median of the pairs' ratios {_fmt(dead['cpu_ratio_median'])}); connection "
                         f"attempts stuck on the dead exchanges while the healthy mail flowed: at most "
                         f"{_fmt(dead['connecting_peak_max'])}")
    st = stages.get("inflight_mxq") or {}
    fl = st.get("inflight") or _get(st, "partial", "inflight")
    if fl:
        lines.append(f"inflight stage: peak {fl['peak_in_flight']} of {fl['deliveries']} deliveries in flight "
                     f"({fl['connections_at_peak']} connections open at the sink then, {fl['peak_connections']} at most), "
                     f"worker RSS {_fmt(fl['rss_kb_before'])} kB before -> {_fmt(fl['rss_kb_at_peak'])} kB at the peak "
                     f"({fl['processes_at_peak']} processes): {_fmt(fl['rss_kb_per_delivery'])} kB per delivery in flight")
    return lines

"""The benchmark's output: the human table and the ratios.

The JSON result (``--json PATH``, default ``var/bench/result.json``)::

    benchmark     "mxq issue 5"
    params        messages, domains, size, quick, stages, settle, timeout, postfix_clients,
                  postfix_dns, limit_sessions, batch, mxq_workers, mxq_concurrency,
                  steady_messages, steady_rate, backlog_messages, rss_interval, dns_ttl, strict
    environment   cpus, loadavg (before), loadavg_after, platform, python, postfix, redis,
                  celery, django, django_celery_email (versions)
    started       UTC time stamp
    stages        {"limit" | "django_celery_email" | "postfix" | "mxq" | "mxq_steady" |
                   "mxq_backlog": STAGE}
    ratios        {"mxq/django_celery_email", "mxq/postfix", "mxq/limit"}: msg/s ratios, null
                  unless both sides ran
    targets       {name: TARGET} for every target of issue 5 (see TARGETS below)
    targets_ok    true if every judged target passes, false if one fails, null if none judged
    ok            true only if every selected stage ran and was exactly-once (targets are
                  reported, not part of it; --strict makes a failing target exit 1 too)
    error         (only when the run itself broke off)

    TARGET:
    value         the measured figure (null when its stage did not run or failed)
    limit         the bound of issue 5 (null: none given, reported only)
    op            "<" or "<=": pass = value OP limit
    pass          true / false, null when not judged (no value or no limit)
    source        the stage(s) the value comes from; by_stage: the figure of each mxq stage

    STAGE:
    status             "ok" | "failed";  error: why it failed (null when ok)
    messages           N
    seconds            first submission -> the sinks hold all N messages
    msgs_per_sec       N / seconds
    submit_seconds     first submission -> the last submission call returned
    latency_ms         {p50, p99, max, samples, resolution_ms}: X-Bench-Submitted -> seen at the
                       sink (null for the limit stage: smtp-source's messages carry no stamp)
    sinks              {records (dumped), smtp_sink_counter (smtp-sink -c), unique_ids, duplicates,
                        missing, unexpected, exactly_once, bytes_per_record, sinks}
    dns_queries        queries the sandbox DNS server answered during the stage
    redis              {commands_total, commands_per_message, top_commands,
                        memory_per_queued_message (bytes), memory_probe_messages} (Celery stages)
    workers            [{pid, cmd, peak_rss_kb}] (VmHWM of each worker / Postfix process)
    harness_cpu_seconds {dns_server, sinks, monitor, submitting_process} CPU used meanwhile
    notes              how the stage was run; any disagreement found
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
"""

from __future__ import annotations

STAGE_ORDER = ("limit", "django_celery_email", "postfix", "mxq", "mxq_steady", "mxq_backlog")
LABELS = {
    "limit": "smtp-source -> smtp-sink (limit)",
    "django_celery_email": "django-celery-email 3.0",
    "postfix": "Postfix end to end",
    "mxq": "mxq",
    "mxq_steady": "mxq steady rate",
    "mxq_backlog": "mxq backlog drain",
}
MXQ_STAGES = ("mxq", "mxq_steady", "mxq_backlog")
RATIOS = (("mxq/django_celery_email", "django_celery_email"), ("mxq/postfix", "postfix"), ("mxq/limit", "limit"))


def ratios(stages: dict) -> dict:
    """``{"mxq/django_celery_email": x, "mxq/postfix": y, "mxq/limit": z}`` (null where a side failed)."""
    out = {}
    mxq = stages.get("mxq") or {}
    for key, other in RATIOS:
        o = stages.get(other) or {}
        a, b = mxq.get("msgs_per_sec"), o.get("msgs_per_sec")
        out[key] = float(f"{a / b:.4g}") if (mxq.get("status") == "ok" and o.get("status") == "ok" and a and b) else None
    return out


def _label(name: str, params: dict) -> str:
    if name == "mxq_steady" and params.get("steady_messages"):
        return f"mxq steady {params['steady_messages']} @ {params['steady_rate']:g}/s"
    if name == "mxq_backlog" and params.get("backlog_messages"):
        return f"mxq backlog {params['backlog_messages']} drained"
    return LABELS[name]


def _ok(st: dict | None) -> dict | None:
    return st if st and st.get("status") == "ok" else None


def _get(d, *path):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


#: The targets of issue 5: (name, label, op, limit, source stage(s), what the value is).
TARGETS = (
    ("mxq/django_celery_email", "throughput mxq / django-celery-email", None, None, "mxq, django_celery_email",
     "msg/s ratio (ratios)"),
    ("mxq/postfix", "throughput mxq / Postfix", None, None, "mxq, postfix", "msg/s ratio (ratios)"),
    ("mxq/limit", "throughput mxq / loopback limit", None, None, "mxq, limit", "msg/s ratio (ratios)"),
    ("dns_queries_per_name_type", "DNS queries per name+type (max)", "<=", 1, "mxq, mxq_steady, mxq_backlog",
     "the most any one (name, type) was asked in any mxq stage (record TTL longer than the stage)"),
    ("redis_commands_per_message", "Redis commands per message", "<=", 10, "mxq",
     "all Redis commands (producer, workers, beat) / delivered messages, throughput stage"),
    ("latency_p50_ms", "latency p50 at steady rate (ms)", "<", 50, "mxq_steady",
     "submission -> sink, p50, at the steady rate"),
    ("redis_memory_per_content_byte", "Redis memory / queued content", "<", 2.0, "mxq_backlog",
     "used_memory growth over the bytes of the queued messages"),
    ("worker_rss_flat", "worker RSS flat while draining (max last/first)", "<=", 1.2, "mxq_backlog",
     "largest last / first-after-warm-up RSS ratio of any worker process (backlog.rss.rule)"),
)


def _cmp(value, op, limit) -> bool | None:
    if value is None or limit is None or op is None:
        return None
    return value < limit if op == "<" else value <= limit


def targets(result: dict) -> dict:
    """``{name: {value, limit, op, pass, source, by_stage}}`` for every target of issue 5 (see TARGETS)."""
    stages = result.get("stages") or {}
    ratios_ = result.get("ratios") or {}
    out = {}
    for name, _, op, limit, source, what in TARGETS:
        by_stage = None
        if "/" in name:                        # the throughput ratios
            value = ratios_.get(name)
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
        else:                                   # pragma: no cover - TARGETS and this list go together
            value = None
        verdict = _cmp(value, op, limit)
        if name == "worker_rss_flat" and value is not None:
            verdict = _get(stages, "mxq_backlog", "backlog", "rss", "flat")
        out[name] = {"value": value, "limit": limit, "op": op, "pass": verdict, "source": source,
                     "what": what, "by_stage": by_stage}
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
        rows.append((
            _label(name, params), st["status"], _fmt(st.get("msgs_per_sec"), ".0f"), _fmt(st.get("seconds"), ".2f"),
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
    for key, val in result["ratios"].items():
        lines.append(f"{key:<26} {_fmt(val, '.2f')}")
    tg = result.get("targets")
    if tg:
        lines.append("")
        labels = {name: label for name, label, *_ in TARGETS}
        trows = [("target (issue 5)", "value", "limit", "verdict")]
        for name, t in tg.items():
            v = t["value"]
            val = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
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
    for name in STAGE_ORDER:
        st = result["stages"].get(name)
        if st and st["status"] != "ok":
            lines.append(f"{name} FAILED: {str(st['error']).splitlines()[0] if st['error'] else '?'}")
    return "\n".join(lines)

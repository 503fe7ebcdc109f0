"""The benchmark's output: the human table and the ratios.

The JSON result (``--json PATH``, default ``var/bench/result.json``)::

    benchmark     "mxq issue 5"
    params        messages, domains, size, quick, stages, settle, timeout, postfix_clients,
                  postfix_dns, limit_sessions, batch, mxq_workers, mxq_concurrency
    environment   cpus, loadavg (before), loadavg_after, platform, python, postfix, redis,
                  celery, django, django_celery_email (versions)
    started       UTC time stamp
    stages        {"limit" | "django_celery_email" | "postfix" | "mxq": STAGE}
    ratios        {"mxq/django_celery_email", "mxq/postfix", "mxq/limit"}: msg/s ratios, null
                  unless both sides ran
    ok            true only if every selected stage ran and was exactly-once
    error         (only when the run itself broke off)

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
"""

from __future__ import annotations

STAGE_ORDER = ("limit", "django_celery_email", "postfix", "mxq")
LABELS = {
    "limit": "smtp-source -> smtp-sink (limit)",
    "django_celery_email": "django-celery-email 3.0",
    "postfix": "Postfix end to end",
    "mxq": "mxq",
}
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


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def table(result: dict) -> str:
    """The results as a fixed-width text table, then the ratios."""
    cols = ("stage", "status", "msg/s", "secs", "p50 ms", "p99 ms", "exactly once", "DNS q",
            "redis cmd/msg", "redis B/queued", "peak RSS MB (max, sum)")
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
        rows.append((
            LABELS[name], st["status"], _fmt(st.get("msgs_per_sec"), ".0f"), _fmt(st.get("seconds"), ".2f"),
            _fmt(lat.get("p50"), ".0f"), _fmt(lat.get("p99"), ".0f"),
            ("yes" if sinks.get("exactly_once") else "NO") if sinks else "-",
            _fmt(st.get("dns_queries")), _fmt(redis.get("commands_per_message"), ".1f"),
            _fmt(redis.get("memory_per_queued_message")),
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
    for name in STAGE_ORDER:
        st = result["stages"].get(name)
        if st and st["status"] != "ok":
            lines.append(f"{name} FAILED: {str(st['error']).splitlines()[0] if st['error'] else '?'}")
    return "\n".join(lines)

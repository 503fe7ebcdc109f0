"""The benchmark's output: the human table and the ratios."""

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

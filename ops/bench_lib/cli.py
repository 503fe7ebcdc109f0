"""``ops/bench``: argument parsing and orchestration (``python -m bench_lib`` with ops/ on the path)."""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import exchanges, report, sandbox, stages
from .sandbox import BenchError

#: ``--stages`` keys -> the stage results they produce (name in the JSON, function), in order.
STAGES = {
    "limit": [("limit", stages.limit)],
    "dce": [("django_celery_email", stages.django_celery_email)],
    "postfix": [("postfix", stages.postfix)],
    "mxq": [("mxq", stages.mxq)],
    "django": [("mxq_django", stages.mxq_django)],
    "steady": [("mxq_steady", stages.mxq_steady)],
    "backlog": [("mxq_backlog", stages.mxq_backlog)],
    "slow": [("slow_postfix", exchanges.slow_postfix), ("slow_mxq", exchanges.slow_mxq)],
    "dead": [("dead_postfix_base", exchanges.dead_postfix_base), ("dead_postfix", exchanges.dead_postfix),
             ("dead_mxq_base", exchanges.dead_mxq_base), ("dead_mxq", exchanges.dead_mxq)],
    "inflight": [("inflight_mxq", exchanges.inflight_mxq)],
}
DEFAULT_STAGES = "limit,dce,postfix,mxq,django,steady,backlog,slow,dead,inflight"
#: The loopback comparison's stages: with --rounds R > 1 they run R rounds in turn (see run_rounds).
ROUNDED = ("dce", "mxq", "django")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see ``ops/bench --help``)."""
    p = argparse.ArgumentParser(
        prog="ops/bench",
        description="Benchmark mxq against django-celery-email, Postfix and smtp-source -> smtp-sink "
                    "(the loopback limit), and against slow and dead exchanges, in a private network "
                    "namespace.  Prints a table and writes JSON.")
    p.add_argument("-n", "--messages", type=int, default=10000, help="messages per stage (default 10000)")
    p.add_argument("-m", "--domains", type=int, default=100, help="recipient domains, one smtp-sink each (default 100)")
    p.add_argument("-s", "--size", type=int, default=2048, help="message size in bytes (default 2048)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200 messages, 5 domains, steady stage 100 messages, backlog stage 2000, "
                        "slow 4 domains x 3, dead 4 x 5 healthy + 2 x 5 dead with a 2 s connect timeout in 2 pairs, "
                        "inflight 10 deliveries at 1 s (each unless given explicitly)")
    p.add_argument("--stages", default=DEFAULT_STAGES,
                   help=f"comma-separated subset of {DEFAULT_STAGES} (default: all)")
    p.add_argument("--steady-messages", type=int, default=1000,
                   help="messages of the steady-rate stage (mxq, one mxq.tasks.submit each; default 1000, --quick 100)")
    p.add_argument("--steady-rate", type=float, default=100.0,
                   help="messages per second offered in the steady-rate stage (default 100)")
    p.add_argument("--backlog", dest="backlog_messages", type=int, default=100000,
                   help="messages queued with no worker running in the backlog stage, then drained "
                        "(default 100000, --quick 2000)")
    p.add_argument("--no-backlog", action="store_true", help="skip the backlog stage")
    p.add_argument("--slow-domains", type=int, default=50, help="slow stage: domains, one slow sink each (50)")
    p.add_argument("--slow-messages", dest="slow_per_domain", type=int, default=20,
                   help="slow stage: messages per domain (20)")
    p.add_argument("--slow-delay", type=int, default=1,
                   help="slow stage: seconds each sink waits before answering the final dot (1; whole seconds)")
    p.add_argument("--dead-healthy-domains", type=int, default=50, help="dead stage: instant domains (50)")
    p.add_argument("--dead-messages", dest="dead_per_domain", type=int, default=40,
                   help="dead stage: messages per domain, healthy and dead (40)")
    p.add_argument("--dead-domains", type=int, default=5, help="dead stage: domains whose exchanges drop SYNs (5)")
    p.add_argument("--dead-connect-timeout", type=float, default=None,
                   help="dead stage: mxq's MXQ_CONNECT_TIMEOUT and Postfix's smtp_connect_timeout in seconds "
                        "(default: neither set, their defaults of 30 s; --quick 2)")
    p.add_argument("--dead-pairs", type=int, default=20,
                   help="dead stage: mxq runs without and with the dead domains, in pairs alternating which "
                        "runs first; the verdict is the median ratio (20, --quick 2)")
    p.add_argument("--inflight", dest="inflight_n", type=int, default=1000,
                   help="inflight stage: deliveries meant to be in flight at once (1000, --quick 10)")
    p.add_argument("--inflight-domains", type=int, default=200,
                   help="inflight stage: domains they go to (200, i.e. 5 each; --quick 10)")
    p.add_argument("--inflight-delay", type=int, default=5,
                   help="inflight stage: seconds the sink waits before answering each final dot (5, --quick 1)")
    p.add_argument("--rss-interval", type=float, default=None,
                   help="seconds between worker RSS samples while the backlog drains (default 0.5, --quick 0.1)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 also when a target fails (by default targets are only reported)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="where to write the JSON result (default var/bench/result.json)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a stage may take to get its messages to the sinks (default 60 + N/20)")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds to keep watching for duplicates after completion (default 1, --quick 0.3)")
    p.add_argument("--postfix-clients", type=int, default=8, help="parallel SMTP submissions into Postfix (8)")
    p.add_argument("--postfix-dns", choices=("direct", "dnsmasq"), default="direct",
                   help="Postfix's resolver: the sandbox DNS server directly (default), or a caching "
                        "dnsmasq in front of it")
    p.add_argument("--limit-sessions", type=int, default=20, help="smtp-source -s for the limit stage (20)")
    p.add_argument("--batch", type=int, default=100, help="messages per submit_many call (mxq; default 100)")
    p.add_argument("--mxq-workers", type=int, default=1, help="mxq worker processes (default 1)")
    p.add_argument("--mxq-concurrency", type=int, default=None,
                   help="mxq worker -c N (default: no flag, the worker's default); a tuning flag: "
                        "the targets are meant for mxq at its defaults")
    p.add_argument("--mxq-pool", default=None,
                   help="mxq worker -P POOL (default: no flag, the worker's default); a tuning flag")
    p.add_argument("--rounds", type=int, default=5,
                   help="the loopback comparison (dce, mxq, django) runs this many rounds, each stage once a "
                        "round, the order reversed every other round; each ratio is the median of its rounds' "
                        "ratios, each stage's row its median round (5, --quick 1)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (sink dumps, logs)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    args = p.parse_args(argv)
    explicit = {a.split("=")[0] for a in argv if a.startswith("-")}
    if args.quick:
        if not explicit & {"-n", "--messages"}:
            args.messages = 200
        if not explicit & {"-m", "--domains"}:
            args.domains = 5
        if "--steady-messages" not in explicit:
            args.steady_messages = 100
        if "--backlog" not in explicit:
            args.backlog_messages = 2000
        if "--rounds" not in explicit:
            args.rounds = 1
        quick = {"--slow-domains": ("slow_domains", 4), "--slow-messages": ("slow_per_domain", 3),
                 "--dead-healthy-domains": ("dead_healthy_domains", 4), "--dead-messages": ("dead_per_domain", 5),
                 "--dead-domains": ("dead_domains", 2), "--dead-connect-timeout": ("dead_connect_timeout", 2.0),
                 "--dead-pairs": ("dead_pairs", 2),
                 "--inflight": ("inflight_n", 10), "--inflight-domains": ("inflight_domains", 10),
                 "--inflight-delay": ("inflight_delay", 1)}
        for flag, (attr, value) in quick.items():
            if flag not in explicit:
                setattr(args, attr, value)
    if args.settle is None:
        args.settle = 0.3 if args.quick else 1.0
    if args.rss_interval is None:
        args.rss_interval = 0.1 if args.quick else 0.5
    args.timeout_explicit = args.timeout is not None
    if args.timeout is None:
        args.timeout = 60 + args.messages / 20
    args.stages = ",".join({"django-celery-email": "dce"}.get(k, k) for k in args.stages.split(","))
    bad = set(args.stages.split(",")) - set(STAGES)
    if bad:
        p.error(f"unknown stages {sorted(bad)}")
    if args.no_backlog:
        args.stages = ",".join(k for k in args.stages.split(",") if k != "backlog")
        if not args.stages:
            p.error("--no-backlog leaves no stage to run")
    if args.messages < 1 or args.domains < 1 or args.size < 300:
        p.error("need --messages >= 1, --domains >= 1, --size >= 300")
    if args.steady_messages < 1 or args.steady_rate <= 0 or args.backlog_messages < 1 or args.rss_interval <= 0:
        p.error("need --steady-messages >= 1, --steady-rate > 0, --backlog >= 1, --rss-interval > 0")
    if min(args.slow_domains, args.slow_per_domain, args.slow_delay, args.dead_healthy_domains,
           args.dead_per_domain, args.dead_domains, args.dead_pairs, args.inflight_n, args.inflight_domains,
           args.inflight_delay, args.rounds) < 1:
        p.error("the slow, dead and inflight sizes and delays, and --rounds, must be >= 1")
    if max(args.domains, args.slow_domains, args.dead_healthy_domains, args.dead_domains,
           args.inflight_domains) > 250 * 250:
        p.error("at most 62500 domains per family")
    if args.dead_connect_timeout is not None and args.dead_connect_timeout <= 0:
        p.error("--dead-connect-timeout must be positive")
    return args


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _pkg(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The machine and the versions measured."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postfix": _version(["postconf", "-d", "-h", "mail_version"]),
        "redis": _version(["redis-server", "--version"]),
        "celery": _pkg("celery"),
        "django": _pkg("django"),
        "django_celery_email": _pkg("django-celery-email"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 0 only if every selected stage ran and was exactly-once.

    With ``--strict``, also 1 when a target fails (``targets_ok`` false).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        sandbox.enter_namespace([sys.executable, "-m", "bench_lib", *argv])
    except BenchError as e:
        print(f"ops/bench: {e}", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    # SIGTERM (e.g. a test timeout) unwinds through the finally below, so no child is left behind.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    root = stages.ROOT
    json_path = Path(args.json_path) if args.json_path else root / "var" / "bench" / "result.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = sandbox.make_workdir()
    dns = None
    env_before = environment()
    result: dict = {
        "benchmark": "mxq issues 5 and 8",
        "params": {"messages": args.messages, "domains": args.domains, "size": args.size, "quick": args.quick,
                   "stages": args.stages.split(","), "settle": args.settle, "timeout": args.timeout,
                   "postfix_clients": args.postfix_clients, "postfix_dns": args.postfix_dns, "limit_sessions": args.limit_sessions,
                   "batch": args.batch, "mxq_workers": args.mxq_workers,
                   "mxq_concurrency": args.mxq_concurrency, "steady_messages": args.steady_messages,
                   "steady_rate": args.steady_rate, "backlog_messages": args.backlog_messages,
                   "rss_interval": args.rss_interval, "dns_ttl": sandbox.DNS_TTL, "strict": args.strict,
                   "mxq_pool": args.mxq_pool, "slow_domains": args.slow_domains,
                   "slow_per_domain": args.slow_per_domain, "slow_delay": args.slow_delay,
                   "dead_healthy_domains": args.dead_healthy_domains, "dead_per_domain": args.dead_per_domain,
                   "dead_domains": args.dead_domains, "dead_connect_timeout": args.dead_connect_timeout,
                   "dead_pairs": args.dead_pairs, "rounds": args.rounds,
                   "inflight_messages": args.inflight_n, "inflight_domains": args.inflight_domains,
                   "inflight_delay": args.inflight_delay},
        "environment": env_before,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": {},
        "ratios": {},
        "targets": {},
        "targets_ok": None,
        "ok": False,
    }
    try:
        say(f"ops/bench: N={args.messages} M={args.domains} S={args.size} in {workdir} "
            f"(load {env_before['loadavg'][0]:.2f})")
        resolv = sandbox.bind_resolv_conf(workdir)
        dns = sandbox.start_dns({"d": args.domains, "s": args.slow_domains, "h": args.dead_healthy_domains,
                                 "x": args.dead_domains, "f": args.inflight_domains}, workdir)
        os.environ["MXQ_DNS_SERVERS"] = dns.address
        os.environ["MXQ_ALLOW_PRIVATE_DESTINATIONS"] = "1"     # the bench's exchanges are on loopback
        ctx = stages.Context(
            n=args.messages, m=args.domains, size=args.size, run=secrets.token_hex(4), workdir=workdir,
            dns=dns, timeout=args.timeout, settle=args.settle, say=say,
            postfix_clients=args.postfix_clients, limit_sessions=args.limit_sessions, batch=args.batch,
            mxq_workers=args.mxq_workers, mxq_concurrency=args.mxq_concurrency, probe=min(1000, args.messages), postfix_dns=args.postfix_dns,
            resolv_conf=resolv, steady_n=args.steady_messages, steady_rate=args.steady_rate,
            backlog_n=args.backlog_messages, rss_interval=args.rss_interval,
            timeout_explicit=args.timeout_explicit, mxq_pool=args.mxq_pool,
            slow_domains=args.slow_domains, slow_per_domain=args.slow_per_domain, slow_delay=args.slow_delay,
            dead_healthy_domains=args.dead_healthy_domains, dead_per_domain=args.dead_per_domain,
            dead_domains=args.dead_domains, dead_connect_timeout=args.dead_connect_timeout,
            dead_pairs=args.dead_pairs,
            inflight_n=args.inflight_n, inflight_domains=args.inflight_domains,
            inflight_delay=args.inflight_delay, inflight_interval=0.1 if args.quick else 0.25)
        keys = args.stages.split(",")
        rounded = [k for k in keys if k in ROUNDED] if args.rounds > 1 else []
        for key in keys:
            if key in rounded:
                if key == rounded[0]:
                    result["stages"].update(run_rounds(rounded, args.rounds, ctx, say))
                continue
            for name, fn in STAGES[key]:
                result["stages"][name] = run_stage(name, fn, ctx, say)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
    except BenchError as e:
        result["error"] = str(e)
    finally:
        # Each clean-up step on its own: one failing must not leave the others' processes behind.
        for step in (sandbox.stop_all, dns.stop if dns is not None else None):
            if step is None:
                continue
            try:
                step()
            except Exception as e:
                print(f"ops/bench: clean-up step {step.__qualname__} failed: {e}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["ratios"] = report.ratios(result["stages"])
    result["targets"] = report.targets(result)
    result["targets_ok"] = report.targets_ok(result["targets"])
    result["environment"]["loadavg_after"] = list(os.getloadavg())
    result["ok"] = bool(result["stages"]) and "error" not in result and all(
        s["status"] == "ok" and s["sinks"]["exactly_once"] for s in result["stages"].values())
    sandbox.json_dump(result, json_path)
    print(report.table(result))
    print(f"\nJSON: {json_path}" + (f"\nwork directory kept: {workdir}" if args.keep else ""))
    if result.get("error"):
        print(f"ops/bench: {result['error']}", file=sys.stderr)
    code = exit_status(result, args.strict)
    if code and result["ok"]:
        failed = [k for k, t in result["targets"].items() if t["pass"] is False]
        print(f"ops/bench: --strict: targets failed: {', '.join(failed)}", file=sys.stderr)
    return code


def run_stage(name: str, fn, ctx: stages.Context, say) -> dict:
    """Run one stage and say how it went; its result."""
    began = time.monotonic()
    res = stages.run(name, fn, ctx)
    res["wall_seconds"] = round(time.monotonic() - began, 1)
    if res["status"] == "ok":
        lat = res.get("latency_ms") or {}
        say(f"   {res['msgs_per_sec']} msg/s, {res['seconds']} s, exactly once: "
            f"{res['sinks']['exactly_once']}" + (f", p50 {lat['p50']} ms" if lat else "")
            + f" (stage {res['wall_seconds']} s with set-up)"
            + (f", {red['commands_per_message']} Redis commands and {red['tasks_per_message']} "
               f"Celery tasks a message {red['tasks']}"
               if (red := res.get("redis") or {}).get("tasks_per_message") is not None else ""))
    return res


def run_rounds(keys: list[str], rounds: int, ctx: stages.Context, say) -> dict:
    """The stages of ``keys`` (the loopback comparison) in ``rounds`` rounds: ``{name: result}``.

    A round runs each stage once, one after the other, in the order given and in the reverse
    order every other round, so the stages compared sit next to each other in time: on a machine
    whose speed drifts (this 2-core one: the loopback limit 3,687-7,948 msg/s within one
    evening, django-celery-email 1,115-2,316 msg/s), a ratio of two stages run a minute apart
    measures the drift as much as the software.  Each stage's result is its round of median
    msg/s (the lower middle one for an even count), with ``rounds``: every round's figures;
    the ratios are the medians of the rounds' ratios (``report.ratios``).  A round that failed
    makes the stage failed (its result is that round's).
    """
    runs: dict[str, list[dict]] = {}
    for r in range(1, rounds + 1):
        ctx.round = r
        say(f"== round {r} of {rounds}")
        for key in (keys if r % 2 else list(reversed(keys))):
            for name, fn in STAGES[key]:
                runs.setdefault(name, []).append(run_stage(name, fn, ctx, say))
    ctx.round = 0
    out = {}
    for name, results in runs.items():
        summary = [{"round": i + 1, "status": res["status"], "msgs_per_sec": res.get("msgs_per_sec"),
                    "seconds": res.get("seconds"), "submit_seconds": res.get("submit_seconds"),
                    "first_arrival_s": (res.get("timeline") or {}).get("first_arrival_s"),
                    "sessions": (res.get("sinks") or {}).get("sessions"),
                    "redis_commands": (res.get("redis") or {}).get("commands_total"),
                    "tasks": (res.get("redis") or {}).get("tasks"),
                    "harness_cpu_seconds": res.get("harness_cpu_seconds")} for i, res in enumerate(results)]
        failed = [res for res in results if res["status"] != "ok"]
        if failed:
            chosen = failed[0]
        else:
            ordered = sorted(results, key=lambda res: res["msgs_per_sec"])
            chosen = ordered[(len(ordered) - 1) // 2]
        out[name] = dict(chosen, rounds=summary, round=results.index(chosen) + 1)
    return out


def exit_status(result: dict, strict: bool) -> int:
    """0 if every stage ran and was exactly-once (``ok``) -- and, with ``strict``, no target failed; else 1.

    A target that was not judged (its stage not selected, or no limit given) never fails a run.
    """
    if not result.get("ok"):
        return 1
    if strict and result.get("targets_ok") is False:
        return 1
    return 0

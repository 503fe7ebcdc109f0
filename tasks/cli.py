"""The ``mxq`` command: one entry point, one sub-command per job.

``deliver`` comes from the engine (``mxq.workers.cli``); the pipeline's commands
are defined here:

- ``mxq send FILE.eml|-``   submit a message to the pipeline (``mxq.tasks.submit``),
  print its job id; ``--wait`` follows it until every recipient is final.
- ``mxq status JOB``        the job and its recipients (a table, or ``--json``).
- ``mxq worker``            a Celery worker consuming mxq's queues (extra
  options go to ``celery worker``).
- ``mxq scheduler``         the scheduler: mxq's tick, once a second, in a loop of
  its own (not Celery beat: no task a second in Flower).
- ``mxq flower``            Flower, the Celery monitor (extra options go to it).
- ``mxq up``                the whole stack on one machine, in the foreground
  (``mxq.tasks.up``).

Exit statuses follow sysexits, as ``mxq deliver``: 0 ok (all delivered),
64 usage, 65 bad input, 66 unknown job or missing file, 69 something bounced
or expired, 75 something deferred or not final yet (and nothing bounced) --
or Redis unreachable, 78 a malformed ``MXQ_*`` setting.

The Celery app (``mxq.tasks.app``) is imported only by the commands that use it,
after the environment is final, so ``mxq --help`` and ``mxq deliver`` never
need Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from mxq.workers.reply import printable

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

#: Default bound on ``mxq send --wait`` (seconds): long enough for a few
#: greylisting retries, short enough that a script never hangs for the
#: message's whole lifetime.  ``--timeout 0`` waits without a bound.
DEFAULT_WAIT_TIMEOUT = 600.0

#: Sub-commands whose unknown options are passed through to Celery / Flower.
PASSTHROUGH = ("worker", "flower")

#: States that never change again (as ``mxq.tasks.store.FINAL_STATES``): ``suppressed`` is refused at
#: submission (``mxq.tasks.suppress``), ``dropped`` given up by the operator (``mxq queue drop``).
FINAL_STATES = ("delivered", "bounced", "expired", "suppressed", "dropped")
#: Final states that mean "not delivered": the job's exit status is 69 when any recipient has one.
FAILED_STATES = ("bounced", "expired", "suppressed", "dropped")


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    from mxq.workers import cli as engine_cli

    parser = argparse.ArgumentParser(prog="mxq", description="Distributed mail delivery workers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    engine_cli.add_parser(sub)
    _add_send(sub)
    _add_status(sub)
    _add_worker(sub)
    _add_scheduler(sub)
    _add_flower(sub)
    _add_config(sub)
    from mxq.tasks import up
    up.add_parser(sub)
    import importlib.util
    if importlib.util.find_spec("mxq.tasks.admin") is not None:    # mxq queue, mxq suppress
        from mxq.tasks import admin
        admin.add_parsers(sub)
    return parser


def _add_send(sub) -> None:
    p = sub.add_parser("send", help="submit a message to the pipeline",
                       description="Submit a message (an .eml file, or - for standard input) to the "
                                   "pipeline and print its job id.  Envelope defaults come from the "
                                   "headers (From/Sender; To, Cc, Bcc).")
    from mxq.workers.cli import add_envelope_arguments
    add_envelope_arguments(p)
    p.add_argument("--json", action="store_true", help='print {"job": ID} (and the status with --wait) as JSON')
    p.add_argument("--wait", action="store_true",
                   help="follow the job until every recipient is final; exit 0/69/75 as mxq deliver")
    p.add_argument("--timeout", type=float, default=DEFAULT_WAIT_TIMEOUT, metavar="SECONDS",
                   help=f"bound on --wait (default {DEFAULT_WAIT_TIMEOUT:g}; 0: no bound); "
                        "on expiry the current status is printed and the exit status is 75")
    p.set_defaults(run=run_send)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="show a job and its recipients",
                       description="Show a submitted job and the state of each recipient.")
    p.add_argument("job", metavar="JOB", help="the job id mxq send printed")
    p.add_argument("--json", action="store_true", help='print {"job", "state", "recipients": [...]}')
    p.set_defaults(run=run_status)


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="run Celery workers on mxq's queues, one per core", allow_abbrev=False,
                       description="Run one `celery -A mxq.tasks worker -P gevent` process per CPU core "
                                   "(--processes N), each with 1000 deliveries in flight (-c N), consuming "
                                   "mxq's queues.  Any other option is passed to celery worker (e.g. "
                                   "-l debug, -Q to choose queues, -n NAME@HOST: NAME-1@HOST...; -P prefork "
                                   "runs one plain celery worker instead); `mxq worker -- --help` shows "
                                   "Celery's help.")
    p.set_defaults(run=run_worker, passthrough=True)


def _add_scheduler(sub) -> None:
    p = sub.add_parser("scheduler", help="run the scheduler (releases deferred mail, recovers lost work)",
                       description="Run mxq's scheduler: once a second one atomic step in Redis moves due "
                                   "deferred mail and the work of dead workers back to the ready lists and "
                                   "re-publishes tasks for quiet domains.  Run one (a second one is harmless).  "
                                   "It touches its heartbeat file (--schedule, $MXQ_BEAT_SCHEDULE) after "
                                   "every tick, for health checks.")
    p.add_argument("-s", "--schedule", metavar="PATH",
                   help="heartbeat file (default $MXQ_BEAT_SCHEDULE, else mxq-celerybeat-schedule in the "
                        "temporary directory)")
    p.add_argument("-l", "--loglevel", metavar="LEVEL", type=str.lower,
                   choices=("debug", "info", "warning", "error", "critical"),
                   help="log level (default $MXQ_LOG_LEVEL, info)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between ticks (1)")
    p.add_argument("--pidfile", metavar="PATH", default="", help="write the process id there ('' : none)")
    p.set_defaults(run=run_scheduler)


def _add_flower(sub) -> None:
    p = sub.add_parser("flower", help="run Flower, the Celery monitor", allow_abbrev=False,
                       description="Run `celery -A mxq.tasks flower` (default --address=127.0.0.1 "
                                   "--port=5555).  Set FLOWER_BASIC_AUTH=user:password to require "
                                   "a login; other options are passed to Flower.")
    p.set_defaults(run=run_flower, passthrough=True)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="show the effective MXQ_* settings and where each comes from",
                       description="Show the MXQ_* settings that are set (like postconf -n): the effective "
                                   "value, secrets masked, and where it comes from (environment, Django "
                                   "settings when DJANGO_SETTINGS_MODULE is set, ...).  Every value is "
                                   "checked: exit 78 naming each malformed one.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these settings (MXQ_ may be left out)")
    p.add_argument("-a", "--all", action="store_true", help="every setting, defaults included (postconf)")
    p.add_argument("-d", "--defaults", action="store_true", help="the defaults, whatever is set (postconf -d)")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, value, origin, default, secret}")
    p.add_argument("--env-example", action="store_true", help="print the .env.example for docker-compose")
    p.set_defaults(run=run_config)


def main(argv: list[str] | None = None) -> int:
    """Run ``mxq``; return the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors; sysexits says 64
        return EX_USAGE if e.code not in (0, None) else 0
    if not getattr(args, "run", None):
        parser.print_usage(sys.stderr)
        return EX_USAGE
    if extra and not getattr(args, "passthrough", False):
        parser.print_usage(sys.stderr)
        print(f"mxq: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return EX_USAGE
    args.extra = [a for a in extra if a != "--"] if extra[:1] == ["--"] else extra
    from mxq.settings import ConfigError
    if args.command not in ("deliver", "config"):   # deliver reads only the engine's settings
        import importlib
        config_error = importlib.import_module("mxq.tasks.app").config_error
        problems = [config_error] if config_error else []
        from mxq import settings as registry
        problems += [str(e) for e in registry.current().errors() if str(e) not in problems]
        if problems:
            for p in problems:
                print(f"mxq {args.command}: configuration: {p}", file=sys.stderr)
            return EX_CONFIG
    try:
        return args.run(args)
    except ConfigError as e:            # a setting found malformed on the way (a DKIM key file, ...)
        print(f"mxq {args.command}: configuration: {e}", file=sys.stderr)
        return EX_CONFIG


# -- config ---------------------------------------------------------------------------------------

def config_problems(cfg=None) -> list[str]:
    """Every configuration error of this process, each naming its variable: each setting parsed,
    then what the owners check beyond a value's type (relay mode, time limits, webhook events,
    shaping rules, the DKIM key map, the metrics port)."""
    from mxq import settings as registry

    cfg = cfg or registry.current()
    problems = [str(e) for e in cfg.errors()]
    bad = {e.name for e in cfg.errors()}

    def check(names, fn):
        if bad.intersection(names):
            return                       # already reported
        try:
            fn()
        except ValueError as e:          # ConfigError, or an owner's ValueError naming the variable
            if str(e) not in problems:
                problems.append(str(e))

    from mxq.tasks import metrics, shaping, webhooks
    from mxq.tasks.settings import PipelineSettings
    from mxq.workers.config import Settings
    from mxq.workers.dkim import DKIMSigner
    check(("MXQ_RELAY", "MXQ_RELAY_MODE"), Settings.from_env)
    check(("MXQ_TASK_SOFT_LIMIT", "MXQ_TASK_HARD_LIMIT"), PipelineSettings.from_env)
    check(("MXQ_WEBHOOK_URL", "MXQ_WEBHOOK_EVENTS"), webhooks.WebhookConfig.from_env)
    check(("MXQ_SHAPING",), shaping.Policy.from_env)
    check(("MXQ_DKIM",), DKIMSigner.from_env)
    if cfg.is_set("MXQ_METRICS_PORT"):
        check(("MXQ_METRICS_PORT",), lambda: metrics.parse_port(cfg["MXQ_METRICS_PORT"]))
    return problems


def _django_settings_loaded() -> bool:
    """With DJANGO_SETTINGS_MODULE set, load Django's settings so their MXQ_* values show."""
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return False
    try:
        from django.conf import settings
        settings.INSTALLED_APPS        # noqa: B018 -- configures the lazy settings
        return True
    except Exception as e:             # no Django, or the settings module fails to import
        print(f"mxq config: cannot load Django settings ({os.environ['DJANGO_SETTINGS_MODULE']}): {e}",
              file=sys.stderr)
        return False


def run_config(args) -> int:
    """``mxq config``: effective settings, their origin, secrets masked; 78 when any is malformed."""
    from mxq import settings as registry

    if args.env_example:
        sys.stdout.write(registry.env_example())
        return EX_OK
    _django_settings_loaded()
    cfg = registry.current()
    wanted = []
    for n in args.names:
        name = n.upper() if n.upper().startswith("MXQ_") else "MXQ_" + n.upper()
        if name not in registry.REGISTRY:
            print(f"mxq config: {n}: no such setting (mxq config --all lists them)", file=sys.stderr)
            return EX_USAGE
        wanted.append(name)
    names = wanted or [n for n in registry.REGISTRY if args.all or args.defaults or cfg.is_set(n)]
    rows = []
    for name in names:
        s = registry.REGISTRY[name]
        if args.defaults:
            value, origin = s.default_shown, "default"
        else:
            value, origin = cfg.shown(name), cfg.origin(name)
        rows.append({"name": name, "value": value, "origin": origin, "default": s.default_shown,
                     "secret": s.secret})
    problems = [] if args.defaults else config_problems(cfg)
    if args.json:
        print(json.dumps(rows))
    elif rows:
        width = max(len(r["name"]) for r in rows)
        vwidth = min(max(len(r["value"]) for r in rows), 60)
        for r in rows:
            print(f"{r['name']:<{width}} = {r['value']:<{vwidth}}  ({r['origin']})".rstrip())
    for name, origin in sorted(cfg.unknown.items()):
        if name not in ("MXQ_SKIP_APT", "MXQ_PYTHON") and not name.startswith(("MXQ_DEMO_", "MXQ_BENCH_")):
            print(f"mxq config: warning: {name} ({origin}) is not an mxq setting; ignored", file=sys.stderr)
    for p in problems:
        print(f"mxq config: error: {p}", file=sys.stderr)
    return EX_CONFIG if problems else EX_OK


# -- send and status ----------------------------------------------------------------------------

def run_send(args) -> int:
    """``mxq send``: submit, print the job id; with ``--wait`` follow it to the end."""
    from mxq.workers.cli import split_recipients
    from mxq.workers.envelope import DSN, parse_notify
    from mxq.workers.errors import InvalidInput

    if args.file == "-":
        content: object = sys.stdin.buffer.read()
    else:
        if not os.path.isfile(args.file):
            print(f"mxq send: {args.file}: no such file", file=sys.stderr)
            return EX_NOINPUT
        import pathlib
        content = pathlib.Path(args.file)
    try:
        dsn = DSN(ret=args.ret, envid=args.envid) if (args.ret or args.envid) else None
    except ValueError as e:
        print(f"mxq send: invalid input: {e}", file=sys.stderr)
        return EX_DATAERR
    import redis

    from mxq import tasks
    from mxq.tasks.settings import PipelineSettings
    from mxq.workers.message import max_message_size_from_env

    try:
        PipelineSettings.from_env()
        max_size = max_message_size_from_env()
    except ValueError as e:     # a malformed MXQ_* setting: the input may well be fine
        print(f"mxq send: configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    options = dict(sender=args.sender, recipients=split_recipients(args.recipients),
                   notify=parse_notify(args.notify), dsn=dsn)
    try:
        try:
            _check_redis()
        except redis.exceptions.RedisError:
            # Tell bad input (65: do not retry) from an outage (75: retry later).
            from mxq.tasks.producer import Item, build_job
            build_job(Item(message=content, **options), max_size=max_size, now=time.time())
            raise
        job = tasks.submit(content, **options)
    except InvalidInput as e:
        print(f"mxq send: invalid input: {e.reason}", file=sys.stderr)
        return EX_DATAERR
    except redis.exceptions.RedisError as e:
        print(f"mxq send: cannot reach Redis (MXQ_REDIS_URL): {e}; nothing was submitted", file=sys.stderr)
        return EX_TEMPFAIL
    if not args.wait:
        print(json.dumps({"job": job}) if args.json else job)
        return EX_OK
    if not args.json:
        print(job, flush=True)
    try:
        status = wait_for(job, timeout=args.timeout or None, progress=sys.stdout.isatty() and not args.json)
    except KeyboardInterrupt:   # stop watching; the job goes on in the pipeline
        print(f"\nmxq send: stopped waiting; the job goes on: mxq status {job}", file=sys.stderr)
        return EX_TEMPFAIL
    except redis.exceptions.RedisError as e:
        print(f"mxq send: lost Redis while waiting for {job}: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    if status is None:
        print(f"mxq send: job {job} disappeared", file=sys.stderr)
        return EX_SOFTWARE
    print_status(status, as_json=args.json)
    return exit_status(status)


def _check_redis() -> None:
    """Fail fast (RedisError) when Redis does not answer, instead of riding out the store
    client's ~30 s of reconnection attempts, which are meant for a restarting server."""
    import redis

    from mxq.tasks.settings import PipelineSettings
    client = redis.Redis.from_url(PipelineSettings.from_env().redis_url, socket_connect_timeout=3,
                                  socket_timeout=3)
    try:
        client.ping()
    finally:
        client.close()


def run_status(args) -> int:
    """``mxq status JOB``: the job and its recipients; 66 when the job is unknown."""
    import redis
    try:
        _check_redis()
        status = _status(args.job)
    except redis.exceptions.RedisError as e:
        print(f"mxq status: cannot reach Redis (MXQ_REDIS_URL): {e}", file=sys.stderr)
        return EX_TEMPFAIL
    if status is None:
        print(f"mxq status: no such job: {args.job} (unknown, or expired after MXQ_RESULT_TTL)",
              file=sys.stderr)
        return EX_NOINPUT
    print_status(status, as_json=args.json)
    return EX_OK


def exit_status(status: dict) -> int:
    """sysexits status of a job, as ``mxq deliver`` (``mxq.workers.cli.exit_status``): 69 if anything
    bounced, expired, was suppressed or dropped, else 75 if anything is not final, else 0."""
    from mxq.workers.cli import exit_status as engine_exit_status
    return engine_exit_status("bounced" if r.get("state") in FAILED_STATES else r.get("state")
                              for r in status.get("recipients", []))


def is_final(status: dict) -> bool:
    """True when every recipient of the job is delivered, bounced or expired."""
    recipients = status.get("recipients") or []
    return bool(recipients) and all(r.get("state") in FINAL_STATES for r in recipients)


def counts(status: dict) -> dict[str, int]:
    """Recipients per state, in a stable order."""
    out: dict[str, int] = {}
    for r in status.get("recipients", []):
        out[r.get("state", "?")] = out.get(r.get("state", "?"), 0) + 1
    return dict(sorted(out.items()))


def _status(job: str) -> dict | None:
    """``mxq.tasks.status(job)``, or None when the job is unknown (or expired)."""
    from mxq import tasks
    try:
        return tasks.status(job)
    except KeyError:
        return None


def wait_for(job: str, *, timeout: float | None, progress: bool, interval: float = 0.25,
             out=None) -> dict | None:
    """Poll ``mxq.tasks.status(job)`` until every recipient is final or ``timeout`` passes.

    With ``progress`` (a terminal), a one-line bar with per-state counts is
    redrawn in place; otherwise nothing is printed while waiting.  Returns the
    last status seen (None if the job is unknown).
    """
    out = out or sys.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    status = _status(job)
    while status is not None and not is_final(status):
        if progress:
            out.write("\r" + progress_line(status))
            out.flush()
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(interval)
        status = _status(job)
    if progress and status is not None:
        out.write("\r" + progress_line(status) + "\n")
        out.flush()
    return status


def progress_line(status: dict, width: int = 30) -> str:
    """``[#######.......] 3/7 final  delivered 2  deferred 4  bounced 1``"""
    recipients = status.get("recipients") or []
    total = len(recipients) or 1
    done = sum(1 for r in recipients if r.get("state") in FINAL_STATES)
    filled = int(width * done / total)
    parts = "  ".join(f"{k} {v}" for k, v in counts(status).items())
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{len(recipients)} final  {parts}"


def _detail(r: dict) -> str:
    reply = " ".join(str(x) for x in (r.get("code"), r.get("enhanced")) if x)
    text = printable(str(r.get("text") or ""))
    where = ""
    if r.get("exchange"):
        where = f" [{r['exchange']}" + (f" {r['ip']}" if r.get("ip") else "") + ("; relay" if r.get("relay") else "") + "]"
    return (f"{reply} {text}".strip() + where).strip()


def print_status(status: dict, *, as_json: bool = False, out=None) -> None:
    """Print a job's status: JSON (``{"job", "state", "recipients"}``), or a table."""
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(status, default=str) + "\n")
        return
    rows = status.get("recipients") or []
    head = f"job {status.get('job')}  state {status.get('state')}"
    summary = "  ".join(f"{k} {v}" for k, v in counts(status).items())
    out.write(f"{head}  ({summary})\n")
    table = [("RECIPIENT", "STATE", "DSN", "TRIES", "DETAIL")]
    for r in rows:
        table.append((str(r.get("address", "")), str(r.get("state", "")),
                      str(r.get("enhanced") or ""), str(r.get("attempts", "") or ""), _detail(r)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] + "\n")
    out.flush()


# -- worker, scheduler, flower: exec Celery -------------------------------------------------------

def celery_argv(*args: str) -> list[str]:
    """``python -m celery -A mxq.tasks ARGS``: the same interpreter (and venv) as this ``mxq``."""
    return [sys.executable, "-m", "celery", "-A", "mxq.tasks", *args]


def default_queues() -> list[str]:
    """The queues a worker consumes by default: every queue the app declares, plus notifications."""
    from mxq.tasks.app import app
    names = [q.name for q in (app.conf.task_queues or [])]
    if not names:
        names = [app.conf.task_default_queue or "celery"]
    from mxq.tasks.notify import QUEUE
    if QUEUE not in names:
        names.append(QUEUE)
    return names


def _given(extra: list[str], short: str, long: str) -> bool:
    """True when EXTRA sets an option: ``-Q x``, ``-Qx``, ``--queues x`` or ``--queues=x``."""
    return any(a in (short, long) or a.startswith(long + "=") or (a.startswith(short) and not a.startswith("--"))
               for a in extra)


def worker_argv(extra: list[str]) -> list[str]:
    """The ``celery worker`` command line for ``mxq worker EXTRA``.

    Defaults, each unless EXTRA gives its own: mxq's queues (``-Q``); a node
    name of its own, ``mxq-<pid>@<host>`` (two workers on one host are two
    nodes in Flower, and remote-control replies never mix); the log level
    ``MXQ_LOG_LEVEL`` (info: one line per delivery attempt).
    """
    argv = ["worker"]
    if not _given(extra, "-Q", "--queues"):
        argv += ["-Q", ",".join(default_queues())]
    if not _given(extra, "-n", "--hostname"):
        argv += ["--hostname", f"mxq-{os.getpid()}@%h"]
    if not _given(extra, "-l", "--loglevel"):
        from mxq import settings as registry
        argv += ["--loglevel", registry.value("MXQ_LOG_LEVEL").upper()]
    return celery_argv(*argv, *extra)


def scheduler_argv(extra: list[str]) -> list[str]:
    """The command line of ``mxq scheduler EXTRA`` (for a supervisor such as ``mxq up``)."""
    return [sys.executable, "-m", "mxq.tasks.cli", "scheduler", *extra]


def heartbeat_path(given: str | None = None) -> str:
    """The scheduler's heartbeat file: ``given``, else ``MXQ_BEAT_SCHEDULE``, else in the temp directory."""
    from mxq import settings as registry
    return given or registry.value("MXQ_BEAT_SCHEDULE") or os.path.join(tempfile.gettempdir(),
                                                                        "mxq-celerybeat-schedule")


def flower_argv(extra: list[str]) -> list[str]:
    """The ``celery flower`` command line for ``mxq flower EXTRA`` (loopback:5555 by default)."""
    argv = ["flower"]
    if not any(a.startswith("--address") for a in extra):
        argv.append("--address=127.0.0.1")
    if not any(a.startswith("--port") for a in extra):
        argv.append("--port=5555")
    return celery_argv(*argv, *extra)


def _exec(argv: list[str]) -> int:
    """Replace this process with ``argv`` (signals then go straight to Celery)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        print(f"mxq: cannot run {' '.join(argv[:3])}: {e}", file=sys.stderr)
        return EX_SOFTWARE
    return EX_SOFTWARE  # not reached


def run_worker(args) -> int:
    """``mxq worker``: one gevent worker process per core (``mxq.tasks.supervisor``), each
    ``celery -A mxq.tasks worker -Q <mxq's queues> -P gevent ...``; with another ``-P``, that one exec'd."""
    from .supervisor import run
    return run(args.extra, worker_argv)


def run_scheduler(args) -> int:
    """``mxq scheduler``: the tick once a second until SIGTERM/SIGINT (``scheduler.run_forever``)."""
    import logging
    import signal
    import threading

    from mxq import settings as registry
    from mxq.tasks import scheduler

    if args.interval <= 0:
        print("mxq scheduler: --interval must be positive", file=sys.stderr)
        return EX_USAGE
    level = (args.loglevel or registry.value("MXQ_LOG_LEVEL")).upper()
    logging.basicConfig(level=level, format="[%(asctime)s: %(levelname)s/scheduler] %(message)s")
    path = heartbeat_path(args.schedule)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def touch(ok: bool) -> None:
        if ok:
            try:
                with open(path, "a"):
                    os.utime(path)
            except OSError as e:
                logging.getLogger("mxq.scheduler").warning("cannot touch the heartbeat file %s: %s", path, e)

    touch(True)
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    from mxq.tasks.app import app
    log = logging.getLogger("mxq.scheduler")
    log.info("mxq scheduler ready: pid %d, a tick every %g s on %s, heartbeat %s", os.getpid(), args.interval,
             registry.current().shown("MXQ_REDIS_URL"), path)
    try:
        scheduler.run_forever(args.interval, stop, on_tick=touch)
    finally:
        app.pool.force_close_all()
    log.info("mxq scheduler stopped")
    return EX_OK


def run_flower(args) -> int:
    """``mxq flower``: exec ``celery -A mxq.tasks flower --address=127.0.0.1 --port=5555 ...``."""
    if not _has_module("flower"):
        print("mxq flower: flower is not installed (pip install flower)", file=sys.stderr)
        return EX_UNAVAILABLE
    return _exec(flower_argv(args.extra))


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())

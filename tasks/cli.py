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
        check(("MXQ_METRICS_PORT",), metrics.require_client)
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
    s = PipelineSettings.from_env()
    client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=s.submit_timeout,
                                  socket_timeout=max(3.0, s.submit_timeout))
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


def print_status(status: dict, *, as_json: bool = False, out=None) -> None:
    """Print a job's status: JSON (``{"job", "state", "recipients"}``), or the recipient table."""
    from mxq.tables import print_recipients

    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(status, default=str) + "\n")
        return
    summary = "  ".join(f"{k} {v}" for k, v in counts(status).items())
    out.write(f"job {status.get('job')}  state {status.get('state')}  ({summary})\n")
    print_recipients(status.get("recipients") or [], out)


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
    ``celery -A mxq.tasks worker -Q <mxq's queues> -P gevent ...``; with another ``-P``, that one exec'd.

    A feature whose extra is missing (MXQ_METRICS_PORT without prometheus_client, MXQ_DKIM
    without dkimpy) is refused here, before Celery starts: exit 78 naming the setting and the extra.
    """
    from mxq import settings as registry
    from mxq.tasks import metrics
    from mxq.workers.dkim import signer_from_env

    try:
        if registry.current().is_set("MXQ_METRICS_PORT"):
            metrics.require_client()
        signer_from_env()
    except ValueError as e:
        print(f"mxq worker: configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    from mxq.tasks.settings import PipelineSettings
    from mxq.tasks.store import check_on_start
    try:        # before any child starts: a refused Redis ends the worker at once (exit 78)
        check_on_start(PipelineSettings.from_env().redis_url)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return EX_CONFIG
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

    from mxq.tasks.settings import PipelineSettings
    from mxq.tasks.store import check_on_start
    try:
        check_on_start(PipelineSettings.from_env().redis_url)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return EX_CONFIG
    if registry.current().is_set("MXQ_METRICS_PORT"):     # the fleet-wide queue depths, served once
        from mxq.tasks import metrics
        from mxq.tasks.settings import PipelineSettings
        try:
            metrics.require_client()
            metrics.serve_queue_depths(PipelineSettings.from_env().redis_url)
        except (ValueError, OSError) as e:
            print(f"mxq scheduler: {e}", file=sys.stderr)
            return EX_CONFIG
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
        print("mxq flower: Flower is not installed: pip install 'mxq[flower]'", file=sys.stderr)
        return EX_UNAVAILABLE
    return _exec(flower_argv(args.extra))


def _has_module(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# -- the command line (click) ---------------------------------------------------------------------

import click  # noqa: E402  (click comes with Celery; imported here so the helpers above stay light)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: For worker and flower: every option mxq does not know goes to Celery / Flower.
PASSTHROUGH_CONTEXT = dict(CONTEXT, ignore_unknown_options=True, allow_extra_args=True)
#: Commands that never need the pipeline's settings checked first.
NO_CONFIG_CHECK = ("deliver", "config", "completion")


def _ns(**kw) -> argparse.Namespace:
    """The ``args`` object the ``run_*`` functions take."""
    return argparse.Namespace(**kw)


class MxqGroup(click.Group):
    """The ``mxq`` group: commands listed in the order they were added (the order of the docs)."""

    def list_commands(self, ctx):
        return list(self.commands)


def _check_config(ctx: click.Context) -> None:
    """Refuse to run a pipeline command with a malformed ``MXQ_*`` value (exit 78, each named)."""
    import importlib

    from mxq import settings as registry
    config_error = importlib.import_module("mxq.tasks.app").config_error
    problems = [config_error] if config_error else []
    problems += [str(e) for e in registry.current().errors() if str(e) not in problems]
    if problems:
        for p in problems:
            print(f"mxq {ctx.invoked_subcommand}: configuration: {p}", file=sys.stderr)
        ctx.exit(EX_CONFIG)


def _version() -> str:
    import mxq
    return mxq.__version__


@click.group(cls=MxqGroup, context_settings=CONTEXT)
@click.version_option(_version(), "--version", prog_name="mxq", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Distributed mail delivery workers: MX routing, retries and per-recipient outcomes on Celery and Redis.

    Exit statuses (sysexits): 0 ok, 64 usage, 65 bad input, 66 no such file or job, 69 something
    bounced, 75 something deferred or Redis unreachable, 78 a malformed MXQ_* setting.
    Shell completion: eval "$(mxq completion bash)" (or zsh, fish).
    """
    if ctx.invoked_subcommand and ctx.invoked_subcommand not in NO_CONFIG_CHECK:
        _check_config(ctx)


def _add_engine_commands() -> None:
    from mxq.workers import cli as engine_cli
    cli.add_command(engine_cli.deliver_command)
    cli.add_command(_send_command())


def _send_command() -> click.Command:
    """``mxq send``: the engine's envelope options (``mxq.workers.cli.envelope_options``) plus its own."""
    from mxq.workers.cli import envelope_options

    @click.command("send", short_help="submit a message to the pipeline", context_settings=CONTEXT)
    @envelope_options
    @click.option("--json", "json", is_flag=True,
                  help='Print {"job": ID} (and the status with --wait) as JSON.')
    @click.option("--wait", is_flag=True, help="Follow the job until every recipient is final.")
    @click.option("--timeout", type=float, default=DEFAULT_WAIT_TIMEOUT, show_default=True, metavar="SECONDS",
                  help="Bound on --wait (0: no bound); on expiry the status is printed, exit 75.")
    def send(**kw):
        """Submit a message (an .eml file, or - for standard input) to the pipeline; print its job id.

        Envelope defaults come from the headers (From/Sender; To, Cc, Bcc).  With --wait, follow
        the job until every recipient is final and exit as mxq deliver (0, 69, 75).
        """
        kw["ret"] = kw["ret"].upper() if kw.get("ret") else None
        return run_send(_ns(**kw))
    return send


@cli.command("status", short_help="show a job and its recipients", context_settings=CONTEXT)
@click.argument("job", metavar="JOB")
@click.option("--json", "json", is_flag=True, help='Print {"job", "state", "recipients": [...]}.')
def _status_cmd(job, json):
    """Show a submitted job and the state of each recipient (66 when unknown or expired)."""
    return run_status(_ns(job=job, json=json))


@cli.command("worker", short_help="run Celery workers on mxq's queues, one per core", context_settings=PASSTHROUGH_CONTEXT)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def _worker(celery_args):
    """Run one `celery -A mxq.tasks worker -P gevent` process per CPU core (--processes N), each
    with 1000 deliveries in flight (-c N), consuming mxq's queues.

    Defaults: mxq's queues (-Q), the node name mxq-<pid>@<host> (-n NAME@HOST: NAME-1@HOST, ...),
    the log level MXQ_LOG_LEVEL (-l).  Any other option goes to celery worker (e.g. -P prefork
    runs one plain celery worker instead); `mxq worker -- --help` shows Celery's help.
    """
    return run_worker(_ns(extra=list(celery_args)))


@cli.command("scheduler", short_help="run the scheduler (deferred mail, lost work)", context_settings=CONTEXT)
@click.option("-s", "--schedule", metavar="PATH",
              help="Heartbeat file touched after every tick (default $MXQ_BEAT_SCHEDULE, else in the temp dir).")
@click.option("-l", "--loglevel", type=click.Choice(["debug", "info", "warning", "error", "critical"],
                                                    case_sensitive=False),
              help="Log level (default $MXQ_LOG_LEVEL, info).")
@click.option("--interval", type=float, default=1.0, show_default=True, metavar="SECONDS",
              help="Seconds between ticks.")
@click.option("--pidfile", default="", metavar="PATH", help="Write the process id there.")
def _scheduler(schedule, loglevel, interval, pidfile):
    """Run the scheduler: once a second, one atomic step in Redis.

    It moves due deferred mail and the work of dead workers back to the ready lists and
    re-publishes tasks for quiet domains.  Run one (a second one is harmless).
    """
    return run_scheduler(_ns(schedule=schedule, loglevel=loglevel.lower() if loglevel else None,
                             interval=interval, pidfile=pidfile))


@cli.command("flower", short_help="run Flower, the Celery monitor", context_settings=PASSTHROUGH_CONTEXT)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def _flower(flower_args):
    """Run Flower, the Celery monitor (default --address=127.0.0.1 --port=5555).

    Set FLOWER_BASIC_AUTH=user:password to require a login; other options go to Flower.  Needs
    the flower extra: pip install 'mxq[flower]'.
    """
    return run_flower(_ns(extra=list(flower_args)))


@cli.command("config", short_help="effective MXQ_* settings and their origin", context_settings=CONTEXT)
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("-a", "--all", "all_", is_flag=True, help="Every setting, defaults included (postconf).")
@click.option("-d", "--defaults", is_flag=True, help="The defaults, whatever is set (postconf -d).")
@click.option("--json", "json", is_flag=True, help="A JSON list of {name, value, origin, default, secret}.")
@click.option("--env-example", is_flag=True, help="Print the .env.example for docker-compose.")
def _config(names, all_, defaults, json, env_example):
    """Show the MXQ_* settings that are set (like postconf -n): effective value, origin, secrets masked.

    Every value is checked: exit 78 naming each malformed one.  With DJANGO_SETTINGS_MODULE set,
    Django's MXQ_* settings are read too.
    """
    return run_config(_ns(names=list(names), all=all_, defaults=defaults, json=json, env_example=env_example))


@cli.command("completion", short_help="print the shell completion script", context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), default="bash")
def _completion(shell):
    """Print the shell completion script: eval "$(mxq completion bash)" in ~/.bashrc (zsh, fish alike)."""
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(cli, {}, "mxq", "_MXQ_COMPLETE")
    click.echo(comp.source())
    return EX_OK


def _add_pipeline_commands() -> None:
    from mxq.tasks import admin, up
    cli.add_command(up.up_command)
    admin.add_commands(cli)


def build_cli() -> click.Group:
    """The ``mxq`` click group with every command registered (once)."""
    if "deliver" not in cli.commands:
        _add_engine_commands()
        _add_pipeline_commands()
        order = ["deliver", "send", "status", "worker", "scheduler", "flower", "up", "queue", "suppress",
                 "config", "completion"]
        cli.commands = {n: cli.commands[n] for n in order if n in cli.commands} | cli.commands
    return cli


def main(argv: list[str] | None = None) -> int:
    """Run ``mxq``; return the exit status (sysexits: a usage error is 64, not click's 2)."""
    from mxq.settings import ConfigError

    group = build_cli()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = group.main(args=args, prog_name="mxq", standalone_mode=False)
    except click.UsageError as e:          # unknown option or command, missing or bad argument
        e.show()
        return EX_USAGE
    except click.ClickException as e:
        e.show()
        return EX_USAGE if e.exit_code == 2 else e.exit_code
    except click.Abort:                     # Ctrl-C or EOF at a prompt
        print("mxq: aborted", file=sys.stderr)
        return 130
    except ConfigError as e:                # a setting found malformed on the way (a DKIM key map, ...)
        print(f"mxq: configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    return rv if isinstance(rv, int) else EX_OK


if __name__ == "__main__":
    sys.exit(main())

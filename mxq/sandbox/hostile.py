"""Hostile and broken peers for tests: SMTP servers that misbehave on the wire, a DNS server that never answers.

The scripted aiosmtpd servers (``mxq.sandbox.smtpd``) speak correct SMTP with
odd verdicts; these speak bad SMTP on purpose, from raw sockets, so a client's
bounds (reply size, phase deadlines, write deadlines) can be tested for real:

``HostileServer(host="127.0.0.1", port=0, mode=..., **options)``  (context manager)
    One listening socket; every connection is handled by a thread of its own
    that runs the chosen script.  Modes:

    ``"endless-greeting"``  ``220-`` lines as fast as the client reads them, for ever
                            (never the final ``220 `` line); with ``pace`` > 0, one
                            line every ``pace`` seconds instead.
    ``"endless-reply"``     a normal greeting, then ``250-`` lines for ever in answer
                            to the command named by ``at`` (default ``EHLO``).
    ``"trickle"``           the greeting one byte every ``interval`` seconds (1.0).
    ``"trickle-reply"``     a normal dialogue, but the reply to the command named by
                            ``at`` (``"."``: the final dot; not DATA) is sent one byte
                            every ``interval`` seconds.
    ``"long-line"``         a greeting line of ``length`` bytes (default 10 MiB)
                            without a line end, then silence.
    ``"slow-reader"``       a normal dialogue until DATA's 354, then reads the message
                            ``rate`` bytes per second (default 1) with a tiny receive
                            buffer, so the client's writes block.

    ``.address``, ``.port``, ``.connections`` (accepted so far), ``.bytes_sent``
    (written by the server, all connections), ``.commands`` (lines the
    clients sent, all connections), ``.stop()``.

``SilentDNSServer(host="127.0.0.1", port=0)``  (context manager)
    A DNS server that never answers: it reads every UDP query and drops it,
    and accepts TCP connections that it never answers.  ``.address``
    (``host:port`` for ``MXQ_DNS_SERVERS``), ``.queries`` (UDP datagrams
    received), ``.stop()``.

Every thread is a daemon and ``stop()`` closes every socket, so a test's
``with`` block leaves nothing behind.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["HostileServer", "SilentDNSServer", "MODES"]

MODES = ("endless-greeting", "endless-reply", "trickle", "trickle-reply", "long-line", "slow-reader")


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class HostileServer:
    """A raw-socket SMTP peer that misbehaves in one of ``MODES`` (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, mode: str = "endless-greeting", *,
                 at: str = "EHLO", interval: float = 1.0, length: int = 10 * 1024 * 1024,
                 rate: int = 1, pace: float = 0.0, hostname: str = "hostile.sandbox.test"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.host, self.mode, self.at = host, mode, at.upper()
        self.interval, self.length, self.rate, self.hostname = interval, length, rate, hostname
        self.pace = pace
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.bytes_sent = 0
        self.commands: list[str] = []
        self._listener = socket.socket(_family(host), socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mode == "slow-reader":
            # Inherited by accepted sockets: a small window makes the client's writes block soon.
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._listener.bind((host, port))
        self.port = self._listener.getsockname()[1]
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        t = threading.Thread(target=self._accept, name=f"hostile-{mode}", daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on."""
        return (self.host, self.port)

    # ------------------------------------------------------------------ plumbing

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
                self._socks.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            with self._lock:
                self._threads.append(t)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self._lock:
            self.bytes_sent += len(data)

    def _lines(self, conn: socket.socket):
        """The client's command lines, one at a time (None at EOF)."""
        buf = b""
        while not self._stop.is_set():
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.rstrip(b"\r").decode("utf-8", "replace")
                with self._lock:
                    self.commands.append(text)
                yield text
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        try:
            getattr(self, "_mode_" + self.mode.replace("-", "_"))(conn)
        except OSError:
            pass        # the client went away: that is what a bounded client does
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _wait_closed(self, conn: socket.socket) -> None:
        """Say nothing more; return when the client closes or the server stops."""
        for _ in self._lines(conn):
            pass

    def _dialogue(self, conn: socket.socket, special) -> None:
        """A minimal well-behaved dialogue; ``special(verb, conn)`` may take over a command (True: handled)."""
        self._send(conn, f"220 {self.hostname} ESMTP hostile\r\n".encode())
        data = False
        for line in self._lines(conn):
            verb = line.split(" ", 1)[0].upper()
            if data:
                if line == ".":
                    data = False
                    if not special(".", conn):
                        self._send(conn, b"250 2.0.0 Ok\r\n")
                continue
            if special(verb, conn):
                continue
            if verb == "EHLO":
                self._send(conn, f"250-{self.hostname}\r\n250 8BITMIME\r\n".encode())
            elif verb == "DATA":
                self._send(conn, b"354 go ahead\r\n")
                data = True
            elif verb == "QUIT":
                self._send(conn, b"221 2.0.0 Bye\r\n")
                return
            else:
                self._send(conn, b"250 2.0.0 Ok\r\n")

    # ------------------------------------------------------------------ modes

    def _mode_endless_greeting(self, conn: socket.socket) -> None:
        line = f"220-{self.hostname} still greeting you, please wait for the rest of this banner\r\n".encode()
        if self.pace > 0:
            while not self._stop.is_set():
                self._send(conn, line)
                if self._stop.wait(self.pace):
                    return
            return
        block = line * 64
        conn.settimeout(None)
        while not self._stop.is_set():
            self._send(conn, block)

    def _mode_endless_reply(self, conn: socket.socket) -> None:
        def special(verb: str, c: socket.socket) -> bool:
            if verb != self.at:
                return False
            block = b"250-this reply goes on and on and on and never ends\r\n" * 64
            c.settimeout(None)
            while not self._stop.is_set():
                self._send(c, block)
            return True
        self._dialogue(conn, special)

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            self._send(conn, data[i:i + 1])
            if self._stop.wait(self.interval):
                return

    def _mode_trickle(self, conn: socket.socket) -> None:
        self._trickle(conn, f"220 {self.hostname} ESMTP trickling one byte at a time\r\n".encode())
        self._wait_closed(conn)

    def _mode_trickle_reply(self, conn: socket.socket) -> None:
        def special(verb: str, c: socket.socket) -> bool:
            if verb != self.at:
                return False
            self._trickle(c, b"250 2.0.0 Ok, eventually\r\n")
            return True
        self._dialogue(conn, special)

    def _mode_long_line(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        chunk = b"2" * 65536
        left = self.length
        while left > 0 and not self._stop.is_set():
            piece = chunk[:min(left, len(chunk))]
            self._send(conn, piece)
            left -= len(piece)
        self._wait_closed(conn)

    def _mode_slow_reader(self, conn: socket.socket) -> None:
        self._send(conn, f"220 {self.hostname} ESMTP slow reader\r\n".encode())
        buf = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(4096)
            except socket.timeout:
                continue
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                verb = line.split(b" ", 1)[0].upper()
                with self._lock:
                    self.commands.append(line.decode("utf-8", "replace"))
                if verb == b"EHLO":
                    self._send(conn, f"250-{self.hostname}\r\n250 8BITMIME\r\n".encode())
                elif verb == b"DATA":
                    self._send(conn, b"354 go ahead\r\n")
                    # From here on: read the message a few bytes per second, for ever.
                    while not self._stop.is_set():
                        try:
                            got = conn.recv(self.rate)
                        except socket.timeout:
                            continue
                        if not got:
                            return
                        if self._stop.wait(1.0):
                            return
                    return
                elif verb == b"QUIT":
                    self._send(conn, b"221 2.0.0 Bye\r\n")
                    return
                else:
                    self._send(conn, b"250 2.0.0 Ok\r\n")

    # ------------------------------------------------------------------ life

    def stop(self) -> None:
        """Close the listener and every connection; join the threads (bounded)."""
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        for t in threads:
            t.join(2.0)

    def __enter__(self) -> "HostileServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class SilentDNSServer:
    """A DNS server that reads every query and never answers (UDP and TCP on the same port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self._stop = threading.Event()
        self._udp = socket.socket(_family(host), socket.SOCK_DGRAM)
        self._udp.bind((host, port))
        self.port = self._udp.getsockname()[1]
        self._tcp = socket.socket(_family(host), socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind((host, self.port))
        self._tcp.listen(16)
        self._tcp.settimeout(0.1)
        self._udp.settimeout(0.1)
        self._held: list[socket.socket] = []
        self.queries = 0
        self._threads = [threading.Thread(target=self._read_udp, daemon=True),
                         threading.Thread(target=self._accept_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6), as ``MXQ_DNS_SERVERS`` takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _read_udp(self) -> None:
        while not self._stop.is_set():
            try:
                self._udp.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self.queries += 1

    def _accept_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except (socket.timeout, OSError):
                continue
            self._held.append(conn)

    def stop(self) -> None:
        """Close every socket and join the threads."""
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        for s in [self._udp, self._tcp] + self._held:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "SilentDNSServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value (for tests)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return bool(value)
        time.sleep(interval)

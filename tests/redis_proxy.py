"""A TCP proxy between Redis clients and a redis-server that loses replies on purpose.

``DroppingProxy(upstream_port).start()`` listens on 127.0.0.1 (``.port``) and
forwards every connection to the redis-server.  It reads the client's
commands (RESP arrays of bulk strings) as they pass; for a command that
``should_drop(name, args)`` picks, it forwards the command, waits for the
server's answer to it (so the command certainly ran), then closes both
sides without passing that answer on (answers to the commands before it are
passed on; RESP replies are counted): the client sees its connection reset
after its command was executed -- what a read timeout or a network cut at the
wrong instant does -- and redis-py's retry sends the same command again.

Counters: ``.seen`` (commands by name), ``.dropped`` (dropped commands by
name).  Threads only; ``stop()`` closes everything.
"""

from __future__ import annotations

import collections
import select
import socket
import threading
from typing import Callable


class _Commands:
    """Incremental RESP parser for the client -> server direction: yields (end offset, name, args)."""

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes):
        self.buf += data
        out = []
        pos = 0
        while True:
            parsed = self._one(pos)
            if parsed is None:
                break
            end, args = parsed
            out.append((end, args))
            pos = end
        return out, pos

    def consume(self, n: int) -> None:
        self.buf = self.buf[n:]

    def _line(self, pos: int):
        i = self.buf.find(b"\r\n", pos)
        return None if i < 0 else (self.buf[pos:i], i + 2)

    def _one(self, pos: int):
        if pos >= len(self.buf):
            return None
        if self.buf[pos:pos + 1] != b"*":           # inline command (not used by redis-py)
            got = self._line(pos)
            return None if got is None else (got[1], got[0].split())
        got = self._line(pos)
        if got is None:
            return None
        n, pos = int(got[0][1:]), got[1]
        args = []
        for _ in range(n):
            got = self._line(pos)
            if got is None:
                return None
            size, pos = int(got[0][1:]), got[1]
            if len(self.buf) < pos + size + 2:
                return None
            args.append(self.buf[pos:pos + size])
            pos += size + 2
        return pos, args


class _Replies:
    """Counts complete top-level RESP2/RESP3 replies in the server -> client direction."""

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes) -> list[int]:
        """Append ``data``; return the end offsets (in ``buf``) of the replies completed."""
        self.buf += data
        ends, pos = [], 0
        while True:
            end = self._one(pos)
            if end is None:
                return ends
            ends.append(end)
            pos = end

    def consume(self, n: int) -> None:
        self.buf = self.buf[n:]

    def _one(self, pos: int):
        if pos >= len(self.buf):
            return None
        i = self.buf.find(b"\r\n", pos)
        if i < 0:
            return None
        kind, head, nxt = self.buf[pos:pos + 1], self.buf[pos + 1:i], i + 2
        if kind in b"+-:_,#(":
            return nxt
        if kind in b"$!=":
            size = int(head)
            if size < 0:
                return nxt
            return nxt + size + 2 if len(self.buf) >= nxt + size + 2 else None
        if kind in b"*~>%|":
            n = int(head)
            if kind in b"%|":
                n *= 2
            for _ in range(max(n, 0)):
                nxt = self._one(nxt)
                if nxt is None:
                    return None
            return nxt
        raise ValueError(f"unexpected RESP type {kind!r}")


class DroppingProxy:
    def __init__(self, upstream_port: int, should_drop: Callable[[str, list], bool],
                 upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.should_drop = should_drop
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.seen: collections.Counter = collections.Counter()
        self.dropped: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sockets: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "DroppingProxy":
        threading.Thread(target=self._accept, daemon=True, name="redis-proxy").start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            for s in list(self.sockets):
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _close(self, *socks) -> None:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
            with self.lock:
                self.sockets.discard(s)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        commands, replies = _Commands(), _Replies()
        forwarded = answered = 0
        drop_at = None          # the number of the command whose reply is to be lost
        try:
            while not self.stopping.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.5)
                if server in ready:
                    data = server.recv(65536)
                    if not data:
                        return
                    sent = 0
                    for end in replies.feed(data):
                        answered += 1
                        if answered == drop_at:
                            return          # the command ran; its answer never reaches the client
                        client.sendall(replies.buf[sent:end])
                        sent = end
                    replies.consume(sent)
                if client in ready and drop_at is None:
                    data = client.recv(65536)
                    if not data:
                        return
                    sent = 0
                    for end, args in commands.feed(data)[0]:
                        name = args[0].decode("ascii", "replace").upper() if args else ""
                        with self.lock:
                            self.seen[name] += 1
                        server.sendall(commands.buf[sent:end])
                        sent = end
                        forwarded += 1
                        if self.should_drop(name, args):
                            with self.lock:
                                self.dropped[name] += 1
                            drop_at = forwarded
                            break       # nothing more from this client: its connection is about to go
                    commands.consume(sent)
        except OSError:
            return
        finally:
            self._close(client, server)

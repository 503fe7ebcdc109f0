"""A DNS cache that shows whether two lookups run at the same time, without timing them."""

from __future__ import annotations

import threading

from mxq.workers.dnscache import DNSCache


class Gate(DNSCache):
    """The in-process ``DNSCache``, whose read of ``hold`` (``(rtype, name)``) waits until the
    read of ``until`` has started, or ``WAIT`` seconds: ``overlapped`` then says whether it did
    (True: the two lookups were under way together).  ``order`` lists every read."""

    WAIT = 5.0

    def __init__(self, settings, hold: tuple[str, str], until: tuple[str, str]):
        super().__init__(settings)
        self.hold, self.until = hold, until
        self.started = threading.Event()
        self.overlapped: bool | None = None
        self.order: list[tuple[str, str]] = []

    def get(self, rtype: str, name: str):
        self.order.append((rtype, name))
        if (rtype, name) == self.until:
            self.started.set()
        if (rtype, name) == self.hold:
            self.overlapped = self.started.wait(self.WAIT)
        return super().get(rtype, name)

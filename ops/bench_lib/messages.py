"""The benchmark's test messages: N messages of about S bytes, one recipient each, M domains.

Every contender gets the same messages (same headers, same body, same
recipient), rendered at submission time so that each carries the moment it
was handed to the system under test:

* ``X-Bench-Id: <run>-<i>``: the identity the sinks count, so a duplicate or
  a missing message is seen exactly;
* ``X-Bench-Submitted: <epoch seconds>``: the submission time, from which the
  sink monitor computes the latency to acceptance by the sink.

Message ``i`` goes to ``u<i>@<f><i mod M>.bench.test``, where ``<f>`` is the
spec's domain family: ``d`` for the loopback stages, ``s`` (slow exchanges),
``h`` (healthy domains of the dead-exchange stage), ``x`` (dead exchanges) and
``f`` (the in-flight stage); each family's exchanges have their own address
range (``sandbox.FAMILIES``).  Names are under the reserved ``.test``
top-level domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

SENDER = "bench@sender.bench.test"
ID_HEADER = "X-Bench-Id"
SUBMITTED_HEADER = "X-Bench-Submitted"
_LINE = 76                      # body line length, before CRLF


def domain(j: int, family: str = "d") -> str:
    """The name of benchmark domain ``j`` (0-based) of ``family``."""
    return f"{family}{j}.bench.test"


def exchange(j: int, family: str = "d") -> str:
    """The MX host name of benchmark domain ``j`` of ``family``."""
    return f"mx.{family}{j}.bench.test"


@dataclass(frozen=True)
class Spec:
    """What to send: ``count`` messages of about ``size`` bytes over ``domains`` domains of ``family``.

    Ids are ``<run>-<i>``.
    """

    run: str
    count: int
    domains: int
    size: int
    family: str = "d"

    def recipient(self, i: int) -> str:
        """Recipient address of message ``i``."""
        return f"u{i}@{domain(i % self.domains, self.family)}"

    def message_id(self, i: int) -> str:
        """``X-Bench-Id`` value of message ``i``."""
        return f"{self.run}-{i}"

    def ids(self) -> set[str]:
        """Every ``X-Bench-Id`` value of the run."""
        return {self.message_id(i) for i in range(self.count)}

    def subject(self, i: int) -> str:
        """Subject line of message ``i``."""
        return f"mxq bench {self.run} #{i}"

    def headers(self, i: int, submitted: float) -> list[tuple[str, str]]:
        """The header fields of message ``i`` apart from From/To/Subject (which Django sets itself)."""
        return [
            ("Message-ID", f"<{self.run}.{i}@bench.test>"),
            (ID_HEADER, self.message_id(i)),
            (SUBMITTED_HEADER, f"{submitted:.6f}"),
        ]

    def body(self) -> str:
        """A body that brings the whole message to about ``size`` bytes (CRLF line ends)."""
        room = max(0, self.size - 330)          # the header block below is about 330 bytes
        lines = []
        n = 0
        while room > 0:
            take = min(_LINE, max(1, room - 2))
            lines.append((f"{n % 10}" + "x" * _LINE)[:take])
            room -= take + 2
            n += 1
        return "\r\n".join(lines) + "\r\n"

    def render(self, i: int, submitted: float | None = None, body: str | None = None) -> bytes:
        """Message ``i`` as the bytes an SMTP client sends (CRLF line ends, no dot-stuffing)."""
        if submitted is None:
            submitted = time.time()
        if body is None:
            body = self.body()
        head = [
            f"From: mxq bench <{SENDER}>",
            f"To: <{self.recipient(i)}>",
            f"Subject: {self.subject(i)}",
            "Date: Sat, 01 Jan 2000 00:00:00 +0000",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
        ]
        head += [f"{k}: {v}" for k, v in self.headers(i, submitted)]
        return ("\r\n".join(head) + "\r\n\r\n" + body).encode("ascii")

"""Destination scheduling: Postfix's queue manager, fleet-wide in Redis.

A delivery task (``mxq.deliver``, ``mxq.tasks.graph``) is one SMTP connection
to a destination (a lane: one recipient domain).  How many run at once for a
destination, how much each takes at a time, and what happens when it stops
answering, is decided here and kept in Redis (``mxq:dest:{lane}``, owned by
``mxq.tasks.store``), so every worker on every machine follows the same state.

Concurrency window (slow start)
-------------------------------
A destination starts with ``MXQ_INITIAL_CONCURRENCY`` (5) connections, gains
one per message that got a server verdict (positive feedback), up to its
``MXQ_SHAPING`` limit (``Nc``, default 20), and loses one per delivery run
that reached no server (negative feedback: a connection or handshake failure
-- refused, timed out, no greeting, TLS failure -- on every exchange), never
below one.  A destination quiet for ``IDLE_RESET`` seconds starts again from
the initial window.  The window is the number of concurrency slots a task may
take (``mxq.tasks.shaping``), and what the dispatch aims at.

Connections and chunks
----------------------
A task keeps its connection and takes the lane's next messages while there
are any (``MXQ_BATCH_SIZE`` at most at a time), until half the soft time
limit: one connection drains a fast destination, as one Postfix smtp process
does with a cached connection.  How many messages it takes at a time (its
*chunk*) follows the destination's measured seconds per message: about
``CHUNK_SECONDS`` of work (a destination that needs 1 s at the final dot
gets one message per claim, an instant one ``MXQ_BATCH_SIZE``); an unknown
destination gets ``UNKNOWN_CHUNK`` first.  The dispatch publishes
``ceil(ready / chunk)`` tasks up to the window, minus those queued and
running: a slow destination's mail is spread over up to its window of
parallel connections, a fast one's over as few as drain it.  A chunk far behind
the time it was sized for (``overdue_after``: the estimate was wrong) starts no
new transaction and gives its unsent messages back to the front of the lane,
for the lane's other connections.

Dead destinations (the failed cohort rule)
------------------------------------------
Each failed run adds ``1 / window`` to the destination's failed cohorts (and
shrinks the window); a success clears them.  At ``MXQ_FAILED_COHORT_LIMIT``
(1: a window's worth of failures in a row) the destination is declared dead
for the next step of ``MXQ_RETRY_SCHEDULE`` (longer for each dead period in a
row).  While dead, a task for it opens no connection: it *drains* the lane,
recording every ready recipient ``deferred`` with the reason ("delivery
temporarily suspended: ...", the last failure) and a due time no earlier than
the end of the dead period, so the mail waits in the deferred queue holding
no worker.  When the period is over, the first task to come is the *probe*:
one message, exchanges tried even if marked down; at most one probe at a
time.  A probe that gets through revives the destination (initial window);
one that fails makes it dead for longer.  Deferred mail still follows the
retry schedule and expires at ``MXQ_MAX_LIFETIME``.

Outcomes as they happen
-----------------------
``Recorder``: each message's outcome is written to Redis (``Store.record``)
shortly after its final reply arrived, by one background writer per process
that gathers whatever arrived meanwhile into one script call, while the
rest of the chunk is still under way.  A worker killed mid-chunk then resends
only the transactions that were in flight (and those whose outcome arrived
within the last ``Recorder.DELAY``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time

from mxq.workers.delivery import RunStats
from mxq.workers.results import State

from . import outcomes as job_outcomes
from .settings import PipelineSettings
from .store import Feedback, Outcome

log = logging.getLogger("mxq.qmgr")

#: Seconds of work a connection takes at a time (its chunk is this over the measured seconds per message).
CHUNK_SECONDS = 0.5
#: A destination faster than this (seconds per message) gets chunks of MXQ_BATCH_SIZE: spreading its
#: mail over more connections would cost more (CPU, Redis, connections) than it saves.
FAST_LATENCY = 0.05
#: A process whose scheduling lag (``Runtime.lag``) is above this opens no further connections
#: itself, and asks for none unless the lane is slow beyond doubt (``spread``); its lag is taken
#: off the latency it reports (it would be measuring its own delays).
MAX_LAG = 0.02
#: A lane measured this many times slower per message than the process's lag is slow whatever the
#: lag (a CPU-starved process measures its own delays on a fast lane, not tenfold).
SLOW_VS_LAG = 10.0
#: A chunk expected to take longer than this has its messages recorded one by one (``Recorder``).
RECORD_AFTER = 0.25
#: A chunk taking this many times the time it was sized for hands its unsent messages back
#: (``overdue_after``).
OVERDUE_FACTOR = 4.0
#: A lane's first verdict (one message, its latency unknown before) at this many seconds a message or
#: more spreads the lane at once; a faster one waits for its next chunk's to confirm it (``spread``).
#: The speculation's silence (``SPECULATE_SILENCE``): a server that sat this long on one message is
#: slow, now that the time is the server's own (``SMTPSession.server_seconds``; 0.25 when a busy
#: start-up's delays were in it).
FIRST_VERDICT_SLOW = 0.15
#: A lane's first chunk (latency unknown) whose server has owed it a reply this long with none of it
#: in (``SMTPSession.silence``): the lane is slow, and gets its window of connections at once
#: (``mxq.tasks.graph._Lane.speculate``).
SPECULATE_SILENCE = 0.15


def smooth(old: float | None, sample: float, n: int = 1) -> float:
    """A destination's seconds per message after a sample over ``n`` messages: down half the way for
    each of them, up a fifth of the way.

    Measurement noise (a busy worker, a slow first connection) mostly adds
    time, so a lower sample counts more than a higher one; but one fast
    answer from a slow exchange must not make it look instant: taken at once,
    it made the connection that saw it claim the rest of the lane as one
    chunk and send it one message a second, while the lane's other
    connections had nothing left (the bench's slow stage, 2026-12-04: one
    sample of 7 ms on a lane at 1 s per message, then 8 messages in a row on
    one connection; the stage ran 10.5 s instead of 4.6).  Halving takes a
    really fast destination from 1 s to under ``FAST_LATENCY`` in 5 samples
    (its chunk doubling each time).  Each message of the sample halves the rest of the way: a
    destination that looked slow once in a starved start-up (0.1-0.4 s for a loopback sink while 100
    new destinations were set up at once) and then answered a chunk of 5 messages at once is fast
    after that chunk, not after 3-4 more small chunks (each a claim, a release and their Redis
    commands).  A slow lane's chunks are one message: one halving each, as before.  A slower sample
    moves it a fifth of the way, however many messages it covers (a starved process measures every
    message slow).  Same rule as the store's script.
    """
    if old is None:
        return sample
    if sample < old:
        return old + (sample - old) * (1.0 - 0.5 ** max(1, min(int(n), 30)))
    return old + (sample - old) * 0.2


#: Messages the first claim on a destination of unknown latency takes (one message tells).
UNKNOWN_CHUNK = 1
#: A connection whose latency is its own measure takes at most this many times the messages that
#: measure rests on (``chunk_size``): 1, 4, 20, then its full chunk, as its answers confirm it.
CHUNK_GROWTH = 4
#: A connection of a lane whose server was silent (``chunk_size``'s ``silent``) takes one message at a
#: time until this many of its own answers have timed the server.
SILENT_TRUST = 2
#: A destination with no concurrency limit (``*c``) still grows its window only this far.
UNLIMITED_WINDOW = 1000
#: A destination quiet this long (and not dead) starts again from the initial window.
IDLE_RESET = 600.0
#: A delivery task opens at most this many connections of its lane in its own process
#: (gevent workers; ``mxq.tasks.graph._Lane``); more are published as tasks.
CONNECTIONS_PER_TASK = 10
#: ... and a process at most this many connections opened that way, all tasks together.
LOCAL_CONNECTIONS = 1000

#: A fanout (graph.fan) runs this many of its delivery runs in its own process and publishes the
#: rest in fanouts of this many.
FAN_CHUNK = 16
#: Messages a process holds claimed beyond one per connection, all its connections together
#: (``Budget``): the rest of the ready mail waits in Redis, not in the worker's memory.
LOCAL_MESSAGES = 1024


def redis_policy(policy, ps: PipelineSettings) -> dict:
    """The scheduling policy the store's scripts read (``mxq:policy``): limits, window, chunks, dead rule.

    ``policy``: the ``mxq.tasks.shaping.Policy`` (``MXQ_SHAPING``).
    """
    return {
        "d": policy.default.concurrency or 0,
        "m": {d: lim.concurrency or 0 for d, lim in policy.domains.items()
              if lim.concurrency != policy.default.concurrency},
        "i": max(1, int(ps.initial_concurrency)),
        "x": UNLIMITED_WINDOW,
        "t": CHUNK_SECONDS,
        "f": FAST_LATENCY,
        "c": float(ps.failed_cohort_limit),
        "s": [float(x) for x in ps.retry_schedule],
        "idle": IDLE_RESET,
    }


def chunk_size(latency: float | None, batch: int, measured: int | None = None, silent: bool = False) -> int:
    """Messages a connection takes at a time for a destination at ``latency`` seconds per message.

    ``measured``: how many messages ``latency`` rests on when they are the connection's own (it
    started before its lane had a measured latency); None when it is the lane's, from the grant.
    Then the chunk is at most ``CHUNK_GROWTH`` times that many: a first answer tells little.  An
    exchange that answers on a timer (smtp-sink ``-W .:1`` answers every dot of a second at the
    same tick) answers a dot that came just before the tick in 12 ms: taken alone, the connection
    that saw it claimed the rest of its lane (15 messages), sent them one a second while the lane's
    other connections found it empty, and handed 12 back only when the chunk was overdue 2.5 s
    later (the bench's slow stage, 2026-12-05: every run over 6 s had such chunks).

    ``silent``: the lane's server was silent past ``SPECULATE_SILENCE`` on its first chunk in this
    task (``_Lane.speculated``).  A fast answer from such a server is its timer, not its speed:
    the connection takes one message at a time until ``SILENT_TRUST`` of its own answers have
    timed it.  (smtp-sink releases a delayed reply at its first wake-up after a whole second: a
    lane's first dots that came just before that were answered at once, the others a second
    later; the connections with a fast first answer claimed four messages each and sent them one
    a second, and their chunks went overdue and handed the rest back: every lane that needed a
    fourth round in the bench's slow stage, 2026-12-06.)
    """
    if silent and measured is not None and measured < SILENT_TRUST:
        return 1
    if latency is None or latency <= 0:
        return max(1, min(UNKNOWN_CHUNK, batch))
    k = batch if latency < FAST_LATENCY else max(1, min(batch, int(math.floor(CHUNK_SECONDS / latency))))
    if measured is not None:
        k = min(k, max(1, CHUNK_GROWTH * measured))
    return k


def overdue_after(latency: float | None, k: int) -> float | None:
    """Seconds after which a chunk of ``k`` messages, sized for ``latency``, is overdue (None: never).

    A chunk's size rests on the destination's measured seconds per message;
    an exchange that answered a few messages fast and then slows down (a
    content filter at the dot, a sink that answers on a timer) makes it far
    too big, and its messages wait their turn on one connection while the
    lane's other connections have nothing left to take.  Past this time the
    chunk starts no new transaction and its unsent messages go back to the
    lane, not attempted (``mxq.tasks.graph``): ``OVERDUE_FACTOR`` times the
    time the chunk was sized for, and at least ``2 * CHUNK_SECONDS``.
    """
    if k <= 1:
        return None
    return max(2 * CHUNK_SECONDS, OVERDUE_FACTOR * k * (latency or 0.0))


def overdue(elapsed: float, sent: int, after: float | None) -> bool:
    """Is a chunk ``elapsed`` seconds in, ``sent`` transactions done, overdue (``overdue_after``)?

    Only when its messages really take ``CHUNK_SECONDS`` or more each: a
    fast lane's chunk in a process sharing its CPU among hundreds of
    connections also runs long (64 messages in 4 s draining a backlog), and
    handing its mail back would only add claims.
    """
    return after is not None and elapsed >= after and elapsed >= CHUNK_SECONDS * max(1, sent)


def feedback(stats: RunStats, results: list[list[dict | None]] | None, probe: str = "",
             lag: float = 0.0) -> Feedback:
    """The queue manager's feedback from one delivery run (see the module docstring).

    ``lag``: the process's scheduling lag (seconds a ready task waits for its
    turn), taken off the measured time per message, which would otherwise
    count this busy process's delays as the destination's slowness.
    """
    fb = Feedback(probe=probe)
    if stats.transactions:
        fb.ok = stats.transactions
        if stats.server_timed:
            # The servers' own time (kernel arrival times): neither this process's delays nor its
            # own work per message are in it.
            fb.latency = stats.server_seconds_per_message or 1e-6
        else:
            fb.latency = max(0.0, (stats.seconds_per_message or 0.0) - 2 * lag) or 1e-6
    elif stats.failed:
        fb.fail = 1
        for per in results or ():
            for r in per:
                if r and r.get("text"):
                    fb.why, fb.enhanced = str(r["text"]), str(r.get("enhanced") or "")
                    return fb
    return fb


def slow_beyond_doubt(lag: float, latency: float | None) -> bool:
    """Is a lane at ``latency`` seconds a message (lag already taken off) slow whatever this process's lag?

    At least ``FIRST_VERDICT_SLOW`` a message and ``SLOW_VS_LAG`` times the
    lag: a starved process's delays do not make an instant exchange look
    like that.  The connections such a lane's dispatch asks for are opened
    in the process that has its verdict even when the process is busy
    (``mxq.tasks.graph._Lane.publish``).
    """
    return latency is not None and latency >= max(FIRST_VERDICT_SLOW, SLOW_VS_LAG * lag)


def spread(lag: float, latency: float, first: bool = False) -> bool:
    """May a run's verdict ask for more connections to its lane (``Store.finish``'s ``spread``)?

    ``first``: the verdict is the lane's first (its latency was unknown, so
    its chunk was ``UNKNOWN_CHUNK``, one message).  One message timed in a start-up
    is not enough to spread on unless it is slow beyond doubt
    (``FIRST_VERDICT_SLOW``): 50 new lanes started at once on 2 busy cores timed their
    first message at 52-102 ms, past ``FAST_LATENCY``, and each such lane
    asked for 4-5 connections for its 39 messages, where one does (the bench's
    dead stage, 2026-12-05).  Its next chunk, sized for that latency, confirms
    or corrects it, and its verdict spreads.  (Those 52-102 ms were the
    process's delays: a latency timed by the kernel, ``feedback``, has none of
    them, which is what lets the threshold be the speculation's 0.15 s.)

    Otherwise yes while the process wakes on time (``lag`` under ``MAX_LAG``).  A late
    process -- its own work, or other processes holding the CPU -- measures
    its delays into every message: an instant exchange then looks slow, and
    spreading it over more connections would add work per message, not
    throughput.  It still spreads a lane whose time per message (``latency``,
    lag already taken off) is ``SLOW_VS_LAG`` times its lag: a destination
    taking a second at the dot is slow whatever the machine does (at load
    6-17 the lag stays at 30-80 ms).  A latency timed by the kernel has no
    delays of this process in it, but a process short of CPU still gains
    little from more connections to a lane that answers in milliseconds, so
    the rule holds for it too.
    """
    if first and (latency or 0.0) < FIRST_VERDICT_SLOW:
        return False
    return lag < MAX_LAG or (latency or 0.0) >= SLOW_VS_LAG * lag


def suspended_result(why: str, enhanced: str) -> dict:
    """The engine-like result recorded for a recipient of a dead destination (not an attempt)."""
    text = f"delivery temporarily suspended: {why}" if why else "delivery temporarily suspended: " \
        "the destination is not answering"
    return {"state": State.DEFERRED.value, "code": None, "enhanced": enhanced or "4.4.1", "text": text,
            "attempts": 0, "scope": "site"}


class Budget:
    """How many messages a worker process holds claimed at once, beyond one per connection.

    A connection's chunk is about ``CHUNK_SECONDS`` of its lane's work, sized
    as if the connection had the process to itself.  A gevent process runs
    hundreds of connections; when their lanes are fast the process's CPU is
    the limit, and what each claimed beyond what it can deliver soon only
    waited in memory: draining a deep backlog, a process held 13,000 claimed
    messages (content and records, ~6 KB each) and its RSS grew with the
    backlog.  So every connection may hold one message (a slow lane's chunk,
    a probe, a first chunk: never delayed, so the deliveries in flight are
    not limited by this), and what a chunk takes beyond its first message
    comes out of this process-wide budget of ``limit`` messages.  A chunk
    that does not fit waits for room, first come first served (a waiter for
    a big chunk is not overtaken by smaller ones), without any claim: its
    mail stays ready in Redis for any worker.  ``give`` returns room when a
    chunk is released (and at once what a claim did not get).
    """

    def __init__(self, limit: int = LOCAL_MESSAGES):
        self.limit = max(1, int(limit))
        self.held = 0
        self._lock = threading.Lock()
        self._waiters: collections.deque[list] = collections.deque()   # [extra, Event, granted]

    def take(self, k: int, wait: float, stop=None) -> int:
        """Room for a chunk of ``k`` messages: how many to claim (``k``, at most ``limit`` + 1), 0 if none came.

        Waits up to ``wait`` seconds, looking at ``stop()`` (give up when it
        says so) every ``POLL`` seconds.  What it returns, less one, is held
        until given back (``give``).
        """
        extra = min(max(0, k - 1), self.limit)
        if not extra:
            return 1
        entry = [extra, threading.Event(), False]
        with self._lock:
            if not self._waiters and self.held + extra <= self.limit:
                self.held += extra
                return extra + 1
            self._waiters.append(entry)
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if entry[1].wait(max(0.0, min(self.POLL, left))):
                return extra + 1
            if left <= 0 or (stop is not None and stop()):
                with self._lock:
                    if entry[2]:                    # granted meanwhile: keep it
                        return extra + 1
                    self._waiters.remove(entry)
                    self._wake()                    # a smaller waiter behind it may fit now
                return 0

    POLL = 1.0

    def give(self, extra: int) -> None:
        """Return ``extra`` messages of room (a chunk ``take`` let claim ``extra + 1`` is over, or took fewer)."""
        if extra <= 0:
            return
        with self._lock:
            self.held = max(0, self.held - extra)
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.limit:
            entry = self._waiters.popleft()
            self.held += entry[0]
            entry[2] = True
            entry[1].set()


class Recorder:
    """Writes outcomes of messages whose final reply arrived while their chunk is still under way.

    One per process (``mxq.tasks.graph.Runtime``); a background thread (a
    greenlet under gevent) writes what was added, per batch token, with one
    ``Store.record`` call each, ``DELAY`` seconds after the first of them
    arrived.  ``take(token)`` waits for a write of that token under way and
    returns what is still unwritten (to go with the batch's release), with how
    many updates were written.  A write that fails (Redis away) keeps its
    outcomes for ``take``: nothing is lost, the release writes them.
    """

    DELAY = 0.01

    def __init__(self, store, publish, owner=None):
        self.store, self.publish = store, publish
        # owner.own_outcomes: whole jobs made final are recorded by owner.record_own(outcomes, jobs)
        # (mxq.tasks.graph.Runtime: their outcomes to the result backend, mxq.tasks.outcomes)
        self.owner = owner
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._queue: dict[str, tuple[str, list[Outcome]]] = {}
        self._busy: set[str] = set()
        self._back: dict[str, list[Outcome]] = {}
        self._applied: dict[str, int] = {}
        self._thread: threading.Thread | None = None

    def add(self, token: str, lane: str, outcome: Outcome) -> None:
        with self._cond:
            entry = self._queue.get(token)
            if entry is None:
                self._queue[token] = (lane, [outcome])
            else:
                entry[1].append(outcome)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mxq-recorder", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, token: str) -> tuple[list[Outcome], int]:
        """``(outcomes not written yet, updates written)`` for ``token``; forgets the token."""
        with self._cond:
            while token in self._busy:
                self._cond.wait(1.0)
            out = self._back.pop(token, [])
            entry = self._queue.pop(token, None)
            if entry is not None:
                out.extend(entry[1])
            return out, self._applied.pop(token, 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
            time.sleep(self.DELAY)          # what arrives meanwhile goes in the same call
            with self._cond:
                batch, self._queue = self._queue, {}
                self._busy.update(batch)
            for token, (lane, outcomes) in batch.items():
                written = 0
                try:
                    mine = [] if self.owner is not None and self.owner.own_outcomes else None
                    applied, dispatch = self.store.record(token, lane, outcomes, mine=mine,
                                                         hide=job_outcomes.LEASE)
                    written = len(applied)
                    if mine:
                        self.owner.record_own(outcomes, mine)
                    if dispatch:
                        self.publish(dispatch)
                except Exception as e:  # noqa: BLE001 -- Redis away: the release writes them
                    log.warning("recording %d outcome(s) of %s failed (%s); they go with the release",
                                len(outcomes), lane, e)
                    with self._cond:
                        self._back.setdefault(token, []).extend(outcomes)
                finally:
                    with self._cond:
                        self._applied[token] = self._applied.get(token, 0) + written
                        self._busy.discard(token)
                        self._cond.notify_all()

"""mxq's Redis key names: every module builds them here, never by hand.

What each key holds is the table in ``mxq.tasks.store``'s docstring.  The
Lua scripts of the store layer name the same keys from ``P`` (``mxq:``).
The engine's shared DNS cache (``mxq:dns:*``) is named by
``mxq.workers.dnscache`` (the engine imports nothing of ``mxq.tasks``).
"""

from __future__ import annotations

PREFIX = "mxq:"

# -- the queue
INTAKE = PREFIX + "intake"              #: zset: stored jobs not split yet -> when
DEFERRED = PREFIX + "deferred"          #: zset: work items -> due time
HELD = PREFIX + "held"                  #: zset: parked (held) work items -> when parked
LEASE = PREFIX + "lease"                #: zset: batch tokens -> lease expiry
DISPATCH = PREFIX + "dispatch"          #: zset: lanes with ready work -> last activity
THROTTLED = PREFIX + "throttled"        #: zset: lanes held back -> until when
SUSPENDED = PREFIX + "suspended"        #: set: suspended lanes
FINAL = PREFIX + "final"                #: zset: final jobs whose outcome is not in the result backend yet
READY_PREFIX = PREFIX + "ready:"
JOB_PREFIX = PREFIX + "job:"
BATCH_PREFIX = PREFIX + "batch:"
SUSPEND_PREFIX = PREFIX + "suspend:"


def ready(lane: str) -> str:
    """The lane's list of ready work items."""
    return READY_PREFIX + lane


def job(job_id: str) -> str:
    """The job's hash (meta, content ``c``, recipient records ``r:{i}``, hold flags ``h:{lane}``)."""
    return JOB_PREFIX + job_id


def batch(token: str) -> str:
    """The work items leased to a batch token (first line: the lane)."""
    return BATCH_PREFIX + token


def suspend(lane: str) -> str:
    """The lane's suspension (JSON; PX its duration)."""
    return SUSPEND_PREFIX + lane


# -- destinations (shaping)
def slots(lane: str) -> str:
    """The lane's concurrency slot holders (zset: token -> expiry)."""
    return f"{PREFIX}shape:conn:{lane}"


def tat(lane: str) -> str:
    """The lane's GCRA state (theoretical arrival time)."""
    return f"{PREFIX}shape:tat:{lane}"


# -- the engine's shared state (mxq.tasks.hoststatus)
DOWN_PREFIX = PREFIX + "down:"
DOWN = DOWN_PREFIX + "{ip}:{port}"      #: string: an exchange that failed (JSON), EX its memory
PORT25 = PREFIX + "port25"              #: string: JSON state while port 25 is concluded blocked
PORT25_EVIDENCE = PREFIX + "port25:ev"  #: zset: "kind|ip|domain" -> time of the last failed connect
PORT25_RELAY = PREFIX + "port25:relay"  #: string: time the relay last worked (EX the window)
PORT25_PROBE = PREFIX + "port25:probe"  #: string: held by the worker whose turn it is to re-probe
STS_POLICY = PREFIX + "sts:{domain}"        #: string: JSON {"id", "text"}, EX the policy's max_age
STS_FAILURE = PREFIX + "stsfail:{domain}"   #: string: JSON {"id", "type", "detail"} of a failed fetch
TLSRPT = PREFIX + "tlsrpt:{day}:{domain}"   #: hash: TLS-RPT counts of a day and policy domain
TLSRPT_DAY = PREFIX + "tlsrpt:{day}"        #: set: the domains with counts that day
DNSLOCK_PREFIX = PREFIX + "dnslock:"        #: + "{type}:{name}": the worker resolving that name now

# -- suppression, webhooks
SUPPRESS_PREFIX = PREFIX + "suppress:"      #: + address: a suppression entry (JSON), EX its TTL
HOOK_PREFIX = PREFIX + "hook:"              #: + event id: a webhook event (hash: body b, tries n)
WEBHOOK_SENDERS = PREFIX + "webhook:senders"    #: zset: sender slot token -> expiry
WEBHOOK_DOWN = PREFIX + "webhook:down"          #: string with PX: the endpoint was unreachable, hold off

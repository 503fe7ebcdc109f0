"""The operator's commands: ``mxq queue`` (mailq, flush, drop) and ``mxq suppress``.

``mxq queue [--json] [--oldest N]``
    What is waiting, by domain: ``ready`` (on the domain's ready list,
    waiting for a worker), ``in flight`` (claimed by a worker under a lease)
    and ``deferred`` (waiting for its next attempt), counted in messages (a
    work item: one job's recipients in one domain) and recipients; jobs
    stored and not yet split by domain (``intake``); reports and webhook
    events waiting; and the N oldest deferred recipients with their age,
    attempts, next attempt and last reply.  Reads only (no lock; numbers may
    move while they are read).

``mxq queue list [--domain D] [--state S] [--json]``
    Like ``postqueue -p``: every job with work waiting, oldest first -- id,
    size, age, sender -- and each of its recipients not final yet with its
    state (``queued``, ``deferred``, ``active`` while being delivered), tries
    and last reply.  ``--domain`` / ``--state`` keep only those recipients.

``mxq queue show JOB [--no-content] [--json]``
    Like ``postcat``: the job's envelope (sender, DSN, arrival, size), every
    recipient with its state and last reply, then the message as stored.

``mxq queue flush [JOB|DOMAIN]``
    Move deferred work (of JOB, of DOMAIN, or all of it, webhook events included)
    to the back of its ready lists now and publish the tasks for it: the
    next attempt starts as soon as a worker is free instead of at its due
    time.  A flush of everything also clears the exchanges' failure memory
    (``mxq:down:*``), so an exchange marked down is tried again at once.

``mxq queue hold JOB|--domain D`` / ``mxq queue release JOB|--domain D``
    Like ``postsuper -h`` / ``-H``.  Hold: every recipient of the job not final
    yet (or every one waiting for the domain now: ready, deferred, in flight,
    in a job not split yet -- mail submitted afterwards is not held; that is
    ``suspend``) is not attempted until released, by any worker.  Its work items
    are parked in ``mxq:held``; a transaction under way completes and what is
    left of it is parked when next claimed.  As in Postfix, held mail does not
    expire while it is held; released, it goes to the back of its ready lists
    and is attempted at once, and ``MXQ_MAX_LIFETIME`` (counted from the
    submission) applies again: mail held longer than that gets one attempt and
    expires if it is deferred.

``mxq queue suspend DOMAIN [--duration TIME] [--reason TEXT]`` / ``mxq queue resume DOMAIN``
    Like KumoMTA's ``kcli suspend``: delivery to the domain stops on every
    worker (``mxq:suspend:{domain}``).  Its mail stays queued (deferred mail
    joins the ready list when due) and does not expire meanwhile; no task is
    published for it and no connection opened, so it holds no worker; a
    connection under way ends after its current chunk.  ``resume`` (or the end
    of ``--duration``, through the scheduler) delivers it.

``mxq queue drop JOB|DOMAIN [--yes]``
    Give up on every recipient of a job (a 32-hex job id), or on every
    recipient waiting for a domain (ready, deferred, in flight, or in a job
    not yet split), after a y/N question on the terminal (``--yes`` skips
    it).  Dropped recipients get the final state ``dropped`` (enhanced code
    5.0.0, text "dropped by the operator"): a state of its own, so it is
    never mistaken for what a server said, and no delivery status report is
    sent (as ``postsuper -d``).  Their work items leave the ready lists and
    the deferred queue in the same atomic script, so nothing of theirs is
    attempted afterwards.  A recipient whose SMTP transaction is under way
    at that moment may still receive that one transaction; the worker's
    release then keeps ``dropped``, or records ``delivered`` when it went
    through (the truth), and never retries it.  Webhook events
    (``dropped``) go out when ``MXQ_WEBHOOK_URL`` is set for this command.

``mxq suppress list [--json] | add ADDR [--ttl SECONDS] [--reason TEXT] | remove ADDR``
    The suppression list (``mxq.tasks.suppress``).

``mxq tlsrpt [--day DAY] [--domain DOMAIN ...] [--organization NAME] [--contact EMAIL] [--list]``
    The RFC 8460 aggregate report (JSON) of one UTC day's TLS sessions with
    recipient domains' exchanges, from the counts the workers keep in Redis
    (``mxq.tasks.hoststatus.RedisTLSReport``): one ``policies`` entry per
    domain and policy (``sts`` with the MTA-STS policy, or
    ``no-policy-found``), session counts, failure details.  ``--domain``
    narrows it to the report for one domain's TLS-RPT address.

Exit statuses (sysexits, as the other commands): 0 done, 1 drop not
confirmed, 64 usage, 65 a malformed address or domain, 66 unknown job / not
suppressed / not on hold / not suspended, 75 Redis unreachable, 78 a malformed
``MXQ_*`` setting.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time

from mxq.workers.reply import printable

from .store import items as workitems
from .store import keys as K     # mxq's Redis key names

EX_OK = 0
EX_DECLINED = 1
EX_DATAERR = 65
EX_NOINPUT = 66
EX_TEMPFAIL = 75
EX_CONFIG = 78

DROP_TEXT = "dropped by the operator (mxq queue drop)"
DROP_ENHANCED = "5.0.0"
JOB_ID = re.compile(r"[0-9a-f]{32}")

# ---------------------------------------------------------------- the operations (API)
class Admin:
    """Queue inspection and surgery on a ``mxq.tasks.store.Store`` (what the commands run)."""

    def __init__(self, store):
        from .store.queue import QueueScripts

        self.store = store
        self.r = store.r
        self.settings = store.settings
        self.scripts = QueueScripts(self.r)

    # -------------------------------------------------------- postqueue -p / postcat
    def where(self) -> dict[str, dict[str, str]]:
        """Every job with work waiting: ``{job: {domain: "ready" | "deferred" | "active" | "intake"}}``."""
        r = self.r
        out: dict[str, dict[str, str]] = {}

        def note(wid: str, how: str) -> None:
            if not workitems.is_delivery(wid):
                return
            job, domain, _ = workitems.delivery(wid)
            out.setdefault(job, {})[domain] = how

        for key in r.scan_iter(match=K.READY_PREFIX + "*", count=1000):
            lane = _s(key)[len(K.READY_PREFIX):]
            if lane.startswith("!"):
                continue
            for start in range(0, 10**9, 10000):
                chunk = r.lrange(key, start, start + 9999)
                for wid in chunk:
                    note(_s(wid), "ready")
                if len(chunk) < 10000:
                    break
        for wid in r.zrange(K.DEFERRED, 0, -1):
            note(_s(wid), "deferred")
        for wid in r.zrange(K.HELD, 0, -1):
            note(_s(wid), "held")
        leases = r.zrange(K.LEASE, 0, -1)
        if leases:
            pipe = r.pipeline(transaction=False)
            for t in leases:
                pipe.get(K.BATCH_PREFIX.encode() + t)
            for b in pipe.execute():
                if b:
                    for wid in _s(b).split("\n")[1:]:
                        note(wid, "active")
        for job in r.zrange(K.INTAKE, 0, -1):
            out.setdefault(_s(job), {})["*"] = "intake"
        return out

    def listing(self, *, domain: str | None = None, state: str | None = None, now: float | None = None) -> list[dict]:
        """The jobs in the queue, oldest first, each with its recipients not final yet (``mxq queue list``).

        A recipient's ``state`` here is ``active`` while its delivery is in flight, ``held``
        while it is on hold (``mxq queue hold``), else its record's (``queued``, ``deferred``).
        ``domain`` and ``state`` filter recipients (a job without any left is not listed).
        """
        from .store import FINAL_STATES

        now = self.store.now() if now is None else now
        jobs = []
        for job, places in self.where().items():
            found = self.store.job(job)
            if found is None:
                continue
            meta, records = found
            holds = self.holds(job, {rec.get("domain") for rec in records.values()})
            rows = []
            for i in sorted(records):
                rec = records[i]
                if rec.get("state") in FINAL_STATES:
                    continue
                place = places.get(rec.get("domain"))
                shown = ("active" if place == "active" else
                         "held" if place == "held" or rec.get("domain") in holds else rec.get("state"))
                if (domain and rec.get("domain") != domain) or (state and shown != state):
                    continue
                rows.append({"address": rec.get("address"), "domain": rec.get("domain"), "state": shown,
                             "attempts": rec.get("attempts") or 0, "code": rec.get("code"),
                             "enhanced": rec.get("enhanced"), "text": printable(rec.get("text") or ""),
                             "exchange": rec.get("exchange"), "next_attempt": rec.get("next_attempt")})
            if rows:
                created = float(meta.get("created") or now)
                jobs.append({"job": job, "size": int(meta.get("size") or 0), "created": created,
                             "age": now - created, "sender": meta.get("sender", ""), "recipients": rows})
        jobs.sort(key=lambda j: (j["created"], j["job"]))
        return jobs

    # -------------------------------------------------------- mailq
    def snapshot(self, *, oldest: int = 5, now: float | None = None) -> dict:
        """The queue by domain and state (the ``mxq queue --json`` document)."""
        now = self.store.now() if now is None else now
        r = self.r
        per: dict[str, dict] = {}

        def row(lane: str) -> dict:
            return per.setdefault(lane, {"domain": lane, "ready": 0, "in_flight": 0, "deferred": 0, "held": 0,
                                         "recipients": 0})

        def count(lane: str, wid: str, state: str) -> None:
            x = row(lane)
            x[state] += 1
            if not lane.startswith("!"):
                x["recipients"] += workitems.recipients(wid)

        lanes = [_s(k)[len(K.READY_PREFIX):] for k in r.scan_iter(match=K.READY_PREFIX + "*", count=1000)]
        for lane in lanes:
            for start in range(0, 10**9, 10000):
                chunk = r.lrange(K.ready(lane), start, start + 9999)
                for wid in chunk:
                    count(lane, _s(wid), "ready")
                if len(chunk) < 10000:
                    break
        leases = r.zrange(K.LEASE, 0, -1)
        if leases:
            pipe = r.pipeline(transaction=False)
            for t in leases:
                pipe.get(K.BATCH_PREFIX.encode() + t)
            for b in pipe.execute():
                if b:
                    held = _s(b).split("\n")
                    for wid in held[1:]:
                        count(held[0], wid, "in_flight")
        deferred = [(_s(w), due) for w, due in r.zrange(K.DEFERRED, 0, -1, withscores=True)]
        for wid, _ in deferred:
            count(workitems.lane_of(wid), wid, "deferred")
        for wid in r.zrange(K.HELD, 0, -1):
            count(workitems.lane_of(_s(wid)), _s(wid), "held")
        special = {k: per.pop(k) for k in ("!r", "!w") if k in per}
        for x in special.values():
            x.pop("held", None)
        domains = sorted(per.values(), key=lambda x: (-(x["ready"] + x["in_flight"] + x["deferred"] + x["held"]),
                                                      x["domain"]))
        totals = {s: sum(x[s] for x in domains) for s in ("ready", "in_flight", "deferred", "held", "recipients")}
        doc = {"time": now, "totals": totals, "domains": domains, "intake": r.zcard(K.INTAKE),
               "suspended": self.suspended(now=now),
               "reports": {s: special.get("!r", {}).get(s, 0) for s in ("ready", "in_flight")},
               "webhooks": {s: special.get("!w", {}).get(s, 0) for s in ("ready", "in_flight", "deferred")},
               "oldest_deferred": self._oldest([(w, d) for w, d in deferred if not w.startswith("!")], oldest, now),
               "port25": self.port25()}
        return doc

    def port25(self) -> dict | None:
        """The fleet's port-25 verdict (``mxq.workers.port25``): None, or the state with ``next_probe`` seconds."""
        from .hoststatus import RedisPort25State

        st = RedisPort25State(self.r)
        state = st.blocked()
        if state is not None:
            state["next_probe"] = st.probe_due()
        return state

    def _oldest(self, deferred: list[tuple[str, float]], n: int, now: float) -> list[dict]:
        """The ``n`` oldest deferred recipients (by the job's submission time)."""
        if not deferred or n <= 0:
            return []
        jobs = sorted({workitems.job_of(w) for w, _ in deferred})
        created: dict[str, float] = {}
        for i in range(0, len(jobs), 5000):
            pipe = self.r.pipeline(transaction=False)
            for j in jobs[i:i + 5000]:
                pipe.hget(K.job(j), "created")
            for j, c in zip(jobs[i:i + 5000], pipe.execute()):
                if c is not None:
                    created[j] = float(c)
        oldest = sorted((created[workitems.job_of(w)], w, due) for w, due in deferred if workitems.job_of(w) in created)
        out: list[dict] = []
        for when, wid, due in oldest:
            job, domain, indexes = workitems.delivery(wid)
            recs = self.r.hmget(K.job(job), [f"r:{i}" for i in indexes])
            for raw in recs:
                if raw is None:
                    continue
                rec = json.loads(raw)
                if rec.get("state") != "deferred":
                    continue
                out.append({"job": job, "domain": domain, "recipient": rec.get("address"), "age": now - when,
                            "attempts": rec.get("attempts") or 0, "next_attempt": due, "code": rec.get("code"),
                            "enhanced": rec.get("enhanced"), "text": rec.get("text") or "",
                            "exchange": rec.get("exchange"), "ip": rec.get("ip")})
                if len(out) >= n:
                    return out
        return out

    # -------------------------------------------------------- flush
    def flush(self, domain: str | None = None, *, now: float | None = None) -> tuple[int, list]:
        """Deferred work of ``domain`` (None: all) back to its ready lists; ``(moved, dispatch)``."""
        now = self.store.now() if now is None else now
        s = self.settings
        ips = None if domain is None else self._last_ips(domain)
        moved, disp = self.scripts.flush(domain or "", now=now, k=s.batch_size, maxpar=s.domain_concurrency)
        # Forget the failure memory too (of every exchange, or of the ones these recipients last
        # tried), or the retry would skip an exchange still marked down and defer at once.
        keys = [k for k in self.r.scan_iter(match=K.DOWN_PREFIX + "*", count=1000)
                if ips is None or _s(k)[len(K.DOWN_PREFIX):].rsplit(":", 1)[0] in ips]
        for i in range(0, len(keys), 1000):
            self.r.delete(*keys[i:i + 1000])
        return int(moved), _pairs(disp)

    def flush_job(self, job: str, *, now: float | None = None) -> tuple[int, list] | None:
        """One job's deferred work back to its ready lists (``mxq queue flush JOB``); None when unknown.

        The failure memory of the exchanges its recipients last tried is forgotten too."""
        now = self.store.now() if now is None else now
        s = self.settings
        found = self.store.job(job)
        if found is None:
            return None
        ips = {r.get("ip") for r in found[1].values() if r.get("ip")}
        moved, disp = self.scripts.flush_job(job, now=now, k=s.batch_size, maxpar=s.domain_concurrency)
        if int(moved) < 0:
            return None
        keys = [k for k in self.r.scan_iter(match=K.DOWN_PREFIX + "*", count=1000)
                if _s(k)[len(K.DOWN_PREFIX):].rsplit(":", 1)[0] in ips]
        if keys:
            self.r.delete(*keys)
        return int(moved), _pairs(disp)

    def _last_ips(self, domain: str) -> set[str]:
        """The exchange addresses the deferred recipients of ``domain`` last tried."""
        ips: set[str] = set()
        for w in self.r.zrange(K.DEFERRED, 0, -1):
            wid = _s(w)
            if not workitems.is_delivery(wid) or workitems.lane_of(wid) != domain:
                continue
            job, _, indexes = workitems.delivery(wid)
            for raw in self.r.hmget(K.job(job), [f"r:{i}" for i in indexes]):
                if raw is not None and json.loads(raw).get("ip"):
                    ips.add(json.loads(raw)["ip"])
        return ips

    # -------------------------------------------------------- hold / release (postsuper -h / -H)
    def holds(self, job: str, domains) -> set[str]:
        """The domains whose recipients of ``job`` are on hold."""
        domains = [d for d in domains if d]
        if not domains:
            return set()
        flags = self.r.hmget(K.job(job), [f"h:{d}" for d in domains])
        return {d for d, f in zip(domains, flags) if f}

    def hold_job(self, job: str, *, now: float | None = None) -> dict | None:
        """Put every recipient of ``job`` not final yet on hold; None when the job is unknown.

        ``{"held": recipients, "parked": work items taken off the ready lists and the deferred
        queue, "in_flight": work items being delivered now}``: a transaction under way completes,
        and what is left of it afterwards is held.
        """
        now = self.store.now() if now is None else now
        n, parked, inflight = self.scripts.hold_job(job, now=now)
        if int(n) < 0:
            return None
        return {"held": int(n), "parked": int(parked), "in_flight": int(inflight)}

    def hold_domain(self, domain: str, *, now: float | None = None) -> dict:
        """Put every recipient waiting for ``domain`` now on hold (ready, deferred, in flight, not split yet)."""
        now = self.store.now() if now is None else now
        n, parked, inflight = self.scripts.hold_domain(domain, now=now)
        return {"held": int(n), "parked": int(parked), "in_flight": int(inflight)}

    def release_job(self, job: str, *, now: float | None = None) -> dict | None:
        """Release ``job`` from hold: its parked work goes to the back of its ready lists at once.

        None when the job is unknown; ``{"was_held": domains that were on hold, "released":
        recipients, "moved": work items, "dispatch": [...]}``.
        """
        now = self.store.now() if now is None else now
        s = self.settings
        marked, n, moved, disp = self.scripts.release_job(job, now=now, k=s.batch_size, maxpar=s.domain_concurrency)
        if int(marked) < 0:
            return None
        return {"was_held": int(marked), "released": int(n), "moved": int(moved), "dispatch": _pairs(disp)}

    def release_domain(self, domain: str, *, now: float | None = None) -> dict:
        """Release every held recipient of ``domain``; ``{"was_held": jobs, "released", "moved", "dispatch"}``."""
        now = self.store.now() if now is None else now
        s = self.settings
        jobs, n, moved, disp = self.scripts.release_domain(domain, now=now, k=s.batch_size, maxpar=s.domain_concurrency)
        return {"was_held": int(jobs), "released": int(n), "moved": int(moved), "dispatch": _pairs(disp)}

    # -------------------------------------------------------- suspend / resume (kcli suspend)
    def suspend(self, domain: str, *, duration: float | None = None, reason: str = "",
                now: float | None = None) -> dict:
        """Suspend delivery to ``domain`` fleet-wide, for ``duration`` seconds or until resumed.

        Its mail stays queued (ready, deferred mail joining it when due); no task is published
        for it and no connection opened; a connection under way ends after its current chunk.
        Returns the suspension (``since``, ``expires`` or None, ``reason``, ``replaced``).
        """
        now = self.store.now() if now is None else now
        expires = now + duration if duration else None
        value = {"since": now, "expires": expires, "reason": reason}
        was = self.scripts.suspend(domain, json.dumps(value), int(math.ceil(duration * 1000)) if duration else 0,
                                   repr(expires) if expires else 0)
        return dict(value, domain=domain, replaced=bool(int(was)))

    def resume(self, domain: str, *, now: float | None = None) -> tuple[bool, list]:
        """End ``domain``'s suspension; ``(was suspended, dispatch)`` -- its ready mail gets tasks at once."""
        now = self.store.now() if now is None else now
        s = self.settings
        was, disp = self.scripts.resume(domain, now=now, k=s.batch_size, maxpar=s.domain_concurrency)
        return bool(int(was)), _pairs(disp)

    def suspended(self, *, now: float | None = None) -> list[dict]:
        """Every suspended domain: ``{domain, since, expires (None: until resumed), reason}``, by domain."""
        out, ended = [], []
        lanes = sorted(_s(x) for x in self.r.smembers(K.SUSPENDED))
        values = self.r.mget([K.suspend(d) for d in lanes]) if lanes else []
        for domain, raw in zip(lanes, values):
            if raw is None:             # a suspension whose duration is over
                ended.append(domain)
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                value = {}
            out.append({"domain": domain, "since": value.get("since"), "expires": value.get("expires"),
                        "reason": value.get("reason") or ""})
        if ended:
            self.r.srem(K.SUSPENDED, *ended)
        return out

    # -------------------------------------------------------- drop
    def _drop_args(self, now: float | None) -> list:
        from . import webhooks

        now = self.store.now() if now is None else now
        s = self.settings
        hooks = webhooks.current()
        hookttl = hooks.key_ttl if hooks.wants("dropped") else 0
        guardttl = int(max(3600, 2 * s.hard_time_limit))
        return [now, s.result_ttl, hookttl, DROP_TEXT, DROP_ENHANCED, s.batch_size, s.domain_concurrency, guardttl]

    def drop_job(self, job: str, *, now: float | None = None) -> dict | None:
        """Drop every recipient of ``job`` not final yet; None when the job is unknown."""
        n, removed, inflight, disp = self.scripts.drop_job(job, *self._drop_args(now))
        if int(n) < 0:
            return None
        return {"dropped": int(n), "removed": int(removed), "in_flight": int(inflight), "dispatch": _pairs(disp)}

    def drop_domain(self, domain: str, *, now: float | None = None) -> dict:
        """Drop every recipient waiting for ``domain`` (a normalised lane name)."""
        n, removed, inflight, disp = self.scripts.drop_domain(domain, *self._drop_args(now))
        return {"dropped": int(n), "removed": int(removed), "in_flight": int(inflight), "dispatch": _pairs(disp)}


def _s(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _pairs(flat) -> list[tuple[str, int]]:
    return [(_s(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


# ---------------------------------------------------------------- the commands
def add_commands(group) -> None:
    """Add ``mxq queue`` and ``mxq suppress`` (click groups) to the ``mxq`` group."""
    import argparse

    import click

    ctx_settings = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

    def ns(**kw):
        return argparse.Namespace(**kw)

    @click.group("queue", invoke_without_command=True,
                 short_help="the mail queue: summary, list, show, flush, hold, release, suspend, resume, drop",
                 context_settings=ctx_settings)
    @click.option("--json", "json", is_flag=True, help="Print the queue as one JSON document.")
    @click.option("--oldest", type=int, default=5, show_default=True, metavar="N",
                  help="Show the N oldest deferred recipients.")
    @click.pass_context
    def queue(ctx, json, oldest):
        """The mail queue: by domain and state (ready, in flight, deferred) and the oldest deferred
        recipients with their last reply; or an action on it."""
        if ctx.invoked_subcommand is None:
            return run_queue(ns(json=json, oldest=oldest))
        return None

    @queue.command("list", short_help="the jobs in the queue (postqueue -p)", context_settings=ctx_settings)
    @click.option("--domain", metavar="DOMAIN", help="Only recipients of this domain.")
    @click.option("--state", type=click.Choice(["queued", "deferred", "active", "held"]),
                  help="Only recipients in this state (active: being delivered now; held: on hold).")
    @click.option("--json", "json", is_flag=True, help="Print a JSON list of jobs.")
    def list_jobs(domain, state, json):
        """The jobs waiting, oldest first, like postqueue -p: id, size, age, sender, and each
        recipient not final yet with its state, tries and last reply."""
        return run_list(ns(domain=domain, state=state, json=json))

    @queue.command("show", short_help="one job: envelope and message (postcat)", context_settings=ctx_settings)
    @click.argument("job", metavar="JOB")
    @click.option("--no-content", is_flag=True, help="The envelope and recipients only.")
    @click.option("--json", "json", is_flag=True, help="Print the job as JSON (the message as text).")
    def show_job(job, no_content, json):
        """One job, like postcat: its envelope (sender, DSN, arrival, size), every recipient with its
        state and last reply, then the message as stored (DKIM-signed if it was)."""
        return run_show(ns(job=job, no_content=no_content, json=json))

    @queue.command("flush", context_settings=ctx_settings)
    @click.argument("domain", required=False, metavar="[JOB|DOMAIN]")
    @click.option("--json", "json", is_flag=True, help='Print {"moved": N, "domain": ...} ({"job": ...} for a job).')
    def flush(domain, json):
        """Retry deferred mail now (postqueue -f / -i): move it -- of JOB, of DOMAIN, or all of it --
        to its ready lists and publish the tasks for it; without an argument also forget which
        exchanges were down."""
        return run_flush(ns(domain=domain, json=json))

    @queue.command("hold", context_settings=ctx_settings)
    @click.argument("target", required=False, metavar="[JOB|DOMAIN]")
    @click.option("--domain", metavar="DOMAIN", help="Every message waiting for DOMAIN now.")
    @click.option("--json", "json", is_flag=True, help="Print the result as JSON.")
    def hold(target, domain, json):
        """Put mail on hold (postsuper -h): every recipient of JOB not final yet, or every one
        waiting for DOMAIN now, is not attempted -- and does not expire -- until released.  A
        transaction under way completes; what is left of it is held."""
        return run_hold(ns(target=target, domain=domain, json=json, release=False))

    @queue.command("release", context_settings=ctx_settings)
    @click.argument("target", required=False, metavar="[JOB|DOMAIN]")
    @click.option("--domain", metavar="DOMAIN", help="Every held message of DOMAIN.")
    @click.option("--json", "json", is_flag=True, help="Print the result as JSON.")
    def release(target, domain, json):
        """Release mail on hold (postsuper -H): it goes back to its ready lists and is attempted
        at once; from then on MXQ_MAX_LIFETIME applies again (counted from its submission)."""
        return run_hold(ns(target=target, domain=domain, json=json, release=True))

    @queue.command("suspend", context_settings=ctx_settings)
    @click.argument("domain", metavar="DOMAIN")
    @click.option("--duration", metavar="TIME", help="End the suspension after TIME (90, 90s, 30m, 2h, 1d); "
                  "default: until mxq queue resume.")
    @click.option("--reason", metavar="TEXT", default="", help="Why (shown by mxq queue).")
    @click.option("--json", "json", is_flag=True, help="Print the suspension as JSON.")
    def suspend(domain, duration, reason, json):
        """Suspend delivery to DOMAIN on every worker (kcli suspend): its mail stays queued, no
        connection is opened to it; resume (or the end of --duration) delivers it."""
        return run_suspend(ns(domain=domain, duration=duration, reason=reason, json=json))

    @queue.command("resume", context_settings=ctx_settings)
    @click.argument("domain", metavar="DOMAIN")
    @click.option("--json", "json", is_flag=True, help='Print {"resumed": true|false, "domain": ...}.')
    def resume(domain, json):
        """End DOMAIN's suspension: its mail is delivered at once."""
        return run_resume(ns(domain=domain, json=json))

    @queue.command("drop", context_settings=ctx_settings)
    @click.argument("target", metavar="JOB|DOMAIN")
    @click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--json", "json", is_flag=True, help="Print the result as JSON.")
    def drop(target, yes, json):
        """Give every recipient of JOB, or every recipient waiting for DOMAIN, the final state
        'dropped'; nothing of theirs is attempted afterwards.  Asks y/N unless --yes."""
        return run_drop(ns(target=target, yes=yes, json=json))

    @click.group("suppress", short_help="the suppression list (list, add, remove)", context_settings=ctx_settings)
    def suppress():
        """The suppression list: recipients that bounced permanently (5.1.x) are suppressed for
        MXQ_SUPPRESS_TTL seconds; new mail to them is not sent and ends 'suppressed'."""

    @suppress.command("list", context_settings=ctx_settings)
    @click.option("--json", "json", is_flag=True, help="Print a JSON list of entries.")
    def list_(json):
        """List suppressed addresses."""
        return run_suppress_list(ns(json=json))

    @suppress.command("add", context_settings=ctx_settings)
    @click.argument("address", metavar="ADDR")
    @click.option("--ttl", type=int, metavar="SECONDS", help="How long (default MXQ_SUPPRESS_TTL, 30 days).")
    @click.option("--reason", default="", metavar="TEXT", help="A note shown with the suppressed recipients.")
    @click.option("--json", "json", is_flag=True, help="Print the entry as JSON.")
    def add(address, ttl, reason, json):
        """Suppress an address."""
        return run_suppress_add(ns(address=address, ttl=ttl, reason=reason, json=json))

    @suppress.command("remove", context_settings=ctx_settings)
    @click.argument("address", metavar="ADDR")
    def remove(address):
        """Lift the suppression of an address (66 when it was not suppressed)."""
        return run_suppress_remove(ns(address=address))

    @click.command("tlsrpt", short_help="the TLS-RPT aggregate report (RFC 8460) of a day",
                   context_settings=ctx_settings)
    @click.option("--day", default="today", metavar="DAY",
                  help="YYYY-MM-DD, 'today' (the default, counts so far) or 'yesterday' (UTC).")
    @click.option("--domain", multiple=True, metavar="DOMAIN",
                  help="Only this recipient domain (repeatable): the report to send to its TLS-RPT address.")
    @click.option("--organization", metavar="NAME",
                  help="organization-name (default MXQ_TLSRPT_ORG, else MXQ_HELO_NAME / the host name).")
    @click.option("--contact", metavar="EMAIL",
                  help="contact-info (default MXQ_TLSRPT_CONTACT, else postmaster@ the HELO name).")
    @click.option("--list", "list_", is_flag=True, help="List the domains with counts that day instead.")
    def tlsrpt(day, domain, organization, contact, list_):
        """Print, as JSON, the RFC 8460 aggregate report of the TLS sessions the workers had with
        recipient domains' exchanges on one UTC day: per domain its policy (MTA-STS or none),
        successful and failed session counts and the failure details.  Counts are kept 8 days."""
        return run_tlsrpt(ns(day=day, domain=list(domain) or None, organization=organization, contact=contact,
                             list=list_))

    group.add_command(queue)
    group.add_command(suppress)
    group.add_command(tlsrpt)


def _admin(cmd: str):
    """``(Admin, None)``, or ``(None, exit status)`` with the error printed."""
    import redis

    from .settings import PipelineSettings
    from .store import Store

    try:
        settings = PipelineSettings.from_env()
    except ValueError as e:
        print(f"mxq {cmd}: configuration: {e}", file=sys.stderr)
        return None, EX_CONFIG
    # A quick client: an operator's command should say Redis is away in seconds, not ride out a restart.
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        print(f"mxq {cmd}: cannot reach Redis (MXQ_REDIS_URL): {e}", file=sys.stderr)
        return None, EX_TEMPFAIL
    return Admin(Store(client, settings)), None


def _redis_errors(fn):
    """Turn Redis trouble in the middle of a command into exit status 75 with a message."""
    def wrapper(args) -> int:
        import redis
        try:
            return fn(args)
        except redis.exceptions.RedisError as e:
            print(f"mxq: Redis error: {e}", file=sys.stderr)
            return EX_TEMPFAIL
    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


def _duration(seconds: float) -> str:
    """``3d4h``, ``2h5m``, ``4m12s``, ``9s``."""
    s = int(max(0, seconds))
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}{rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s}s"


def _table(rows: list[tuple], out) -> None:
    """``rows[0]`` is the header: the ``mxq`` table style (``mxq.tables``)."""
    from mxq.tables import print_table
    print_table(rows[0], rows[1:], out)


def print_queue(doc: dict, out=None) -> None:
    """The ``mxq queue`` table."""
    out = out or sys.stdout
    t = doc["totals"]
    p25 = doc.get("port25")
    if p25:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p25["since"]))
        due = p25.get("next_probe")
        out.write(f"port 25: BLOCKED since {since} (connections to {p25['exchanges']} exchanges of "
                  f"{p25['domains']} domains failed: {p25['kind']}); mail goes straight to the relay"
                  + (f"; next probe in {_duration(due)}" if due is not None else "") + "\n")
    for x in doc.get("suspended") or ():
        until = ("until resumed" if not x.get("expires") else
                 f"for {_duration(x['expires'] - doc['time'])} more (mxq queue resume ends it sooner)")
        out.write(f"suspended: {x['domain']} {until}" + (f": {printable(x['reason'])}" if x.get("reason") else "")
                  + "\n")
    if not doc["domains"] and not doc["intake"] and not any(doc["reports"].values()) \
            and not any(doc["webhooks"].values()):
        out.write("mail queue is empty\n")
        return
    sus = {x["domain"] for x in doc.get("suspended") or ()}
    rows = [("DOMAIN", "READY", "IN-FLIGHT", "DEFERRED", "HELD", "RECIPIENTS")]
    rows += [(x["domain"] + (" (suspended)" if x["domain"] in sus else ""), x["ready"], x["in_flight"], x["deferred"],
              x["held"], x["recipients"]) for x in doc["domains"]]
    rows.append(("TOTAL", t["ready"], t["in_flight"], t["deferred"], t["held"], t["recipients"]))
    _table(rows, out)
    out.write("(counts are messages -- one job's recipients in one domain -- except RECIPIENTS)\n")
    w, rp = doc["webhooks"], doc["reports"]
    out.write(f"intake {doc['intake']} job(s) not split yet; reports {rp['ready']} ready, {rp['in_flight']} "
              f"in flight; webhook events {w['ready']} ready, {w['in_flight']} in flight, {w['deferred']} deferred\n")
    if doc["oldest_deferred"]:
        out.write("\noldest deferred:\n")
        now = doc["time"]
        rows = [("AGE", "TRIES", "NEXT", "RECIPIENT  LAST REPLY")]
        for o in doc["oldest_deferred"]:
            reply = " ".join(str(x) for x in (o["code"], o["enhanced"]) if x)
            text = printable(o["text"] or "")
            where = f" [{o['exchange']}]" if o.get("exchange") else ""
            rows.append((_duration(o["age"]), o["attempts"], "in " + _duration(o["next_attempt"] - now),
                         f"{o['recipient']}  {reply} {text}{where}".rstrip()))
        _table(rows, out)


@_redis_errors
def run_queue(args) -> int:
    """``mxq queue``: the queue by domain and state."""
    admin, err = _admin("queue")
    if admin is None:
        return err
    doc = admin.snapshot(oldest=max(0, args.oldest))
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        print_queue(doc)
    return EX_OK


@_redis_errors
def run_list(args) -> int:
    """``mxq queue list [--domain D] [--state S] [--json]``."""
    domain = None
    if args.domain:
        domain = _domain(args.domain, "list")
        if domain is None:
            return EX_DATAERR
    admin, err = _admin("queue list")
    if admin is None:
        return err
    jobs = admin.listing(domain=domain, state=args.state)
    if args.json:
        print(json.dumps(jobs, default=str))
        return EX_OK
    if not jobs:
        print("mail queue is empty" if not (domain or args.state) else "no matching mail in the queue")
        return EX_OK
    rows = []
    for j in jobs:
        first = True
        for r in j["recipients"]:
            reply = " ".join(str(x) for x in (r["code"], r["enhanced"], r["text"]) if x)
            rows.append((j["job"] if first else "", j["size"] if first else None,
                         _duration(j["age"]) if first else "", (j["sender"] or "<>") if first else "",
                         r["address"], r["state"], r["attempts"] or None, reply))
            first = False
    from mxq.tables import print_table
    print_table(("JOB", "SIZE", "AGE", "SENDER", "RECIPIENT", "STATE", "TRIES", "LAST REPLY"), rows)
    n = sum(len(j["recipients"]) for j in jobs)
    print(f"-- {len(jobs)} job(s), {n} recipient(s), {sum(j['size'] for j in jobs)} octets")
    return EX_OK


@_redis_errors
def run_show(args) -> int:
    """``mxq queue show JOB [--no-content] [--json]``: 66 when the job is unknown."""
    from .store import status_of

    job = args.job.strip()
    if not JOB_ID.fullmatch(job):
        print(f"mxq queue show: {job!r} is not a job id (32 hex digits)", file=sys.stderr)
        return EX_NOINPUT
    admin, err = _admin("queue show")
    if admin is None:
        return err
    found = admin.store.job(job)
    if found is None:
        print(f"mxq queue show: no such job: {job} (unknown, or expired after MXQ_RESULT_TTL)", file=sys.stderr)
        return EX_NOINPUT
    meta, records = found
    status = status_of(job, meta, records)
    content = None if args.no_content else (admin.store.content(job) or b"")
    created = float(meta.get("created") or 0)
    doc = {"job": job, "state": status["state"], "sender": meta.get("sender", ""), "size": int(meta.get("size") or 0),
           "created": created, "ret": meta.get("ret") or None, "envid": meta.get("envid") or None,
           "held": sorted(admin.holds(job, {r.get("domain") for r in records.values()})),
           "recipients": status["recipients"]}
    if args.json:
        if content is not None:
            doc["content"] = content.decode("utf-8", "replace")
        print(json.dumps(doc, default=str))
        return EX_OK
    from mxq.tables import print_recipients
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created)) if created else "?"
    print(f"*** ENVELOPE RECORDS {job} ***")
    print(f"state: {doc['state']}")
    print(f"arrival_time: {when} ({_duration(time.time() - created)} ago)")
    print(f"message_size: {doc['size']}")
    print(f"sender: {doc['sender'] or '<>'}")
    if doc["ret"] or doc["envid"]:
        print(f"dsn: ret={doc['ret'] or '-'} envid={doc['envid'] or '-'}")
    if doc["held"]:
        print(f"on hold: its recipients in {', '.join(doc['held'])} (mxq queue release {job})")
    print_recipients(status["recipients"])
    if content is not None:
        print(f"*** MESSAGE CONTENTS {job} ***")
        sys.stdout.flush()
        sys.stdout.buffer.write(content.replace(b"\r\n", b"\n"))
        if not content.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
        print(f"*** END OF MESSAGE {job} ***")
    return EX_OK


def _domain(arg: str, cmd: str) -> str | None:
    from mxq.workers.address import normalize_domain
    from mxq.workers.errors import InvalidAddress

    try:
        return normalize_domain(arg.strip().rstrip("."))
    except InvalidAddress as e:
        print(f"mxq queue {cmd}: {arg!r} is not a domain: {e.reason}", file=sys.stderr)
        return None


def _publish(dispatch) -> None:
    """Publish the tasks a script asked for; a failure only delays the work (the scheduler re-publishes)."""
    if not dispatch:
        return
    try:
        from .dispatch import publish
        publish(dispatch)
    except Exception as e:      # the broker away: the ready work is in Redis, the scheduler re-dispatches
        print(f"mxq queue: could not publish tasks ({e}); the scheduler will", file=sys.stderr)


@_redis_errors
def run_flush(args) -> int:
    """``mxq queue flush [JOB|DOMAIN]``."""
    domain = None
    if args.domain and JOB_ID.fullmatch(args.domain.strip()):
        job = args.domain.strip()
        admin, err = _admin("queue flush")
        if admin is None:
            return err
        done = admin.flush_job(job)
        if done is None:
            print(f"mxq queue flush: no such job: {job} (unknown, or expired after MXQ_RESULT_TTL)", file=sys.stderr)
            return EX_NOINPUT
        moved, dispatch = done
        _publish(dispatch)
        if args.json:
            print(json.dumps({"moved": moved, "job": job}))
        else:
            print(f"flushed {moved} deferred message(s) of job {job}")
        return EX_OK
    if args.domain:
        domain = _domain(args.domain, "flush")
        if domain is None:
            return EX_DATAERR
    admin, err = _admin("queue flush")
    if admin is None:
        return err
    moved, dispatch = admin.flush(domain)
    _publish(dispatch)
    if args.json:
        print(json.dumps({"moved": moved, "domain": domain}))
    else:
        print(f"flushed {moved} deferred message(s)" + (f" of {domain}" if domain else ""))
    return EX_OK


def _target(args, cmd: str):
    """``(job, domain, None)`` from ``[JOB|DOMAIN] [--domain D]``, or ``(None, None, exit status)``."""
    if bool(args.target) == bool(args.domain):
        print(f"mxq queue {cmd}: give a JOB, or a DOMAIN (also as --domain DOMAIN), one of them", file=sys.stderr)
        return None, None, 64
    if args.target and JOB_ID.fullmatch(args.target.strip()):
        return args.target.strip(), None, None
    domain = _domain(args.domain or args.target, cmd)
    if domain is None:
        return None, None, EX_DATAERR
    return None, domain, None


@_redis_errors
def run_hold(args) -> int:
    """``mxq queue hold|release JOB|--domain D``: 66 for an unknown job, or nothing to release."""
    cmd = "release" if args.release else "hold"
    job, domain, err = _target(args, cmd)
    if err is not None:
        return err
    admin, err = _admin(f"queue {cmd}")
    if admin is None:
        return err
    what = f"job {job}" if job else domain
    if not args.release:
        result = admin.hold_job(job) if job else admin.hold_domain(domain)
        if result is None:
            print(f"mxq queue hold: no such job: {job} (unknown, or expired after MXQ_RESULT_TTL)", file=sys.stderr)
            return EX_NOINPUT
        if args.json:
            print(json.dumps(dict(result, job=job, domain=domain)))
        elif not result["held"]:
            print(f"nothing to hold: no recipient of {what} is waiting")
        else:
            print(f"held {result['held']} recipient(s) of {what}"
                  + (f"; {result['in_flight']} message(s) in flight complete their transaction first, what is "
                     "left of them is held" if result["in_flight"] else ""))
        return EX_OK
    result = admin.release_job(job) if job else admin.release_domain(domain)
    if result is None:
        print(f"mxq queue release: no such job: {job} (unknown, or expired after MXQ_RESULT_TTL)", file=sys.stderr)
        return EX_NOINPUT
    _publish(result.pop("dispatch"))
    if args.json:
        print(json.dumps(dict(result, job=job, domain=domain)))
    elif not result["was_held"]:
        print(f"mxq queue release: {what} is not on hold", file=sys.stderr)
    else:
        print(f"released {result['released']} recipient(s) of {what}")
    return EX_OK if result["was_held"] else EX_NOINPUT


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1w`` (or ``1h30m``) in seconds; ValueError when not one."""
    t = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", t)
    if not t or not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", "", t).strip():
        raise ValueError(f"{text!r} is not a duration (90, 90s, 30m, 2h, 1d)")
    total = sum(float(n) * _UNITS[u] for n, u in parts)
    if not 0 < total < 10 * 365 * 86400:
        raise ValueError(f"{text!r}: a duration must be positive (and under ten years)")
    return total


@_redis_errors
def run_suspend(args) -> int:
    """``mxq queue suspend DOMAIN [--duration TIME] [--reason TEXT]``."""
    duration = None
    if args.duration:
        try:
            duration = parse_duration(args.duration)
        except ValueError as e:
            print(f"mxq queue suspend: --duration: {e}", file=sys.stderr)
            return 64
    domain = _domain(args.domain, "suspend")
    if domain is None:
        return EX_DATAERR
    admin, err = _admin("queue suspend")
    if admin is None:
        return err
    doc = admin.suspend(domain, duration=duration, reason=args.reason or "")
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"suspended {domain} " + (f"for {_duration(duration)}" if duration else "until mxq queue resume")
              + (" (the previous suspension replaced)" if doc["replaced"] else ""))
    return EX_OK


@_redis_errors
def run_resume(args) -> int:
    """``mxq queue resume DOMAIN``: 66 when the domain was not suspended."""
    domain = _domain(args.domain, "resume")
    if domain is None:
        return EX_DATAERR
    admin, err = _admin("queue resume")
    if admin is None:
        return err
    was, dispatch = admin.resume(domain)
    _publish(dispatch)
    if args.json:
        print(json.dumps({"resumed": was, "domain": domain}))
    elif was:
        print(f"resumed {domain}")
    else:
        print(f"mxq queue resume: {domain} is not suspended", file=sys.stderr)
    return EX_OK if was else EX_NOINPUT


def _confirm(question: str) -> bool:
    """Ask on stderr, read a line from stdin: only y/yes says yes (EOF says no)."""
    sys.stderr.write(question + " [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


@_redis_errors
def run_drop(args) -> int:
    """``mxq queue drop JOB|DOMAIN [--yes]``."""
    target = args.target.strip()
    is_job = bool(JOB_ID.fullmatch(target))
    domain = None
    if not is_job:
        domain = _domain(target, "drop")
        if domain is None:
            return EX_DATAERR
    try:
        from . import webhooks
        webhooks.current()
    except ValueError as e:
        print(f"mxq queue drop: configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    admin, err = _admin("queue drop")
    if admin is None:
        return err
    if is_job:
        from .store import FINAL_STATES
        found = admin.store.job(target)
        if found is None:
            print(f"mxq queue drop: no such job: {target} (unknown, or expired after MXQ_RESULT_TTL)",
                  file=sys.stderr)
            return EX_NOINPUT
        pending = sum(1 for r in found[1].values() if r.get("state") not in FINAL_STATES)
        what = f"{pending} recipient(s) of job {target} not final yet"
    else:
        row = next((x for x in admin.snapshot(oldest=0)["domains"] if x["domain"] == domain), None)
        pending = row["recipients"] if row else 0
        what = f"{pending} recipient(s) waiting for {domain} (and any in jobs not split yet)"
    if pending == 0 and is_job:
        print(f"nothing to drop: every recipient of job {target} is final")
        return EX_OK
    if not args.yes and not _confirm(f"mxq queue drop: drop {what}?"):
        print("mxq queue drop: not confirmed; nothing dropped", file=sys.stderr)
        return EX_DECLINED
    result = admin.drop_job(target) if is_job else admin.drop_domain(domain)
    if result is None:
        print(f"mxq queue drop: job {target} expired meanwhile", file=sys.stderr)
        return EX_NOINPUT
    _publish(result.pop("dispatch"))
    if args.json:
        print(json.dumps(dict(result, target=target if is_job else domain)))
    else:
        print(f"dropped {result['dropped']} recipient(s)"
              + (f"; {result['in_flight']} batch(es)/message(s) were in flight: a transaction already under way "
                 "may still complete" if result["in_flight"] else ""))
    return EX_OK


def _suppressions(cmd: str):
    admin, err = _admin(f"suppress {cmd}")
    if admin is None:
        return None, err
    from .suppress import Suppressions
    return Suppressions(admin.r), None


@_redis_errors
def run_suppress_list(args) -> int:
    """``mxq suppress list``."""
    s, err = _suppressions("list")
    if s is None:
        return err
    entries = s.list()
    if args.json:
        print(json.dumps(entries, default=str))
        return EX_OK
    if not entries:
        print("no suppressed addresses")
        return EX_OK
    rows = [("ADDRESS", "SOURCE", "SINCE", "EXPIRES IN", "REASON")]
    for e in entries:
        since = time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(e["since"]))) if e.get("since") else "?"
        reason = " ".join(str(x) for x in (e.get("code"), e.get("enhanced"), e.get("text")) if x)
        rows.append((e["address"], e.get("source", "?"), since,
                     _duration(e["ttl"]) if (e.get("ttl") or -1) >= 0 else "never", printable(reason)))
    _table(rows, sys.stdout)
    return EX_OK


@_redis_errors
def run_suppress_add(args) -> int:
    """``mxq suppress add ADDR [--ttl S] [--reason TEXT]``."""
    from mxq.workers.errors import InvalidAddress

    if args.ttl is not None and args.ttl <= 0:
        print("mxq suppress add: --ttl must be a positive number of seconds", file=sys.stderr)
        return 64
    s, err = _suppressions("add")
    if s is None:
        return err
    try:
        entry = s.add(args.address, ttl=args.ttl, text=args.reason)
    except InvalidAddress as e:
        print(f"mxq suppress add: invalid address: {e.reason}", file=sys.stderr)
        return EX_DATAERR
    except ValueError as e:         # MXQ_SUPPRESS_TTL malformed
        print(f"mxq suppress add: configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.json:
        print(json.dumps(entry))
    else:
        print(f"suppressed {entry['address']} for {_duration(entry['ttl'])}")
    return EX_OK


@_redis_errors
def run_suppress_remove(args) -> int:
    """``mxq suppress remove ADDR``: 66 when the address was not suppressed."""
    from mxq.workers.errors import InvalidAddress

    s, err = _suppressions("remove")
    if s is None:
        return err
    try:
        removed = s.remove(args.address)
    except InvalidAddress as e:
        print(f"mxq suppress remove: invalid address: {e.reason}", file=sys.stderr)
        return EX_DATAERR
    if not removed:
        print(f"mxq suppress remove: {args.address} is not suppressed", file=sys.stderr)
        return EX_NOINPUT
    print(f"removed {suppress_norm(args.address)} from the suppression list")
    return EX_OK


def suppress_norm(address: str) -> str:
    """The normalised form ``mxq.tasks.suppress`` keys an address by."""
    from .suppress import normalize
    return normalize(address)


def _day(arg: str) -> str | None:
    import datetime as dt

    today = dt.datetime.now(dt.timezone.utc).date()
    if arg == "today":
        return today.isoformat()
    if arg == "yesterday":
        return (today - dt.timedelta(days=1)).isoformat()
    try:
        return dt.date.fromisoformat(arg).isoformat()
    except ValueError:
        return None


@_redis_errors
def run_tlsrpt(args) -> int:
    """``mxq tlsrpt``: the RFC 8460 aggregate report of a day, as JSON."""
    from mxq import settings as registry
    from mxq.workers.config import Settings
    from mxq.workers.tlsrpt import report

    from .hoststatus import RedisTLSReport

    day = _day(args.day)
    if day is None:
        print(f"mxq tlsrpt: --day must be YYYY-MM-DD, today or yesterday, not {args.day!r}", file=sys.stderr)
        return 64
    domains = None
    if args.domain:
        domains = []
        from mxq.workers.address import normalize_domain
        from mxq.workers.errors import InvalidAddress
        for d in args.domain:
            try:
                domains.append(normalize_domain(d.strip().rstrip(".")))
            except InvalidAddress as e:
                print(f"mxq tlsrpt: {d!r} is not a domain: {e.reason}", file=sys.stderr)
                return EX_DATAERR
    admin, err = _admin("tlsrpt")
    if admin is None:
        return err
    counts = RedisTLSReport(admin.r)
    if args.list:
        for d in counts.domains(day):
            print(d)
        return EX_OK
    try:
        helo = Settings.from_env().helo_name
        org = args.organization or registry.value("MXQ_TLSRPT_ORG") or helo
        contact = args.contact or registry.value("MXQ_TLSRPT_CONTACT") or f"postmaster@{helo}"
    except ValueError as e:
        print(f"mxq tlsrpt: configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    doc = report(day, counts.entries(day, domains), organization=org, contact=contact)
    print(json.dumps(doc, indent=2))
    return EX_OK

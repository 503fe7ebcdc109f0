"""Suppression: recipients that bounced permanently are not mailed again for a while.

Policy (what gets suppressed automatically)
-------------------------------------------

Only a permanent refusal of *that recipient*, by a remote SMTP server, about
*that recipient's address*, suppresses it.  All of these must hold:

- the attempt ended ``bounced`` with a 5xx ``code`` from a server;
- the reply applied to this recipient alone (the record's ``scope`` is
  ``recipient``: its own RCPT TO was refused, or the final reply after DATA
  of a transaction that carried it alone -- ``mxq.workers.results``).  A MAIL
  FROM or DATA refusal, or a final reply shared by several recipients, is
  copied to every recipient of the transaction and says nothing about any
  one of them: never suppressed;
- the enhanced status says the destination mailbox address is bad
  (``RECIPIENT_STATUSES``: 5.1.1 no such mailbox, 5.1.3 bad mailbox syntax,
  5.1.6 mailbox moved, 5.1.10 null MX for the recipient's address).  Not
  5.1.7 / 5.1.8 (the *sender's* address: an incident with the sending domain
  must not suppress valid recipients for a month), not 5.1.0 (other address
  status: sender or recipient) or 5.1.2 (the destination *domain*), not the
  message or policy classes (5.2.x, 5.6.x, 5.7.x, ...), and not a reply
  without an enhanced code;
- a reply that names an address in angle brackets first (Postfix's
  ``<addr>: Recipient address rejected: ...``) names this recipient.

Expiries and mxq's own local failures (``code`` None: null MX 5.1.10 or
NXDOMAIN 5.1.2 come from DNS and say nothing about this mailbox; they fail
again quickly anyway) never suppress.  The entry is
written by the release script, atomically with the bounce
(``mxq.tasks.store``); ``MXQ_SUPPRESS_TTL=0`` turns the automatic entries off
(entries added with ``mxq suppress add`` still apply).

Effect: a new submission to a suppressed address gets that recipient in the
final state ``suppressed`` at once (``mxq.tasks.status`` shows it, with the
reason in ``text`` and the original enhanced code, or 5.7.1 for an operator
entry); it is never delivered and never silently dropped, and no delivery
status report is sent (the submitter sees the state).  The job's other
recipients go ahead as usual.  The check is one ``MGET`` per submitted
batch, made just before the batch is stored.

Keys: ``mxq:suppress:{address}`` (string, JSON: ``address``, ``code``,
``enhanced``, ``text``, ``job``, ``since``, ``source`` = ``bounce`` or
``operator``) with ``EXPIRE`` = ``MXQ_SUPPRESS_TTL`` (default 30 days).  The
address is normalised: the local part lower-cased (receivers treat it
case-insensitively in practice; a suppression list that missed ``Bob@`` for
``bob@`` would be useless) and the domain as its IDNA A-label, lower case.

The operator's side is ``mxq suppress list|add ADDR [--ttl S]|remove ADDR``
(``mxq.tasks.admin``); ``Suppressions`` is the same thing as an API.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Iterable, Mapping

from mxq import settings as registry
from mxq.workers.address import parse_address
from mxq.workers.reply import printable

from .store.keys import SUPPRESS_PREFIX

log = logging.getLogger("mxq.suppress")

PREFIX = SUPPRESS_PREFIX
DEFAULT_TTL = 30 * 86400        #: seconds a recipient stays suppressed (``MXQ_SUPPRESS_TTL``)
#: Enhanced status of a suppressed recipient when the entry has none (an operator's entry).
OPERATOR_ENHANCED = "5.7.1"


def ttl_from_env(env: Mapping[str, str] | None = None) -> int:
    """``MXQ_SUPPRESS_TTL`` in seconds (default 30 days; 0: no automatic suppression); ValueError when bad."""
    return registry.value("MXQ_SUPPRESS_TTL", env)


_warned: set = set()


def auto_ttl() -> int:
    """The TTL for automatic entries in this process; a bad value is logged once and means off.

    Used on the delivery path, which must never fail because of a setting.
    """
    try:
        return ttl_from_env()
    except ValueError as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            log.error("%s: automatic suppression is off", e)
        return 0


def normalize(address: str) -> str:
    """The suppression form of an address: lower-cased local part, A-label domain.

    Raises ``InvalidAddress`` for a malformed address.
    """
    a = parse_address(address.strip())
    return f"{a.local.lower()}@{a.ascii_domain}"


def key(address: str) -> str:
    """The Redis key of an address's suppression entry."""
    return PREFIX + normalize(address)


#: Enhanced status codes (RFC 3463, RFC 7505) that say the recipient's mailbox address is bad.
RECIPIENT_STATUSES = frozenset({"5.1.1", "5.1.3", "5.1.6", "5.1.10"})
_NAMED = re.compile(r"\s*<([^<>\s]*)>")


def should_suppress(record: Mapping) -> bool:
    """Whether a recipient record's outcome suppresses the address (the policy above)."""
    code = record.get("code")
    if not (record.get("state") == "bounced" and isinstance(code, int) and 500 <= code < 600
            and record.get("scope") == "recipient" and record.get("enhanced") in RECIPIENT_STATUSES):
        return False
    named = _NAMED.match(record.get("text") or "")
    return named is None or named.group(1).lower() == str(record.get("address") or "").lower()


def release_arg(job: str, record: Mapping, now: float, ttl: int):
    """``[key, entry JSON, ttl]`` for the release script when ``record`` suppresses its address, else False."""
    if ttl <= 0 or not should_suppress(record):
        return False
    try:
        k = key(record["address"])
    except Exception:           # a stored address is always valid; never fail a release over it
        return False
    entry = {"address": k[len(PREFIX):], "code": record.get("code"), "enhanced": record.get("enhanced"),
             "text": (record.get("text") or "")[:500], "job": job, "since": now, "source": "bounce"}
    return [k, json.dumps(entry, separators=(",", ":")), int(ttl)]


def describe(entry: Mapping) -> str:
    """One line saying why an address is suppressed, for a recipient's ``text``."""
    since = entry.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(since))) if since else "?"
    if entry.get("source") == "operator":
        note = printable(str(entry.get("text") or "")) or "added by the operator"
        return f"suppressed since {when}: {note} (mxq suppress)"
    reply = " ".join(str(x) for x in (entry.get("code"), entry.get("enhanced")) if x)
    text = printable(str(entry.get("text") or ""))
    return f"suppressed since {when}: earlier permanent failure {reply} {text}".rstrip() + \
        (f" (job {entry['job']})" if entry.get("job") else "")


class Suppressions:
    """The suppression list in Redis: look-up, add, remove, list.

    ``client`` is a ``redis.Redis`` (bytes or decoded responses both work).
    """

    def __init__(self, client):
        self.r = client

    @staticmethod
    def _decode(value) -> dict | None:
        if value is None:
            return None
        try:
            entry = json.loads(value)
        except ValueError:
            return {"text": "unreadable entry"}
        return entry if isinstance(entry, dict) else {"text": str(entry)}

    def lookup(self, addresses: Iterable[str], *, normalised: bool = False) -> dict[str, dict]:
        """``{normalised address: entry}`` for the suppressed ones among ``addresses`` (MGET, chunked).

        ``normalised``: the addresses are already in ``normalize()``'s form.
        """
        norms = sorted(set(addresses) if normalised else {normalize(a) for a in addresses})
        found: dict[str, dict] = {}
        for i in range(0, len(norms), 1000):
            chunk = norms[i:i + 1000]
            for a, v in zip(chunk, self.r.mget([PREFIX + a for a in chunk])):
                entry = self._decode(v)
                if entry is not None:
                    found[a] = entry
        return found

    def get(self, address: str) -> dict | None:
        """The entry for ``address`` (with ``ttl`` in seconds), or None when it is not suppressed."""
        k = key(address)
        pipe = self.r.pipeline(transaction=False)
        pipe.get(k)
        pipe.ttl(k)
        value, ttl = pipe.execute()
        entry = self._decode(value)
        if entry is not None:
            entry["ttl"] = ttl
        return entry

    def add(self, address: str, ttl: int | None = None, text: str = "") -> dict:
        """Suppress ``address`` for ``ttl`` seconds (default ``MXQ_SUPPRESS_TTL``, else 30 days); return the entry."""
        norm = normalize(address)
        if ttl is None:
            ttl = ttl_from_env() or DEFAULT_TTL
        if ttl <= 0:
            raise ValueError("the suppression TTL must be positive")
        entry = {"address": norm, "code": None, "enhanced": None, "text": text or "added by the operator",
                 "job": None, "since": time.time(), "source": "operator"}
        self.r.set(PREFIX + norm, json.dumps(entry, separators=(",", ":")), ex=int(ttl))
        return dict(entry, ttl=int(ttl))

    def remove(self, address: str) -> bool:
        """Lift the suppression of ``address``; False when it was not suppressed."""
        return bool(self.r.delete(key(address)))

    def list(self) -> list[dict]:
        """Every entry (with ``ttl``), sorted by address (SCAN: never blocks Redis)."""
        keys = sorted(self.r.scan_iter(match=PREFIX + "*", count=1000))
        out = []
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            pipe = self.r.pipeline(transaction=False)
            for k in chunk:
                pipe.get(k)
                pipe.ttl(k)
            values = pipe.execute()
            for j, k in enumerate(chunk):
                entry = self._decode(values[2 * j])
                if entry is None:       # expired between SCAN and GET
                    continue
                name = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
                entry.setdefault("address", name[len(PREFIX):])
                entry["ttl"] = values[2 * j + 1]
                out.append(entry)
        return out


def apply(jobs, client) -> int:
    """Mark the suppressed recipients of ``jobs`` (``mxq.tasks.store.JobSpec``) before they are stored.

    A suppressed recipient's record becomes final (``suppressed``, with the
    reason); it leaves the job's domain lanes, and ``left`` counts only the
    others.  A job left with nothing to deliver is marked to expire like a
    finished job (``JobSpec.expire`` is set by the caller from the result
    TTL).  Returns how many recipients were suppressed.
    """
    addresses = {_record_key(r) for j in jobs for r in j.records}
    if not addresses:
        return 0
    found = Suppressions(client).lookup(addresses, normalised=True)
    if not found:
        return 0
    n = 0
    for j in jobs:
        hit = False
        for r in j.records:
            entry = found.get(_record_key(r))
            if entry is None:
                continue
            r.update(state="suppressed", code=None, enhanced=entry.get("enhanced") or OPERATOR_ENHANCED,
                     text=describe(entry))
            hit = True
            n += 1
        if hit:
            _resplit(j)
    return n


def _record_key(record: Mapping) -> str:
    """``normalize(record["address"])`` without parsing again: a stored record's address is valid
    and its ``domain`` is already the A-label form (the local part ends at the last ``@``)."""
    return record["address"].rpartition("@")[0].lower() + "@" + record["domain"]


def _resplit(job) -> None:
    """Recompute a JobSpec's domain lanes and ``left`` from its records' states."""
    for d in job.domains:
        job.meta.pop(f"d:{d}", None)
    by_domain: dict[str, list[str]] = {}
    for i, r in enumerate(job.records):
        if r["state"] == "queued":
            by_domain.setdefault(r["domain"], []).append(str(i))
    job.domains = list(by_domain)
    job.meta["domains"] = ",".join(by_domain)
    job.meta.update({f"d:{d}": ",".join(idx) for d, idx in by_domain.items()})
    job.meta["left"] = str(sum(len(v) for v in by_domain.values()))

"""SMTP TLS Reporting (RFC 8460): per-domain counts of TLS sessions, and the daily report.

Delivery calls ``sink.record(policy, failure)`` once per TLS session with a
recipient domain's exchange (a connection that got as far as the TLS
decision), and once per exchange it refused to use because a policy said
so.  ``policy`` is a ``PolicyRef`` (the ``policy`` object of the report:
``sts`` with the policy's lines and mx patterns, or ``no-policy-found``);
``failure`` is None for a successful session, else a ``Failure`` with an
RFC 8460 result type.  What counts:

- no policy: success when TLS was negotiated; ``starttls-not-supported``
  when STARTTLS was not offered or was refused; ``validation-failure``
  when the handshake failed (opportunistic TLS then continues in clear);
- MTA-STS ``enforce`` / ``testing``: success when TLS was negotiated with a
  certificate verified for the MX host name; ``starttls-not-supported``,
  ``certificate-host-mismatch``, ``certificate-expired``,
  ``certificate-not-trusted`` or ``validation-failure`` otherwise;
  ``validation-failure`` (reason ``mx-not-in-policy``) for an exchange the
  policy does not list;
- a policy announced but not obtained: every session counts as a failure of
  the ``sts`` policy with ``sts-policy-fetch-error``, ``sts-policy-invalid``
  or ``sts-webpki-invalid``.

Sessions are counted by UTC day.  ``report(day, entries, ...)`` turns the
counts into the RFC 8460 section 4.4 JSON (``mxq tlsrpt`` prints it for the
pipeline's counts in Redis).

``MemoryTLSReport`` keeps counts in process (the plain engine's default,
``default_report()``); the pipeline's Redis one is
``mxq.tasks.hoststatus.RedisTLSReport``.  Nothing here holds a secret.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Protocol

__all__ = ["PolicyRef", "Failure", "TLSReportSink", "MemoryTLSReport", "report", "day_of", "classify_tls_failure",
           "default_report", "local_address", "RESULT_TYPES"]

STS, NO_POLICY = "sts", "no-policy-found"

STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERT_HOST_MISMATCH = "certificate-host-mismatch"
CERT_EXPIRED = "certificate-expired"
CERT_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"

#: RFC 8460 section 4.3 result types (DANE's are listed for completeness; mxq does not do DANE).
RESULT_TYPES = (STARTTLS_NOT_SUPPORTED, CERT_HOST_MISMATCH, CERT_EXPIRED, CERT_NOT_TRUSTED, VALIDATION_FAILURE,
                "tlsa-invalid", "dnssec-invalid", "dane-required",
                "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")

# OpenSSL verify codes (X509_V_ERR_*) and what RFC 8460 calls them.
_VERIFY_CODES = {
    62: CERT_HOST_MISMATCH,    # HOSTNAME_MISMATCH
    64: CERT_HOST_MISMATCH,    # IP_ADDRESS_MISMATCH
    10: CERT_EXPIRED,          # CERT_HAS_EXPIRED
    9: CERT_NOT_TRUSTED,       # CERT_NOT_YET_VALID
    2: CERT_NOT_TRUSTED,       # UNABLE_TO_GET_ISSUER_CERT
    18: CERT_NOT_TRUSTED,      # DEPTH_ZERO_SELF_SIGNED_CERT
    19: CERT_NOT_TRUSTED,      # SELF_SIGNED_CERT_IN_CHAIN
    20: CERT_NOT_TRUSTED,      # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: CERT_NOT_TRUSTED,      # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27: CERT_NOT_TRUSTED,      # CERT_UNTRUSTED
}


@dataclass(frozen=True)
class PolicyRef:
    """The ``policy`` object of an RFC 8460 report: type, domain, and for ``sts`` its lines and mx patterns."""

    type: str
    domain: str
    strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    @classmethod
    def of(cls, lookup) -> "PolicyRef":
        """The policy of an ``mxq.workers.mtasts.Lookup`` (no policy and no failure: ``no-policy-found``)."""
        p = lookup.policy
        if p is not None:
            return cls(STS, lookup.domain, tuple(p.lines), tuple(p.mx))
        if lookup.failure:
            return cls(STS, lookup.domain)           # announced, not obtained: an sts policy we cannot show
        return cls(NO_POLICY, lookup.domain)

    @classmethod
    def none(cls, domain: str) -> "PolicyRef":
        return cls(NO_POLICY, domain)

    def to_json(self) -> dict:
        d = {"policy-type": self.type}
        if self.type == STS and self.strings:
            d["policy-string"] = list(self.strings)
        d["policy-domain"] = self.domain
        if self.type == STS and self.mx_host:
            d["mx-host"] = list(self.mx_host)
        return d

    def key(self) -> str:
        """A stable text key (JSON) for grouping counts."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Failure:
    """One failure-details entry (without its count): RFC 8460 section 4.4 field names in ``to_json``."""

    result_type: str
    receiving_mx_hostname: str | None = None
    receiving_ip: str | None = None
    sending_mta_ip: str | None = None
    failure_reason_code: str | None = None

    def to_json(self) -> dict:
        d = {"result-type": self.result_type}
        for key, value in (("sending-mta-ip", self.sending_mta_ip),
                           ("receiving-mx-hostname", self.receiving_mx_hostname),
                           ("receiving-ip", self.receiving_ip),
                           ("failure-reason-code", self.failure_reason_code)):
            if value:
                d[key] = value
        return d

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> "Failure":
        d = json.loads(key)
        return cls(d["result-type"], d.get("receiving-mx-hostname"), d.get("receiving-ip"), d.get("sending-mta-ip"),
                   d.get("failure-reason-code"))


class TLSReportSink(Protocol):
    """Where session outcomes are counted (never raises for a storage problem)."""

    def record(self, policy: PolicyRef, failure: Failure | None = None, *, when: float | None = None) -> None: ...


def day_of(when: float | None = None) -> str:
    """The UTC day (``YYYY-MM-DD``) of ``when`` (``time.time()`` seconds; now when None)."""
    return _dt.datetime.fromtimestamp(time.time() if when is None else when, _dt.timezone.utc).strftime("%Y-%m-%d")


class MemoryTLSReport:
    """In-process ``TLSReportSink``: counts by day and domain (thread-safe), the last ``keep_days`` days."""

    def __init__(self, keep_days: int = 8):
        self.keep_days = keep_days
        self._lock = threading.Lock()
        # (day, domain) -> policy key -> [PolicyRef, ok, fail, Counter(failure key -> n)]
        self._data: dict[tuple[str, str], dict[str, list]] = {}
        self._days: set[str] = set()

    def record(self, policy: PolicyRef, failure: Failure | None = None, *, when: float | None = None) -> None:
        day = day_of(when)
        with self._lock:
            if day not in self._days:
                self._days.add(day)
                # A new day: forget days older than keep_days (ISO dates sort as dates).
                cutoff = (_dt.date.fromisoformat(day) - _dt.timedelta(days=self.keep_days)).isoformat()
                self._days = {d for d in self._days if d > cutoff}
                self._data = {k: v for k, v in self._data.items() if k[0] > cutoff}
            entry = self._data.setdefault((day, policy.domain), {}).setdefault(
                policy.key(), [policy, 0, 0, Counter()])
            if failure is None:
                entry[1] += 1
            else:
                entry[2] += 1
                entry[3][failure.key()] += 1

    def domains(self, day: str) -> list[str]:
        """Domains with counts on ``day``."""
        with self._lock:
            return sorted(d for (dy, d) in self._data if dy == day)

    def entries(self, day: str, domains: Iterable[str] | None = None) -> list[dict]:
        """The counts of ``day`` (of ``domains`` only, when given) in the shape ``report`` takes."""
        wanted = set(domains) if domains is not None else None
        out = []
        with self._lock:
            for (dy, domain), policies in sorted(self._data.items()):
                if dy != day or (wanted is not None and domain not in wanted):
                    continue
                for ref, ok, fail, details in policies.values():
                    out.append({"policy": ref.to_json(), "ok": ok, "fail": fail,
                                "details": [(json.loads(k), n) for k, n in details.items()]})
        return out

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._days.clear()


def _report_id(day: str, domains: list[str], organization: str) -> str:
    """A unique, bounded report-id: the policy domain when the report is for one (what a report sent to
    that domain's TLS-RPT address is), else a digest of the sorted domains (the id does not grow with them)."""
    if len(domains) == 1 and domains[0]:
        which = domains[0]
    elif not domains:
        which = "none"
    else:
        which = f"{len(domains)}-domains-" + hashlib.sha256("\n".join(domains).encode()).hexdigest()[:16]
    return f"{day}T00:00:00Z_{which}@{organization}"


def report(day: str, entries: list[dict], *, organization: str, contact: str,
           report_id: str | None = None) -> dict:
    """The RFC 8460 section 4.4 aggregate report of ``day`` (``YYYY-MM-DD``, UTC).

    ``entries``: ``{"policy": <policy object>, "ok": n, "fail": n,
    "details": [(<failure-details object without count>, n), ...]}`` as
    ``MemoryTLSReport.entries`` or ``RedisTLSReport.entries`` give them; one
    ``policies`` element each, ordered by policy domain.
    """
    _dt.date.fromisoformat(day)                    # a ValueError for a malformed day
    policies = []
    for e in sorted(entries, key=lambda e: (e["policy"].get("policy-domain", ""), json.dumps(e["policy"],
                                                                                            sort_keys=True))):
        item = {"policy": e["policy"],
                "summary": {"total-successful-session-count": int(e["ok"]),
                            "total-failure-session-count": int(e["fail"])}}
        details = [dict(d, **{"failed-session-count": int(n)}) for d, n in e.get("details", ()) if int(n) > 0]
        if details:
            item["failure-details"] = sorted(details, key=lambda d: (-d["failed-session-count"],
                                                                    json.dumps(d, sort_keys=True)))
        policies.append(item)
    domains = sorted({p["policy"].get("policy-domain", "") for p in policies})
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": report_id or _report_id(day, domains, organization),
        "policies": policies,
    }


def classify_tls_failure(exc: BaseException) -> str | None:
    """The RFC 8460 result type of a failure while setting up TLS with an exchange, or None.

    None: not a TLS negotiation failure (a refused connection, a timeout, a
    dropped connection before the TLS decision) -- such a session is not
    counted.
    """
    from .errors import SMTPTLSError     # late: keep this module importable on its own
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return _VERIFY_CODES.get(getattr(e, "verify_code", None), VALIDATION_FAILURE)
        e = e.__cause__ or e.__context__
    if isinstance(exc, SMTPTLSError):
        if exc.enhanced == "4.7.4" or "STARTTLS refused" in exc.text:
            return STARTTLS_NOT_SUPPORTED
        return VALIDATION_FAILURE
    return None


def local_address(remote_ip: str, port: int = 25) -> str | None:
    """The source address the kernel picks to reach ``remote_ip`` (a UDP connect: nothing is sent)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in remote_ip else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((remote_ip, port))
            return s.getsockname()[0]
    except OSError:
        return None


_default: MemoryTLSReport | None = None
_default_lock = threading.Lock()


def default_report() -> MemoryTLSReport:
    """The process-wide in-memory counts (the plain engine's sink)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MemoryTLSReport()
        return _default

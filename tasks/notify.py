"""Delivery status notifications: non-delivery reports and delay notices (RFC 3464).

When a recipient bounces or expires and its NOTIFY asks for failures (the
default when NOTIFY is unset), a report goes back to the envelope sender
through the same pipeline: it is submitted with ``mxq.tasks.submit`` with the null
sender ``<>`` as its envelope sender, so a report can never trigger another
report, and a message whose own sender is null never gets one.  When NOTIFY
includes DELAY, a delay notice (Action: delayed) goes out once per message
per recipient set, when those recipients are first deferred.

Contract with the core (``tasks/graph.py``)
-------------------------------------------

Pure parts, no Redis::

    build_report(sender=..., recipients=[ReportRecipient, ...], original=b"...",
                 helo_name=..., ret=None, envid=None, arrival=None, date=None) -> Report
    wants_report(sender, notify, action) -> bool
    ReportRecipient.from_record(record, action=..., ...)   # from a stored recipient dict

Integration, called by the core when recipients of one job become final
(bounced/expired) or are deferred for the first time::

    send_reports(message, records, *, action="failed", submit=None) -> str | None

``message`` is a mapping describing the original job::

    {"job": id, "sender": "a@b.test" or "" (null sender), "content": bytes,
     "ret": "FULL"|"HDRS"|None, "envid": str|None,
     "arrival": epoch seconds|None, "expires": epoch seconds|None (Will-Retry-Until)}

``records`` are the recipients the report is about, as the core stores them:
``RecipientResult.to_dict()`` keys (``address``, ``state``, ``code``,
``enhanced``, ``text``, ``exchange``, ...) plus ``notify`` (list of NOTIFY
keywords or None), ``orcpt`` (str or None) and optionally ``last_attempt``
(epoch seconds).  ``action`` is ``"failed"`` (bounced/expired) or
``"delayed"``.  Recipients whose NOTIFY does not ask for this kind of report
are dropped; all the remaining ones of the message go into ONE report.  The
report is submitted with ``mxq.tasks.submit(report_bytes, sender="",
recipients=[message["sender"]])`` (``submit`` overrides that callable, for
tests) and its job id returned; None when no report was due.

Delay notices are sent once: the core marks a recipient's record
``delay_reported`` and queues a ``delayed`` event only the first time it is
deferred (``mxq.tasks.store``: report work items ``!r|{job}|{index}|{event}`` on
the report lane, handled by the core's ``mxq.notify`` task, which groups the
items of one job and event and calls ``send_reports`` once per group).
``message_from_meta(job_id, meta, content)`` turns the store's job hash
(``mxq.tasks.store``: ``sender``, ``ret``, ``envid``, ``created``) into the
``message`` mapping above.  Reports are ordinary jobs, delivered like any mail.
"""

from __future__ import annotations

import email.utils
import io
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Callable, Iterable, Mapping, Sequence

from mxq.workers.reply import printable

ACTIONS = ("failed", "delayed")

#: Queue the notification task runs on (the core's routing and ``mxq worker`` consume it).
QUEUE = "mxq.notifications"


def wants_report(sender: str | None, notify: Sequence[str] | None, action: str) -> bool:
    """Whether a recipient with this NOTIFY gets a report for ``action`` (RFC 3461 section 4.1).

    Never for the null sender (a report about a report would loop).  With NOTIFY
    unset, failures are reported and delays are not (we do not advertise delay
    notices unless asked, as RFC 3461 allows); NEVER suppresses everything.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    if not sender or sender.strip() in ("", "<>"):
        return False
    keywords = {k.upper() for k in notify} if notify else None
    if keywords is None:
        return action == "failed"
    if "NEVER" in keywords:
        return False
    return ("FAILURE" if action == "failed" else "DELAY") in keywords


def _date(value: float | datetime | str | None) -> str | None:
    """An RFC 5322 date-time from epoch seconds, a datetime or an already formatted string."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value            # already a date string
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, tz=timezone.utc)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return email.utils.format_datetime(value)


def _address_type(addr: str) -> str:
    """``rfc822;addr`` for ASCII addresses, ``utf-8;addr`` (RFC 6533) otherwise."""
    return f"rfc822;{addr}" if addr.isascii() else f"utf-8;{addr}"


@dataclass(frozen=True)
class ReportRecipient:
    """One per-recipient block of a delivery-status report.

    ``status`` is the RFC 3463 code to report; ``diagnostic`` the remote
    server's reply as text (``"550 5.1.1 no such user"``) or a local reason;
    ``remote`` says whether ``diagnostic`` came from an SMTP server (reported
    as ``smtp;``) or from mxq itself (``X-mxq;``).
    """

    address: str
    action: str = "failed"
    status: str = "5.0.0"
    orcpt: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    remote: bool = True
    last_attempt: float | datetime | str | None = None
    will_retry_until: float | datetime | str | None = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")

    @classmethod
    def from_record(cls, record: Mapping, *, action: str | None = None,
                    will_retry_until: float | datetime | str | None = None) -> "ReportRecipient":
        """Build from a stored recipient dict (``RecipientResult.to_dict()`` keys plus ``orcpt``, ``last_attempt``).

        ``action`` defaults from ``record["state"]``: deferred -> delayed, else failed.
        Expired recipients without an enhanced code get 4.4.7 (delivery time
        expired), bounced ones 5.0.0; a delay without one 4.0.0.
        """
        state = str(record.get("state") or "")
        if action is None:
            action = "delayed" if state in ("deferred", "queued") else "failed"
        code = record.get("code")
        enhanced = record.get("enhanced")
        text = printable(str(record.get("text") or "")).strip()
        if enhanced:
            status = enhanced
        elif code:
            status = "%d.0.0" % (int(code) // 100)
        elif state == "expired":
            status = "4.4.7"
        elif action == "delayed":
            status = "4.0.0"
        else:
            status = "5.0.0"
        if code:
            diagnostic = " ".join(p for p in (str(code), enhanced or "", text) if p)
            remote = True
        else:
            diagnostic = text or ("delivery time expired" if state == "expired" else None)
            remote = False
        exchange = record.get("exchange")
        return cls(address=str(record["address"]), action=action, status=status,
                   orcpt=record.get("orcpt") or None, remote_mta=printable(exchange) if exchange else None,
                   diagnostic=diagnostic, remote=remote,
                   last_attempt=record.get("last_attempt") or record.get("updated"),
                   will_retry_until=will_retry_until if action == "delayed" else None)


def _fields(pairs: Iterable[tuple[str, str | None]]) -> Message:
    """One header block of a message/delivery-status body (fields with a None value left out).

    Values are made ``printable`` (no control character from a remote reply gets in).
    """
    block = Message(policy=email_policy.compat32)
    for name, value in pairs:
        if value is not None and value != "":
            block[name] = printable(value)
    return block


def _split_headers(original: bytes) -> bytes:
    """The header section of a raw message (up to, not including, the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = original.find(sep)
        if i >= 0:
            return original[:i + len(sep) // 2]
    return original


def _as_bytes(original: bytes | str | EmailMessage | Message) -> bytes:
    if isinstance(original, bytes):
        return original
    if isinstance(original, str):
        return original.encode("utf-8")
    return original.as_bytes(policy=email_policy.SMTP)


def _text_cte(data: bytes) -> str:
    """7bit when ASCII, 8bit otherwise (reports of SMTPUTF8 mail need 8BITMIME anyway)."""
    return "7bit" if data.isascii() else "8bit"


class _ReportGenerator(BytesGenerator):
    """``BytesGenerator`` that also writes message/global-delivery-status as header blocks.

    The stdlib knows only message/delivery-status as a list of header blocks;
    the RFC 6533 form has the same structure (with UTF-8 allowed).
    """

    def _handle_message_global_delivery_status(self, msg):
        # Its fields may hold UTF-8 (RFC 6533) even when the report's own header fields are ASCII.
        saved = self.policy
        if isinstance(saved, email_policy.EmailPolicy) and not saved.utf8:
            self.policy = saved.clone(utf8=True)
        try:
            self._handle_message_delivery_status(msg)
        finally:
            self.policy = saved


class Report(EmailMessage):
    """The report ``build_report`` returns: an ``EmailMessage`` whose ``as_bytes()`` (and
    ``bytes()``) use its own policy and know the RFC 6533 global delivery-status part."""

    def as_bytes(self, unixfrom: bool = False, policy=None) -> bytes:
        """Serialise (default policy: the report's own, SMTPUTF8 for internationalised reports)."""
        fp = io.BytesIO()
        _ReportGenerator(fp, mangle_from_=False, policy=self.policy if policy is None else policy).flatten(
            self, unixfrom=unixfrom)
        return fp.getvalue()

    def __bytes__(self) -> bytes:
        return self.as_bytes()


def build_report(*, sender: str, recipients: Sequence[ReportRecipient],
                 original: bytes | str | EmailMessage | Message, helo_name: str,
                 ret: str | None = None, envid: str | None = None,
                 arrival: float | datetime | str | None = None,
                 date: float | datetime | None = None) -> Report:
    """Build one RFC 3464 report about ``recipients`` of one message, addressed to ``sender``.

    The report is ``multipart/report; report-type=delivery-status`` with a
    human-readable ``text/plain`` part, the ``message/delivery-status`` part
    and the original message: its header section as ``text/rfc822-headers``
    (``ret`` HDRS or unset) or the whole of it as ``message/rfc822`` (FULL).
    It is a delay notice when every recipient's action is ``delayed``.

    Internationalised mail (RFC 6533): when the sender or a reported address
    is not ASCII, the report is ``report-type=global-delivery-status`` with a
    ``message/global-delivery-status`` part (``utf-8;`` address types), and
    its ``policy`` is SMTPUTF8; an original whose header section is not ASCII
    is returned as ``message/global`` or ``message/global-headers``.  A
    diagnostic that is not ASCII (a server answering in UTF-8) makes the
    status part ``message/global-delivery-status`` too (RFC 6533 allows UTF-8
    in its fields), while the report's own header fields stay ASCII, so it
    needs 8BITMIME but not SMTPUTF8; the text part is then quoted-printable.
    Control characters in any value (ESC from a hostile reply) are replaced
    with ``?`` (``mxq.workers.reply.printable``), so a report can always be built.
    Serialise with ``report.as_bytes()`` (a ``Report``).  Pure: no Redis, no
    network.
    """
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    if not sender or sender in ("<>",):
        raise ValueError("no report goes to the null sender")
    delayed = all(r.action == "delayed" for r in recipients)
    now = date if date is not None else time.time()
    raw = _as_bytes(original)
    headers = _split_headers(raw)
    parsed = BytesParser(policy=email_policy.default).parsebytes(headers)
    utf8 = not sender.isascii() or any(not r.address.isascii() or not (r.orcpt or "").isascii()
                                       for r in recipients)
    # A non-ASCII diagnostic (or remote MTA name): RFC 6533's status part, ASCII headers.
    global_status = utf8 or any(not (r.diagnostic or "").isascii() or not (r.remote_mta or "").isascii()
                                for r in recipients)
    policy = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP
    kind = "global-delivery-status" if global_status else "delivery-status"

    report = Report(policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{helo_name}>"
    report["To"] = sender
    report["Subject"] = ("Delayed Mail (still being retried)" if delayed
                         else "Undelivered Mail Returned to Sender")
    report["Date"] = _date(now)
    report["Message-ID"] = email.utils.make_msgid(domain=helo_name)
    report["Auto-Submitted"] = "auto-replied"      # RFC 3834: automatic responders leave it alone
    if parsed.get("Message-ID"):
        report["In-Reply-To"] = str(parsed["Message-ID"])
        report["References"] = str(parsed["Message-ID"])
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = f"multipart/report; report-type={kind}"

    human = EmailMessage(policy=policy)
    text = _human_text(recipients, helo_name, delayed, parsed)
    human.set_content(text, cte=None if utf8 or text.isascii() else "quoted-printable")
    human["Content-Description"] = "Notification"
    report.attach(human)

    blocks = [_fields([("Reporting-MTA", f"dns; {helo_name}"),
                       ("Original-Envelope-Id", envid),
                       ("Arrival-Date", _date(arrival))])]
    for r in recipients:
        blocks.append(_fields([
            ("Original-Recipient", _address_type(r.orcpt.removeprefix("rfc822;")) if r.orcpt else None),
            ("Final-Recipient", _address_type(r.address)),
            ("Action", r.action),
            ("Status", r.status),
            ("Remote-MTA", f"dns; {r.remote_mta}" if r.remote_mta else None),
            ("Diagnostic-Code", (f"smtp; {r.diagnostic}" if r.remote else f"X-mxq; {r.diagnostic}")
             if r.diagnostic else None),
            ("Last-Attempt-Date", _date(r.last_attempt)),
            ("Will-Retry-Until", _date(r.will_retry_until) if r.action == "delayed" else None),
        ]))
    status = EmailMessage(policy=policy)
    status["Content-Type"] = f"message/{kind}"
    status["Content-Description"] = "Delivery report"
    if global_status:
        status["Content-Transfer-Encoding"] = "8bit"
    status.set_payload(blocks)
    report.attach(status)

    attached = EmailMessage(policy=policy)
    full = (ret or "").upper() == "FULL"
    if not headers.isascii():
        # RFC 6532 header fields: message/global(-headers) (RFC 6533 section 6).
        attached["Content-Type"] = "message/global" if full else "message/global-headers"
        attached["Content-Transfer-Encoding"] = "8bit"
        # Parsed with compat32: header values keep their exact bytes (as surrogate escapes).
        attached.set_payload([BytesParser(policy=email_policy.compat32).parsebytes(raw if full else headers)])
    elif full:
        attached.set_content(BytesParser(policy=email_policy.compat32).parsebytes(raw), cte=_text_cte(raw))
    else:
        attached.set_content(headers.decode("ascii"), subtype="rfc822-headers", cte="7bit")
    attached["Content-Description"] = "Undelivered Message" if full else "Undelivered Message Headers"
    report.attach(attached)
    for part in (human, attached):
        del part["MIME-Version"]        # set_content adds it; only the top level needs it
    return report


def _human_text(recipients: Sequence[ReportRecipient], helo_name: str, delayed: bool,
                parsed: Message) -> str:
    """The first part of the report, for people (after Postfix's bounce templates)."""
    subject = printable(str(parsed.get("Subject") or "")) or None
    lines = [f"This is the mail system at host {helo_name}.", ""]
    if delayed:
        lines += ["####################################################################",
                  "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                  "####################################################################", "",
                  "Your message could not be delivered yet to the recipients below.",
                  "It will be retried until it is delivered or it expires.", ""]
    else:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", ""]
    if subject:
        lines += [f"Subject: {subject}", ""]
    for r in recipients:
        why = r.diagnostic or r.status
        host = f" (host {r.remote_mta} said: {why})" if r.remote_mta and r.remote else f": {why}"
        lines.append(f"<{r.address}>{host}")
    return "\n".join(lines) + "\n"


def message_from_meta(job_id: str, meta: Mapping[str, str], content: bytes,
                      max_lifetime: float | None = None) -> dict:
    """The ``message`` mapping of ``send_reports`` from the store's job hash (``mxq.tasks.store``).

    ``expires`` (reported as Will-Retry-Until in delay notices) is the
    submission time plus ``max_lifetime`` (default: ``MXQ_MAX_LIFETIME``).
    """
    created = float(meta["created"]) if meta.get("created") else None
    if max_lifetime is None:
        from mxq.tasks.settings import PipelineSettings
        max_lifetime = PipelineSettings.from_env().max_lifetime
    return {"job": job_id, "sender": meta.get("sender") or "", "content": content,
            "ret": meta.get("ret") or None, "envid": meta.get("envid") or None,
            "arrival": created, "expires": created + max_lifetime if created is not None else None}


def send_reports(message: Mapping, records: Iterable[Mapping], *, action: str = "failed",
                 submit: Callable[..., str] | None = None, helo_name: str | None = None) -> str | None:
    """Build and submit one report for the recipients of ``message`` that ask for it.

    See the module docstring for the shape of ``message`` and ``records``.
    Returns the report's job id, or None when no recipient wanted a report (or
    the message had the null sender).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    sender = message.get("sender") or ""
    chosen = [r for r in records if wants_report(sender, r.get("notify"), action)]
    if not chosen:
        return None
    if helo_name is None:
        from mxq.workers.config import Settings
        helo_name = Settings.from_env().helo_name
    recipients = [ReportRecipient.from_record(r, action=action, will_retry_until=message.get("expires"))
                  for r in chosen]
    report = build_report(sender=sender, recipients=recipients, original=message["content"],
                          helo_name=helo_name, ret=message.get("ret"), envid=message.get("envid"),
                          arrival=message.get("arrival"))
    if submit is None:
        from mxq.tasks import submit as submit    # the core's producer API; imported late (no cycle)
    return submit(report.as_bytes(), sender="", recipients=[sender])

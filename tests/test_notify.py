"""Non-delivery reports and delay notices (tasks/notify.py, RFC 3464).

The unit tests build reports with the pure ``build_report`` / ``send_reports``
(``submit`` replaced by a recorder: pure logic, no Redis).  The integration
test at the end runs the real pipeline (Redis, a Celery worker, the sandbox
DNS server and an aiosmtpd sink) and checks the report the sender receives.
"""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone

import pytest

from mxq.tasks.notify import ReportRecipient, build_report, send_reports, wants_report

ORIGINAL = (b"From: Alice <alice@origin.test>\r\n"
            b"To: bob@dead.test\r\n"
            b"Subject: quarterly numbers\r\n"
            b"Message-ID: <m1@origin.test>\r\n"
            b"\r\n"
            b"The body line that only RET=FULL returns.\r\n")

BOUNCED = {"address": "bob@dead.test", "domain": "dead.test", "state": "bounced", "code": 550,
           "enhanced": "5.1.1", "text": "no such user", "exchange": "mx1.dead.test",
           "ip": "127.0.0.2", "notify": None, "orcpt": None, "last_attempt": 1_700_000_100}
EXPIRED = {"address": "carol@dead.test", "domain": "dead.test", "state": "expired", "code": None,
           "enhanced": "4.4.1", "text": "Connection refused", "exchange": None,
           "notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;Carol@Dead.test"}


def parse(report) -> email.message.EmailMessage:
    """Serialise as it goes on the wire and parse back, as a receiving MUA would."""
    raw = report if isinstance(report, bytes) else report.as_bytes()
    return email.message_from_bytes(raw, policy=email.policy.default)


def dsn_blocks(msg):
    """The message/delivery-status part's header blocks: [per-message, per-recipient...]."""
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    return [dict(b.items()) for b in parts[1].get_payload()]


def report(recipients, **kw):
    kw.setdefault("sender", "alice@origin.test")
    kw.setdefault("original", ORIGINAL)
    kw.setdefault("helo_name", "mta.mxq.test")
    return parse(build_report(recipients=recipients, **kw))


def test_report_is_multipart_report_with_all_fields():
    """Structure, headers and every per-message and per-recipient field of RFC 3464."""
    msg = report([ReportRecipient.from_record(BOUNCED), ReportRecipient.from_record(EXPIRED)],
                 envid="ENV-42", arrival=1_700_000_000)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mta.mxq.test"
    assert msg["To"] == "alice@origin.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<m1@origin.test>"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                     "text/rfc822-headers"]
    human = parts[0].get_content()
    assert "bob@dead.test" in human and "550 5.1.1 no such user" in human

    per_message, bob, carol = dsn_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mta.mxq.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == \
        datetime.fromtimestamp(1_700_000_000, tz=timezone.utc)

    assert bob["Final-Recipient"] == "rfc822;bob@dead.test"
    assert "Original-Recipient" not in bob
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.dead.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == 1_700_000_100
    assert "Will-Retry-Until" not in bob

    # Expired after soft failures mxq itself observed: 4.x.x status, a local diagnostic.
    assert carol["Final-Recipient"] == "rfc822;carol@dead.test"
    assert carol["Original-Recipient"] == "rfc822;Carol@Dead.test"
    assert carol["Action"] == "failed"
    assert carol["Status"] == "4.4.1"
    assert carol["Diagnostic-Code"].startswith("X-mxq;") and "Connection refused" in carol["Diagnostic-Code"]
    assert "Remote-MTA" not in carol


def test_ret_hdrs_and_default_return_headers_only():
    for ret in (None, "HDRS"):
        msg = report([ReportRecipient.from_record(BOUNCED)], ret=ret)
        last = list(msg.iter_parts())[2]
        assert last.get_content_type() == "text/rfc822-headers"
        text = last.get_content()
        assert "Subject: quarterly numbers" in text
        assert "only RET=FULL returns" not in text
        assert "Original-Envelope-Id" not in dsn_blocks(msg)[0]   # no ENVID given


def test_ret_full_returns_the_whole_message():
    msg = report([ReportRecipient.from_record(BOUNCED)], ret="FULL")
    last = list(msg.iter_parts())[2]
    assert last.get_content_type() == "message/rfc822"
    inner = last.get_content()
    assert inner["Subject"] == "quarterly numbers"
    assert "only RET=FULL returns" in inner.get_content()


def test_delay_notice_fields():
    rec = dict(EXPIRED, state="deferred", enhanced="4.7.1", code=451, text="greylisted",
               exchange="mx1.grey.test", address="dan@grey.test")
    r = ReportRecipient.from_record(rec, action="delayed", will_retry_until=1_700_432_000)
    msg = report([r])
    assert "Delayed Mail" in msg["Subject"]
    _, block = dsn_blocks(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert block["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == 1_700_432_000
    assert "WARNING ONLY" in list(msg.iter_parts())[0].get_content()


def test_non_ascii_original_headers_are_returned_as_message_global():
    """RFC 6533 section 6: UTF-8 header fields come back as message/global-headers (or message/global)."""
    original = "From: jörg@origin.test\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
    for ret, ctype in ((None, "message/global-headers"), ("FULL", "message/global")):
        built = build_report(sender="alice@origin.test", recipients=[ReportRecipient.from_record(BOUNCED)],
                             original=original, helo_name="mta.mxq.test", ret=ret)
        raw = built.as_bytes()
        assert "Subject: grüße".encode() in raw                 # the original bytes, unencoded
        assert (b"body" in raw.split(b"Undelivered Message")[-1]) == (ret == "FULL")
        last = list(parse(raw).iter_parts())[2]
        assert last.get_content_type() == ctype
        assert last["Content-Transfer-Encoding"] == "8bit"
        # Addresses are ASCII: the delivery-status part stays the RFC 3464 one.
        assert parse(raw).get_param("report-type") == "delivery-status"


def test_internationalised_addresses_give_a_global_delivery_status():
    """RFC 6533: a UTF-8 address is reported as utf-8;addr in message/global-delivery-status."""
    rec = dict(BOUNCED, address="jörg@dead.test")
    built = build_report(sender="ånna@origin.test", recipients=[ReportRecipient.from_record(rec)],
                         original=ORIGINAL, helo_name="mta.mxq.test")
    raw = built.as_bytes()
    assert bytes(built) == raw
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    assert msg["To"] == "ånna@origin.test"                      # SMTPUTF8 header, not encoded
    status = list(msg.iter_parts())[1]
    assert status.get_content_type() == "message/global-delivery-status"
    section = raw.split(b"message/global-delivery-status", 1)[1].split(b"\r\n--", 1)[0].decode()
    assert "Reporting-MTA: dns; mta.mxq.test" in section
    assert "Final-Recipient: utf-8;jörg@dead.test" in section
    assert "Status: 5.1.1" in section
    # the blocks are separated by an empty line, as in RFC 3464
    assert "\r\n\r\nFinal-Recipient:" in section


def test_wants_report_policy():
    assert wants_report("a@b.test", None, "failed")            # default: failures
    assert not wants_report("a@b.test", None, "delayed")       # default: no delay notices
    assert not wants_report("", None, "failed")                # null sender: never
    assert not wants_report("<>", ["FAILURE"], "failed")
    assert not wants_report("a@b.test", ["NEVER"], "failed")
    assert not wants_report("a@b.test", ["SUCCESS"], "failed")
    assert wants_report("a@b.test", ["SUCCESS", "FAILURE"], "failed")
    assert wants_report("a@b.test", ["DELAY"], "delayed")
    assert not wants_report("a@b.test", ["FAILURE"], "delayed")
    with pytest.raises(ValueError):
        wants_report("a@b.test", None, "relayed")


class Recorder:
    """Stands in for ``mxq.tasks.submit`` in pure-logic tests: records what would be submitted."""

    def __init__(self):
        self.calls = []

    def __call__(self, content, **kw):
        self.calls.append((content, kw))
        return f"job-{len(self.calls)}"


MESSAGE = {"job": "j1", "sender": "alice@origin.test", "content": ORIGINAL, "ret": None,
           "envid": None, "arrival": 1_700_000_000, "expires": 1_700_432_000}


def test_send_reports_groups_recipients_and_uses_null_sender():
    rec = Recorder()
    job = send_reports(MESSAGE, [BOUNCED, EXPIRED], action="failed", submit=rec, helo_name="mta.mxq.test")
    assert job == "job-1"
    assert len(rec.calls) == 1                                  # one report for both recipients
    content, kw = rec.calls[0]
    assert kw == {"sender": "", "recipients": ["alice@origin.test"]}
    msg = parse(content)
    assert [b["Final-Recipient"] for b in dsn_blocks(msg)[1:]] == ["rfc822;bob@dead.test",
                                                                   "rfc822;carol@dead.test"]


def test_send_reports_suppressed():
    rec = Recorder()
    # Null sender: never, whatever NOTIFY says.
    assert send_reports(dict(MESSAGE, sender=""), [dict(BOUNCED, notify=["FAILURE"])],
                        submit=rec, helo_name="h.test") is None
    # NOTIFY=NEVER and NOTIFY=SUCCESS ask for no failure report.
    assert send_reports(MESSAGE, [dict(BOUNCED, notify=["NEVER"]), dict(EXPIRED, notify=["SUCCESS"])],
                        submit=rec, helo_name="h.test") is None
    # Default NOTIFY gets no delay notice.
    assert send_reports(MESSAGE, [dict(BOUNCED, state="deferred")], action="delayed",
                        submit=rec, helo_name="h.test") is None
    assert rec.calls == []
    # Only the recipients that asked are reported.
    send_reports(MESSAGE, [dict(BOUNCED, notify=["NEVER"]), EXPIRED], submit=rec, helo_name="h.test")
    assert [b["Final-Recipient"] for b in dsn_blocks(parse(rec.calls[0][0]))[1:]] == ["rfc822;carol@dead.test"]


def test_send_reports_delay_notice():
    rec = Recorder()
    deferred = dict(EXPIRED, state="deferred", enhanced="4.7.1", code=451, text="try later")
    send_reports(MESSAGE, [deferred], action="delayed", submit=rec, helo_name="h.test")
    _, block = dsn_blocks(parse(rec.calls[0][0]))
    assert block["Action"] == "delayed"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == MESSAGE["expires"]


def test_build_report_refuses_null_sender_and_empty():
    with pytest.raises(ValueError):
        build_report(sender="", recipients=[ReportRecipient("a@b.test")], original=ORIGINAL, helo_name="h")
    with pytest.raises(ValueError):
        build_report(sender="a@b.test", recipients=[], original=ORIGINAL, helo_name="h")


def test_message_from_meta_maps_the_store_hash():
    from mxq.tasks.notify import message_from_meta
    meta = {"sender": "alice@origin.test", "ret": "FULL", "envid": "E1", "created": "1700000000.5", "n": "2"}
    m = message_from_meta("j9", meta, ORIGINAL, max_lifetime=3600)
    assert m == {"job": "j9", "sender": "alice@origin.test", "content": ORIGINAL, "ret": "FULL",
                 "envid": "E1", "arrival": 1_700_000_000.5, "expires": 1_700_003_600.5}
    m = message_from_meta("j9", {"sender": "", "ret": "", "envid": "", "created": "1"}, b"x", max_lifetime=1)
    assert m["sender"] == "" and m["ret"] is None and m["envid"] is None


# ---------------------------------------------------------------- through the real pipeline
# Real redis-server, celery worker and beat (tests/pipeline_fixtures.py), the session's DNS
# server process and an aiosmtpd sink for the senders' domain on 127.0.44.20:25.
from tests.fixtures_infra import wait_until  # noqa: E402
from mxq.workers.envelope import DSN  # noqa: E402

pytest_plugins = ["tests.pipeline_fixtures"]

NIP = "127.0.44."


@pytest.fixture(scope="module")
def sender_sink(dns_server):
    """The senders' domain src.notify.test (a real SMTP server) and a dead domain (nothing listens)."""
    from mxq.sandbox.smtpd import Behaviour, start_server
    dns_server.add({
        "src.notify.test": {"MX": [[10, "mx.src.notify.test"]]},
        "mx.src.notify.test": {"A": [NIP + "20"]},
        "dead.notify.test": {"MX": [[10, "mx.dead.notify.test"]]},
        "mx.dead.notify.test": {"A": [NIP + "9"]},          # connection refused: always deferred
    })
    server = start_server(NIP + "20", 25, Behaviour(hostname="mx.src.notify.test"))
    yield server
    server.stop()


def test_expired_recipient_reports_to_sender_through_the_pipeline(pipeline, sender_sink):
    """A dead domain expires (MXQ_MAX_LIFETIME=3); the sender gets a delay notice, then the NDR."""
    from mxq import tasks

    sender_sink.clear()
    p = pipeline(MXQ_MAX_LIFETIME="3", MXQ_RETRY_SCHEDULE="1", MXQ_CONNECT_TIMEOUT="1")
    p.worker()
    p.beat()
    job = tasks.submit(ORIGINAL, sender="alice@src.notify.test", recipients=["bob@dead.notify.test"],
                       dsn=DSN(envid="ENV-N1", ret="FULL"), notify=["FAILURE", "DELAY"])

    def two_reports():
        got = [m for m in sender_sink.messages if m.mail_from == ""]
        return got if len(got) >= 2 else None
    reports = wait_until(two_reports, 40, "a delay notice and a non-delivery report at src.notify.test",
                         interval=0.1)
    assert tasks.status(job)["recipients"][0]["state"] == "expired"
    by_action = {}
    for m in reports:
        assert m.rcpt_tos == ["alice@src.notify.test"]        # to the envelope sender, from <>
        msg = m.email()
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "delivery-status"
        assert msg["Auto-Submitted"] == "auto-replied"
        per_message, block = dsn_blocks(msg)
        assert per_message["Original-Envelope-Id"] == "ENV-N1"
        assert per_message["Reporting-MTA"] == f"dns; {p.env['MXQ_HELO_NAME']}"   # the worker's HELO name
        assert block["Final-Recipient"] == "rfc822;bob@dead.notify.test"
        assert block["Original-Recipient"] == "rfc822;bob@dead.notify.test"
        by_action[block["Action"]] = (msg, block)
    assert set(by_action) == {"delayed", "failed"}
    failed_msg, failed = by_action["failed"]
    assert failed["Status"].startswith("4.")                 # expired after soft failures
    assert "Will-Retry-Until" in by_action["delayed"][1]
    returned = list(failed_msg.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"   # RET=FULL
    assert "only RET=FULL returns" in returned.get_content().get_content()
    # Exactly two: the reports themselves (null sender) never cause further reports.
    assert len([m for m in sender_sink.messages if m.mail_from == ""]) == 2


def test_null_sender_gets_no_report_through_the_pipeline(pipeline, sender_sink):
    """A message with the null sender expires silently: nothing reaches any sender."""
    from mxq import tasks

    sender_sink.clear()
    p = pipeline(MXQ_MAX_LIFETIME="2", MXQ_RETRY_SCHEDULE="1", MXQ_CONNECT_TIMEOUT="1")
    p.worker()
    p.beat()
    silent = tasks.submit(ORIGINAL, sender="", recipients=["carl@dead.notify.test"])
    # A control message with a real sender expires at the same time and IS reported, so
    # waiting for its report bounds the wait for the (absent) other one.
    control = tasks.submit(ORIGINAL, sender="alice@src.notify.test", recipients=["dora@dead.notify.test"])
    wait_until(lambda: [m for m in sender_sink.messages if m.mail_from == ""], 30, "the control report")
    wait_until(lambda: all(tasks.status(j)["state"] == "done" for j in (silent, control)), 10,
               "both jobs done")
    assert tasks.status(silent)["recipients"][0]["state"] == "expired"
    reports = [m for m in sender_sink.messages if m.mail_from == ""]
    assert len(reports) == 1
    _, block = dsn_blocks(reports[0].email())
    assert block["Final-Recipient"] == "rfc822;dora@dead.notify.test"

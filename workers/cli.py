"""``mxq deliver``: deliver one message now, synchronously, through the engine (no queue, no Redis).

::

    mxq deliver [--from ADDR] [--to ADDR ...] [--notify LIST] [--ret FULL|HDRS] [--envid ID]
                [--json] [-v] [--trace] [--progress] FILE.eml|-

The command is a click command (``deliver_command``) that ``mxq``'s group
(``mxq.tasks.cli``) adds; ``envelope_options`` is shared with ``mxq send``.

The envelope defaults come from the headers (``mxq.workers.message.prepare``:
From/Sender, To/Cc/Bcc; Bcc is removed from what is sent).  Settings come
from the ``MXQ_*`` environment (``Settings.from_env()``), including the
relay.  The result is a table (one row per recipient), or with ``--json``
``{"recipients": [RecipientResult.to_dict(), ...]}``.  ``-v`` also prints
the Postfix-style delivery log on standard error; ``--trace`` prints every
SMTP conversation on standard error as swaks does (``->``/``<-`` lines,
``~>``/``<~`` inside TLS, AUTH payloads masked, message text as its size:
``mxq.workers.trace.ConversationTrace``); ``--progress`` draws a progress
bar on standard error while a message's text is sent.

Exit status (sysexits): 0 every recipient delivered; 75 (EX_TEMPFAIL)
something deferred and nothing bounced; 69 (EX_UNAVAILABLE) something
bounced; 65 (EX_DATAERR) bad input -- a malformed message or address, the
reason on standard error and nothing sent; 66 (EX_NOINPUT) the file cannot
be found; 64 (EX_USAGE) bad usage; 78 (EX_CONFIG) a bad ``MXQ_*`` setting.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from typing import Iterable

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78


def exit_status(states: Iterable) -> int:
    """The sysexits status for a set of recipient states (``State`` or their string values).

    69 when anything bounced (or expired), else 75 when anything is not
    delivered yet (deferred, queued) or there is nothing at all, else 0.
    Shared by ``mxq deliver`` and the pipeline's commands.
    """
    values = [getattr(s, "value", s) for s in states]
    if any(v in ("bounced", "expired") for v in values):
        return EX_UNAVAILABLE
    if not values or any(v != "delivered" for v in values):
        return EX_TEMPFAIL
    return EX_OK


def envelope_options(f):
    """The message and envelope options shared by ``mxq deliver`` and ``mxq send`` (a click decorator).

    The command receives ``file``, ``sender``, ``recipients`` (a list), ``notify``, ``ret``, ``envid``.
    """
    import click

    for decorate in reversed((
        click.argument("file", metavar="FILE.eml|-"),
        click.option("--from", "sender", metavar="ADDR",
                     help="Envelope sender (MAIL FROM); '' or '<>' for the null sender."),
        click.option("--to", "recipients", multiple=True, metavar="ADDR",
                     help="Envelope recipient (repeat, or comma-separate); replaces To/Cc/Bcc."),
        click.option("--notify", metavar="LIST",
                     help="DSN NOTIFY for every recipient: NEVER, or a comma list of SUCCESS,FAILURE,DELAY."),
        click.option("--ret", type=click.Choice(["FULL", "HDRS"], case_sensitive=False),
                     help="DSN RET: return the full message or only its headers in a report."),
        click.option("--envid", metavar="ID", help="DSN ENVID, echoed in reports."),
    )):
        f = decorate(f)
    return f


def _deliver_command():
    import argparse

    import click

    @click.command("deliver", short_help="deliver a message now, without the queue", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @envelope_options
    @click.option("--json", "json", is_flag=True, help='Print {"recipients": [...]} as JSON.')
    @click.option("-v", "--verbose", is_flag=True, help="Print the delivery log on standard error.")
    @click.option("--trace", is_flag=True,
                  help="Print the SMTP conversation on standard error (like swaks; AUTH payloads masked).")
    @click.option("--progress", is_flag=True,
                  help="Show a progress bar on standard error while the message text is sent.")
    def deliver(**kw):
        """Deliver a message (an .eml file, or - for standard input) now, without the queue.

        MX lookup, delivery across the exchanges (and the relay per MXQ_RELAY_MODE), a result per
        recipient.  Envelope defaults come from the headers (From/Sender; To, Cc, Bcc).  Exit 0 all
        delivered, 75 deferred, 69 bounced, 65 bad input, 78 bad configuration.
        """
        kw["ret"] = kw["ret"].upper() if kw.get("ret") else None
        kw["recipients"] = list(kw["recipients"]) or None
        return run(argparse.Namespace(**kw))
    return deliver


def split_recipients(values) -> list[str] | None:
    """``--to`` values (repeated and/or comma-separated) as one list; None when none were given."""
    if not values:
        return None
    return [a.strip() for v in values for a in v.split(",") if a.strip()]


def run(args) -> int:
    """Run ``mxq deliver`` with parsed ``args``; return the exit status."""
    from .config import Settings
    from .delivery import deliver
    from .envelope import DSN, parse_notify
    from .errors import InvalidInput
    from .message import max_message_size_from_env, prepare

    err = sys.stderr
    try:
        settings = Settings.from_env()
        max_size = max_message_size_from_env()
    except ValueError as e:
        print(f"mxq deliver: configuration error: {e}", file=err)
        return EX_CONFIG

    if args.file == "-":
        content: object = sys.stdin.buffer.read()
    else:
        path = pathlib.Path(args.file)
        if not path.is_file():
            print(f"mxq deliver: {args.file}: no such file", file=err)
            return EX_NOINPUT
        content = path
    try:
        dsn = DSN(ret=args.ret, envid=args.envid) if (args.ret or args.envid) else None
        envelope = prepare(content, sender=args.sender, recipients=split_recipients(args.recipients),
                           dsn=dsn, notify=parse_notify(args.notify), max_size=max_size)
    except InvalidInput as e:
        print(f"mxq deliver: invalid input: {e.reason}", file=err)
        return EX_DATAERR
    except ValueError as e:    # DSN options
        print(f"mxq deliver: invalid input: {e}", file=err)
        return EX_DATAERR

    if args.verbose:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("mxq: %(message)s"))
        logger = logging.getLogger("mxq.delivery")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    try:
        from .trace import ConversationTrace, ProgressBar
        observers = ([ConversationTrace(err)] if getattr(args, "trace", False) else []) \
            + ([ProgressBar(err)] if getattr(args, "progress", False) else [])
        results = deliver(envelope, settings=settings, observers=observers)
    except InvalidInput as e:
        print(f"mxq deliver: invalid input: {e.reason}", file=err)
        return EX_DATAERR

    if args.json:
        sys.stdout.write(json.dumps({"recipients": [r.to_dict() for r in results]}, ensure_ascii=False) + "\n")
    else:
        print_table(results, sys.stdout)
    return exit_status(r.state for r in results)


deliver_command = _deliver_command()


def print_table(results, out) -> None:
    """One row per recipient, in the ``mxq`` table style (``mxq.tables``, as ``mxq status``)."""
    from mxq.tables import print_recipients
    print_recipients([r.to_dict() for r in results], out)

"""The one table style of the ``mxq`` command (``deliver``, ``status``, ``queue``, ``suppress list``).

A header row in capitals, columns two spaces apart, text left-aligned and
numbers right-aligned, the last column free text (never padded); on a
terminal a line longer than the screen is cut with ``…``.  Scripts read the
``--json`` forms; the tables are for people (``awk '{print $2}'`` still finds
a recipient's state).  Every cell is made printable (a remote server's
reply may carry escape sequences; ``mxq.workers.reply.printable``).  Imports
only the engine's reply module, so the engine's ``mxq deliver`` uses it too.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Mapping, Sequence

from mxq.workers.reply import printable

#: The columns of a recipient table, for ``mxq deliver`` and ``mxq status`` alike.
RECIPIENT_HEADER = ("RECIPIENT", "STATE", "DSN", "TRIES", "DETAIL")


def _cell(value) -> str:
    if value is None:
        return ""
    return " ".join(printable(value).split()) if isinstance(value, str) else printable(str(value))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _width(out) -> int | None:
    try:
        if out.isatty():
            return os.get_terminal_size(out.fileno()).columns
    except (AttributeError, OSError, ValueError):
        pass
    return None


def render(header: Sequence[str], rows: Iterable[Sequence], *, width: int | None = None) -> list[str]:
    """The table's lines (without newlines); ``width``: cut longer lines with ``…``."""
    body = [list(r) for r in rows]
    cells = [[h.upper() for h in header]] + [[_cell(v) for v in r] for r in body]
    numeric = [bool(body) and all(_is_number(r[i]) or r[i] in (None, "") for r in body) and
               any(_is_number(r[i]) for r in body) for i in range(len(header))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    lines = []
    for r in cells:
        parts = [(c.rjust(w) if numeric[i] else c.ljust(w)) for i, (c, w) in enumerate(zip(r[:-1], widths))]
        line = "  ".join(parts + [r[-1]]).rstrip()
        if width and len(line) > width:
            line = line[:max(width - 1, 0)] + "…"
        lines.append(line)
    return lines


def print_table(header: Sequence[str], rows: Iterable[Sequence], out=None) -> None:
    """Print ``rows`` under ``header`` in the one style (see the module docstring)."""
    out = out or sys.stdout
    for line in render(header, rows, width=_width(out)):
        out.write(line + "\n")
    out.flush()


def detail(r: Mapping) -> str:
    """A recipient's last reply and where it came from: ``550 5.1.1 text [mx.example 192.0.2.1; relay]``."""
    reply = " ".join(str(x) for x in (r.get("code"), r.get("enhanced")) if x)
    text = " ".join(printable(str(r.get("text") or "")).split())
    where = ""
    if r.get("exchange"):
        where = f" [{r['exchange']}" + (f" {r['ip']}" if r.get("ip") else "") + ("; relay" if r.get("relay") else "") + "]"
    return (f"{reply} {text}".strip() + where).strip()


def recipient_rows(records: Iterable[Mapping]) -> list[tuple]:
    """Rows of ``RECIPIENT_HEADER`` for recipient records (``mxq status``'s, or
    ``RecipientResult.to_dict()`` of ``mxq deliver``)."""
    return [(r.get("address", ""), r.get("state", ""), r.get("enhanced") or "", r.get("attempts") or None, detail(r))
            for r in records]


def print_recipients(records: Iterable[Mapping], out=None) -> None:
    """The recipient table of ``mxq deliver`` and ``mxq status``."""
    print_table(RECIPIENT_HEADER, recipient_rows(records), out)

"""Work items: what a lane's ready list, the deferred queue, the held set and a batch hold.

- a delivery lane's item is ``{job}|{domain}|{indexes}``: the recipients
  (record indexes, a comma list, at most ``ITEM_RCPTS``) of one job in one
  domain, delivered together over one connection;
- the report lane's (``!r``) is ``!r|{job}|{index}|{event}``, one report to
  send (event ``bounced``, ``expired`` or ``delayed``);
- the webhook lane's (``!w``) is ``!w|{id}``, the event in ``mxq:hook:{id}``.

The store's scripts build and read them in Lua (its prelude's
``work_items``, ``lane_of``); Python reads them with these functions only.
"""

from __future__ import annotations

REPORT_LANE = "!r"
WEBHOOK_LANE = "!w"


def is_delivery(wid: str) -> bool:
    """Whether ``wid`` is a delivery lane's item (not a report's or a webhook event's)."""
    return not wid.startswith("!")


def lane_of(wid: str) -> str:
    """The item's lane (as the scripts' ``lane_of``)."""
    if wid.startswith("!"):
        return wid[:2]
    return wid.split("|", 2)[1]


def job_of(wid: str) -> str:
    """A delivery item's job id."""
    return wid.split("|", 1)[0]


def delivery(wid: str) -> tuple[str, str, list[str]]:
    """A delivery item's ``(job, domain, record indexes)``."""
    job, domain, idx = wid.split("|", 2)
    return job, domain, idx.split(",")


def recipients(wid: str) -> int:
    """How many recipients a delivery item names."""
    return wid.rsplit("|", 1)[-1].count(",") + 1


def report(wid: str) -> tuple[str, int, str]:
    """A report item's ``(job, record index, event)``."""
    _, job, idx, event = wid.split("|", 3)
    return job, int(idx), event


def webhook_event(wid: str) -> str:
    """A webhook item's event id (its body is in ``keys.HOOK_PREFIX + id``)."""
    return wid[len(WEBHOOK_LANE) + 1:]

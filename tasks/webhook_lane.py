"""The webhook lane: the ``mxq.webhook`` task POSTs the events waiting on it (``mxq.tasks.webhooks``).

A task claims up to ``BATCH`` events of the lane ``!w`` under a lease, takes
one of ``MXQ_WEBHOOK_CONCURRENCY`` sender slots, POSTs them in order, deletes
the delivered ones and puts the rest back due later (the endpoint's
configuration, the events' form and the signing are in ``mxq.tasks.webhooks``).
"""

from __future__ import annotations

import json
import logging
import uuid

from .app import app
from .dispatch import publish
from .heartbeat import Heartbeat
from .settings import PipelineSettings
from .store import TRANSIENT_REDIS_ERRORS, Outcome, get_store, keys
from .store import items as workitems
from .store.lanes import WebhookSlots
from .webhooks import (BATCH, HOOK_PREFIX, WEBHOOK_LANE, PostResult, WebhookConfig, current, post,
                       redact)

log = logging.getLogger("mxq.webhooks")

SENDERS_KEY = keys.WEBHOOK_SENDERS
DOWN_KEY = keys.WEBHOOK_DOWN
NO_SLOT_DELAY = 1.0                 #: seconds before events a task could not send come back


def run_webhooks() -> int:
    """Claim webhook events, POST them, delete the delivered ones, defer the rest; return how many were sent."""
    cfg = current(strict=False)
    store = get_store(PipelineSettings.from_env())
    r = store.r
    token = uuid.uuid4().hex
    wids = store.claim(WEBHOOK_LANE, token, limit=BATCH)
    if not wids:
        return 0
    lease = store.settings.lease_seconds
    slots = WebhookSlots(r)

    def take_slot() -> bool:
        now = store.now()
        return slots.take(token, now=now, expiry=now + lease, limit=cfg.concurrency)

    sent = 0
    outcomes: list[Outcome] = []
    with Heartbeat(store, token, also=take_slot):
        now = store.now()
        down_ms = r.pttl(DOWN_KEY)
        if down_ms and down_ms > 0:             # another sender found the endpoint unreachable
            outcomes = [Outcome(w, due=now + down_ms / 1000.0) for w in wids]
        elif not take_slot():                   # enough senders at work: put the events back
            outcomes = [Outcome(w, due=now + NO_SLOT_DELAY) for w in wids]
        else:
            try:
                sent = _send(cfg, store, wids, outcomes)
            finally:
                r.zrem(SENDERS_KEY, token)
                done = {o.wid for o in outcomes}
                outcomes += [Outcome(w, due=store.now()) for w in wids if w not in done]    # interrupted
        _, dispatch = store.release(token, WEBHOOK_LANE, outcomes)
    publish(dispatch)
    return sent


def _send(cfg: WebhookConfig, store, wids: list[str], outcomes: list[Outcome]) -> int:
    """POST the claimed events in order, appending one ``Outcome`` per event; return how many were sent."""
    r = store.r
    pipe = r.pipeline(transaction=False)
    for wid in wids:
        pipe.hmget(HOOK_PREFIX + workitems.webhook_event(wid), "b", "n")
    stored = pipe.execute()
    sent = 0
    unreachable_until = None        # the endpoint did not answer: defer the rest untried
    for wid, (body, _) in zip(wids, stored):
        hid = workitems.webhook_event(wid)
        key = HOOK_PREFIX + hid
        if body is None:
            log.warning("webhook event %s is gone (older than its key's lifetime)", hid)
            outcomes.append(Outcome(wid))
            continue
        if unreachable_until is not None:
            outcomes.append(Outcome(wid, due=unreachable_until))
            continue
        if not cfg.enabled:
            result = PostResult(False, False, "MXQ_WEBHOOK_URL is not set (or invalid) on this worker")
        else:
            result = post(cfg, hid, body)
        now = store.now()
        if result.ok:
            r.delete(key)
            outcomes.append(Outcome(wid))
            sent += 1
            continue
        try:
            happened = float(json.loads(body).get("timestamp") or now)
        except (ValueError, AttributeError):
            happened = now
        if now - happened > cfg.max_age:
            log.warning("webhook event %s dropped after %.0f s of failures (last: %s)", hid,
                        now - happened, result.detail)
            r.delete(key)
            outcomes.append(Outcome(wid))
            continue
        n = r.hincrby(key, "n", 1)
        due = now + cfg.backoff(n)
        log.info("webhook event %s to %s failed (%s); try %d again in %.0f s", hid, redact(cfg.url),
                 result.detail, n + 1, due - now)
        outcomes.append(Outcome(wid, due=due))
        if not result.reachable:
            unreachable_until = due
            if cfg.enabled:         # a worker without the URL must not hold the others off
                r.set(DOWN_KEY, result.detail[:200], px=max(1, int((due - now) * 1000)))
    return sent


# Published by mxq.tasks.dispatch.publish (routed to the notifications queue by mxq.tasks.app).
@app.task(name="mxq.webhook", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          autoretry_for=TRANSIENT_REDIS_ERRORS, max_retries=3, retry_backoff=1, retry_backoff_max=8,
          retry_jitter=True)
def deliver_events() -> int:
    """POST the webhook events waiting on the webhook lane (``mxq.tasks.webhooks``)."""
    return run_webhooks()

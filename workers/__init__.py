"""mxq's delivery engine: SMTP session, MX resolution, delivery across exchanges and relay.

This package never imports Celery: it is a plain library that ``tasks`` (the
queue manager) drives, and that applications may use on their own.

Module map (each concern in its own file, after Postfix's smtp(8)):

- ``reply``     -- the SMTP reply type (code, enhanced status code, text).
- ``errors``    -- the exception hierarchy and the one place failures are
                   classified by scope (site, message, recipient) and soft/hard.
- ``timeouts``  -- per-phase timeouts as one settings structure.
- ``address``   -- address parsing and validation (IDNA, literals, SMTPUTF8).
- ``config``    -- ``Settings`` read from ``MXQ_*`` environment variables.
- ``session``   -- the SMTP session (connect, authenticate, staged transaction,
                   ``command``/``write``; bounded: a deadline per phase, replies capped).
- ``events``    -- what a session tells its observers (commands, replies, progress,
                   timeouts, TLS); ``trace`` -- a swaks-like trace and a progress bar.
- ``mx``        -- MX resolution with a TTL cache (in-process, optional Redis).
- ``destinations`` -- which addresses may be connected to (public only by default).
- ``sources``   -- which local address (and EHLO name) a connection comes from, in pools.
- ``delivery``  -- delivery of messages to one domain across its exchanges and relay.
- ``results``   -- per-recipient outcome records.
"""

__version__ = "0.1.0"

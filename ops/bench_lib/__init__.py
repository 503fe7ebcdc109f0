"""mxq's benchmark harness (issues 5, 8): mxq against django-celery-email, Postfix and the loopback limit.

Besides the throughput stages it runs mxq at a steady 100 messages a second
(latency when not saturated) and with a 100,000-message backlog (Redis memory
per content byte, worker RSS while draining), then against slow exchanges,
dead exchanges and with a thousand deliveries in flight (issue 8,
``exchanges``), and judges every target (``report.TARGETS``): value, limit and
verdict in the table and JSON.

Run it with ``ops/bench`` (see ``ops/bench --help`` and the README's Benchmark
section).  ``ops/`` is not an installed package: ``ops/bench`` puts ``ops/`` on
``PYTHONPATH`` and runs ``python -m bench_lib``.

Modules: ``messages`` (the N test messages), ``sandbox`` (network namespace,
DNS, smtp-sink farm, the sink monitor, Redis, process helpers), ``postfix``
(a throw-away Postfix instance), ``djapp`` (the Django + Celery app of the
django-celery-email baseline), ``stages`` (one function per contender),
``exchanges`` (the slow, dead and inflight stages),
``report`` (table, JSON layout, targets), ``cli`` (argument parsing and orchestration).
"""

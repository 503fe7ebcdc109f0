"""mxq's benchmark harness (issue 5): mxq against django-celery-email, Postfix and the loopback limit.

Run it with ``ops/bench`` (see ``ops/bench --help`` and the README's Benchmark
section).  ``ops/`` is not an installed package: ``ops/bench`` puts ``ops/`` on
``PYTHONPATH`` and runs ``python -m bench_lib``.

Modules: ``messages`` (the N test messages), ``sandbox`` (network namespace,
DNS, smtp-sink farm, the sink monitor, Redis, process helpers), ``postfix``
(a throw-away Postfix instance), ``djapp`` (the Django + Celery app of the
django-celery-email baseline), ``stages`` (one function per contender),
``report`` (table and JSON), ``cli`` (argument parsing and orchestration).
"""

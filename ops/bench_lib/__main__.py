"""``python -m bench_lib`` (ops/ on PYTHONPATH): the benchmark; ``ops/bench`` is the documented entry."""

import sys

from .cli import main

sys.exit(main())

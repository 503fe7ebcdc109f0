"""mxq: distributed mail delivery workers on Celery and Redis.

Everything mxq installs lives under this one package:

- ``mxq.workers``, the delivery engine (no Celery): SMTP session, MX
  resolution, delivery across exchanges and relay (folder ``workers/``);
- ``mxq.tasks``, the pipeline: Celery app, producer API (``mxq.tasks.submit``,
  ``mxq.tasks.status``), task graph and state in Redis (folder ``tasks/``);
- ``mxq.contrib.django`` and ``mxq.contrib.flask``, the framework
  integrations (folder ``tasks/contrib/``);
- ``mxq.sandbox``, the test and demo servers (DNS, scripted SMTP) behind
  ``mxq up --sandbox`` and the test suite; needs the ``sandbox`` extra
  (folder ``mxq/sandbox/``).

Importing ``mxq`` itself imports nothing else (no Celery, no Redis), so a web
process pays only for what it uses.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mxq")
except PackageNotFoundError:        # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]

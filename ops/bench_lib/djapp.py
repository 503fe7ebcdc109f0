"""The django-celery-email baseline: a minimal Django project and its Celery app, in one module.

Both the benchmark process (which calls Django's ``send_messages``) and the
baseline's workers (``celery -A bench_lib.djapp worker -c 2 --pool prefork``)
import this module.  It configures Django from the environment:

* ``BENCH_DJ_BROKER``: the Redis URL of the Celery broker;
* ``BENCH_DJ_SINK``: the host of the one SMTP server Django's SMTP backend
  hands every message to (port 25), as django-celery-email is deployed:
  it does no MX routing of its own;
* ``BENCH_DJ_CHUNK``: ``CELERY_EMAIL_CHUNK_SIZE`` (django-celery-email's
  default is 10 messages per task).

Everything else is the packages' defaults: ``djcelery_email.backends.CeleryEmailBackend``
as ``EMAIL_BACKEND``, Django's ``smtp.EmailBackend`` as ``CELERY_EMAIL_BACKEND``
(one connection per task, reused for the task's messages), JSON
serialisation, results ignored (django-celery-email's task config).
"""

from __future__ import annotations

import os

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="mxq-bench-not-secret",
        INSTALLED_APPS=["djcelery_email"],
        DATABASES={},
        USE_TZ=True,
        EMAIL_BACKEND="djcelery_email.backends.CeleryEmailBackend",
        CELERY_EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        CELERY_EMAIL_CHUNK_SIZE=int(os.environ.get("BENCH_DJ_CHUNK", "10")),
        EMAIL_HOST=os.environ.get("BENCH_DJ_SINK", "127.0.0.40"),
        EMAIL_PORT=25,
        EMAIL_TIMEOUT=30,
        DEFAULT_FROM_EMAIL="bench@sender.bench.test",
        LOGGING_CONFIG=None,
    )
    django.setup()

from celery import Celery  # noqa: E402  (Django must be configured before the task module loads)

app = Celery("djbench")
app.conf.update(
    broker_url=os.environ.get("BENCH_DJ_BROKER", "redis://127.0.0.1:6379/0"),
    task_ignore_result=True,
    worker_hijack_root_logger=True,
)
app.set_default()

import djcelery_email.tasks  # noqa: E402,F401  (registers djcelery_email_send_multiple on this app)


def send(email_messages) -> int:
    """Hand ``email_messages`` to Django's configured backend, as an application does; return tasks queued."""
    from django.core.mail import get_connection
    return len(get_connection().send_messages(email_messages))

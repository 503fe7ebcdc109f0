"""mxq's queue manager: the Celery app, the producer API and the task graph.

``celery -A mxq.tasks worker`` finds the Celery app as ``mxq.tasks.app`` (note: the
attribute is the app object; the module is ``mxq.tasks.app`` in ``sys.modules``,
so write ``from mxq.tasks.app import make_app`` for the module's other names).

Producer API::

    import mxq.tasks
    job = mxq.tasks.submit(message, sender=None, recipients=None, dsn=None, idempotency_key=None)
    jobs = mxq.tasks.submit_many([message_or_item, ...])     # all-or-nothing, one round trip
    mxq.tasks.status(job)     # {"job", "state", "recipients": [...]}; KeyError when unknown
    mxq.tasks.result(job).get(timeout=60)    # the same, from Celery's result backend, once final
    except mxq.tasks.Unavailable: ...         # Redis unreachable within MXQ_SUBMIT_TIMEOUT
    except mxq.tasks.InvalidMessage as e: e.reason            # every bad input, nothing stored

See ``mxq.tasks.store`` for the Redis key layout and ``mxq.tasks.graph`` for the task graph.
"""

from mxq.workers.errors import InvalidAddress

from .app import app
from .producer import InvalidMessage, Item, Unavailable, status, submit, submit_many

InvalidInput = InvalidMessage


def result(job_id: str):
    """The job's ``AsyncResult`` on mxq's Celery app: ``.get(timeout=...)`` returns the outcome
    (``mxq.tasks.status(job_id)`` of the finished job) once every recipient is final
    (``mxq.tasks.outcomes``)."""
    return app.AsyncResult(job_id)


__all__ = ["app", "submit", "submit_many", "status", "result", "Item", "InvalidMessage", "InvalidInput",
           "InvalidAddress", "Unavailable"]

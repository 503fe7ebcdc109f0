"""mxq's queue manager: the Celery app, producer API and task graph (issue 3 fills this in)."""

"""``tracking``: a Django signal per recipient event (django-anymail's ``tracking`` for mxq).

Sent by the view in ``mxq.contrib.django.views`` for each signed webhook event mxq's workers
POST (``MXQ_WEBHOOK_URL`` pointing at ``path("mxq/", include("mxq.contrib.django.urls"))``)::

    from django.dispatch import receiver
    from mxq.contrib.django.signals import tracking

    @receiver(tracking)
    def handle(sender, event, **kwargs):
        if event.event_type == "bounced":
            mark_bad_address(event.recipient, event.mta_response)

``event`` is a ``mxq.contrib.TrackingEvent`` (``event_type``, ``recipient``, ``message_id`` --
the job id, as ``message.mxq_job_id`` --, ``timestamp``, ``mta_response``, ``description``,
``event_id``, ``code``, ``enhanced``, ``text``, ``exchange``, ``attempts``, ``esp_event``).
"""

from django.dispatch import Signal

#: Sent with ``sender`` the view class and ``event`` a ``mxq.contrib.TrackingEvent``.
tracking = Signal()

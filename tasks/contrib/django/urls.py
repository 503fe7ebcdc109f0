"""``path("mxq/", include("mxq.contrib.django.urls"))``: the tracking webhook at ``mxq/events/``.

Point mxq's workers at it: ``MXQ_WEBHOOK_URL=https://app.example.com/mxq/events/`` and the same
``MXQ_WEBHOOK_SECRET`` in the workers and in Django's settings.
"""

from django.urls import path

from .views import tracking_webhook

app_name = "mxq"

urlpatterns = [
    path("events/", tracking_webhook, name="tracking"),
]

"""The view receiving mxq's signed webhook events and sending the ``tracking`` signal.

``POST`` only, CSRF-exempt (the HMAC signature is the authentication): a request whose
``X-Mxq-Signature`` does not match ``MXQ_WEBHOOK_SECRET`` (or whose timestamp is more than
300 s off, or when no secret is set at all) is refused with 403 and no signal; a malformed
body gets 400; a valid event sends ``mxq.contrib.django.signals.tracking`` once and answers
200.  An event POSTed again (mxq retries a POST whose answer was lost) is answered 200 without
a second signal when Django's cache saw its id (``MXQ_WEBHOOK_MAX_AGE``; with a shared cache
across every web process, else per process).  A receiver raising makes the answer 500, so mxq
retries the event later.
"""

from __future__ import annotations

import logging

from django.http import HttpResponse, HttpResponseNotAllowed
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from mxq import settings as registry

from .. import Refused, tracking_event
from .signals import tracking

log = logging.getLogger("mxq.contrib.django")

CACHE_PREFIX = "mxq-event:"


@method_decorator(csrf_exempt, name="dispatch")
class TrackingView(View):
    """mxq's webhook endpoint (see the module docstring)."""

    http_method_names = ["post"]

    def post(self, request, *args, **kwargs):
        try:
            event = tracking_event(request.body, request.headers)
        except Refused as e:
            log.warning("mxq webhook refused (%d): %s", e.status, e.reason)
            return HttpResponse(e.reason, status=e.status, content_type="text/plain")
        if not _first_time(event.event_id):
            return HttpResponse("duplicate event, already handled", content_type="text/plain")
        try:
            tracking.send(sender=self.__class__, event=event)
        except Exception:
            _forget(event.event_id)         # mxq sends it again; the receivers see it again
            raise
        return HttpResponse("ok", content_type="text/plain")

    def http_method_not_allowed(self, request, *args, **kwargs):
        return HttpResponseNotAllowed(["POST"])


def _first_time(event_id: str) -> bool:
    try:
        from django.core.cache import cache
        return cache.add(CACHE_PREFIX + event_id, 1, timeout=int(registry.value("MXQ_WEBHOOK_MAX_AGE")) + 3600)
    except Exception as e:              # no usable cache: every POST is handled
        log.debug("mxq webhook: no cache to deduplicate events (%s)", e)
        return True


def _forget(event_id: str) -> None:
    try:
        from django.core.cache import cache
        cache.delete(CACHE_PREFIX + event_id)
    except Exception:
        pass


tracking_webhook = TrackingView.as_view()

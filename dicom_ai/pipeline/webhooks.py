"""Webhooks: a signed JSON POST per event (job.done, job.failed, delivery.dead_letter).

The index writes an event row in the same transaction as the state change it reports
(``store/index.py``); this module sends those rows, in order, to each configured URL. The
body is the event's JSON as the index built it: study and series UIDs, the job (id, state,
model, rule, run, attempts, error, timings, stages) and, for a dead letter, the delivery.
It never carries patient data: the index builds it from UIDs and job rows only.

Every request is a ``POST`` with these headers (as GitHub's webhooks do)::

    Content-Type: application/json
    User-Agent: dicom-ai-webhooks
    X-DicomAI-Event: job.done                    # the event kind
    X-DicomAI-Delivery: 42                       # the event id: the same on a retry
    X-DicomAI-Signature: sha256=<hex digest>     # HMAC-SHA256 of the exact body bytes
                                                 # under the hook's ``secret``

A receiver checks the signature over the raw body before it parses it, and may drop an
event id it has seen (delivery is at least once). Any 2xx answer counts as received;
anything else (a redirect included) or no answer is a failure, and that URL waits
``retry_base_seconds * 2**failures`` (capped at ``retry_max_seconds``) before the same
event is tried again: events reach each URL in order. A URL's place (the last event it
got, when to try next, the last error) is kept in the index, so a restart goes on where
the node stopped; a URL seen for the first time starts at the events to come. The number
of failures in a row is kept in memory only: after a restart the backoff starts again
from the base.

Events the hook did not ask for only move its place on. Sending runs in its own thread
(``node.py``), with the hook's timeout on every request, so a slow or dead receiver never
holds up the scheduler or the deliverer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from dicom_ai.config import WebhookConfig
from dicom_ai.errors import ConfigError
from dicom_ai.store.index import Event, EventIndex

__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "IDLE_SECONDS",
    "SIGNATURE_HEADER",
    "WebhookSender",
    "signature",
]

log = logging.getLogger(__name__)

EVENT_HEADER = "X-DicomAI-Event"
DELIVERY_HEADER = "X-DicomAI-Delivery"
SIGNATURE_HEADER = "X-DicomAI-Signature"
# New events are looked for at least this often: ``run_due`` never answers more.
IDLE_SECONDS = 1.0
# Events sent to one URL in one ``run_due``: a backlog goes out over several rounds, so
# the node's stop is never held up by more than one request.
_BATCH = 100


def signature(secret: str, body: bytes) -> str:
    """The ``X-DicomAI-Signature`` value: ``sha256=`` and the hex HMAC of ``body``."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _host(url: str) -> str:
    """The URL's host (and port) for logs: never its path, query or credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port is not None else host


@dataclass
class _Place:
    """Where one URL stands: the last event it got, when to try next, failures in a row."""

    last_event_id: int
    next_attempt_at: float
    failures: int = 0


class WebhookSender:
    """Sends the index's events to every configured webhook; ``run_due`` from one thread."""

    def __init__(
        self,
        index: EventIndex,
        hooks: Sequence[WebhookConfig],
        session: requests.Session | None = None,
    ) -> None:
        urls = [hook.url for hook in hooks]
        twice = sorted({url for url in urls if urls.count(url) > 1})
        if twice:
            # The index keeps one place per URL: two hooks on one URL would share it.
            raise ConfigError(
                f"webhooks: {', '.join(_host(u) for u in twice)}: a URL is listed twice"
            )
        self.index = index
        self.hooks = list(hooks)
        self._session = session or requests.Session()
        self._places: dict[str, _Place] = {}

    def close(self) -> None:
        self._session.close()

    def run_due(self, now: float | None = None) -> float:
        """Send what is due to every hook; seconds until the next thing is due (at most
        ``IDLE_SECONDS``, since new events may come at any time). Never raises."""
        now = time.time() if now is None else now
        wait = IDLE_SECONDS
        for hook in self.hooks:
            try:
                wait = min(wait, self._run_hook(hook, now))
            except Exception:
                log.exception("webhook to %s: sending failed; continuing", _host(hook.url))
        return max(wait, 0.0)

    def _place(self, url: str) -> _Place:
        place = self._places.get(url)
        if place is None:
            last_event_id, next_attempt_at = self.index.webhook_cursor(url)
            place = self._places[url] = _Place(last_event_id, next_attempt_at)
        return place

    def _run_hook(self, hook: WebhookConfig, now: float) -> float:
        place = self._place(hook.url)
        if place.next_attempt_at > now:
            return place.next_attempt_at - now
        events = self.index.events_after(place.last_event_id, _BATCH)
        skipped: int | None = None  # the last event passed over, not yet recorded
        for event in events:
            if event.kind not in hook.events:
                skipped = event.id
                continue
            error = self._post(hook, event)
            if error is not None:
                self._failed(hook, place, event, error, now)
                return place.next_attempt_at - now
            self.index.webhook_sent(hook.url, event.id)  # also covers the skipped ones
            place.last_event_id, place.next_attempt_at, place.failures = event.id, 0.0, 0
            skipped = None
        if skipped is not None:
            self.index.webhook_sent(hook.url, skipped)
            place.last_event_id = skipped
        return 0.0 if len(events) == _BATCH else IDLE_SECONDS

    def _post(self, hook: WebhookConfig, event: Event) -> str | None:
        """Send one event; None when it was received, else what went wrong (no body)."""
        body = json.dumps(event.body, separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "dicom-ai-webhooks",
            EVENT_HEADER: event.kind,
            DELIVERY_HEADER: str(event.id),
            SIGNATURE_HEADER: signature(hook.secret, body),
        }
        try:
            with self._session.post(
                hook.url,
                data=body,
                headers=headers,
                timeout=hook.timeout_seconds,
                allow_redirects=False,
            ) as response:
                status = response.status_code
        except requests.Timeout:
            return f"no answer in {hook.timeout_seconds:g} s"
        except requests.ConnectionError:
            return "connection failed"
        except requests.RequestException as exc:
            return f"request failed ({type(exc).__name__})"
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    def _failed(
        self, hook: WebhookConfig, place: _Place, event: Event, error: str, now: float
    ) -> None:
        # The exponent is bounded: a receiver down for days must not overflow the float.
        delay = min(hook.retry_base_seconds * 2 ** min(place.failures, 32), hook.retry_max_seconds)
        place.failures += 1
        place.next_attempt_at = now + delay
        self.index.webhook_failed(hook.url, error, place.next_attempt_at)
        log.warning(
            "webhook to %s failed (%s); event %d retried in %g s",
            _host(hook.url),
            error,
            event.id,
            delay,
        )

"""Send results to their destinations with retry, exponential backoff and dead letter.

Every attempt is recorded in the index before the next is planned, so a restart picks up
the same schedule. A delivery that used up ``max_attempts`` is parked as dead letter; an
operator resubmits it with ``dicom-ai resubmit``.

Destinations are DIMSE peers (C-STORE, optionally over TLS), DICOMweb servers (STOW-RS), or
``sender``: the peer configured for the calling AE title that delivered the series.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from dicom_ai.config import (
    DeliveryConfig,
    DestinationConfig,
    DicomDestination,
    DicomWebDestination,
    bound_sender,
)
from dicom_ai.dicomweb import stow_files
from dicom_ai.dicomweb.stow import redacted_url
from dicom_ai.dimse.scu import Peer, send_files
from dicom_ai.dimse.status import SendResult
from dicom_ai.dimse.tls import client_context
from dicom_ai.errors import DicomAIError
from dicom_ai.store.index import DeliveryIndex, DeliveryRecord

__all__ = ["Deliverer", "backoff_seconds"]

log = logging.getLogger(__name__)

# Success and the Storage warnings (coercion, elements discarded, SOP class mismatch).
_STORED = frozenset({0x0000, 0x0001, 0xB000, 0xB006, 0xB007})


def backoff_seconds(attempts: int, policy: DeliveryConfig) -> float:
    """Delay before attempt ``attempts + 1``: base, 2x base, 4x base, ... capped."""
    return float(
        min(policy.retry_base_seconds * 2 ** max(attempts - 1, 0), policy.retry_max_seconds)
    )


class Deliverer:
    def __init__(
        self,
        index: DeliveryIndex,
        destinations: Mapping[str, DestinationConfig],
        calling_ae: str,
        policy: DeliveryConfig,
        senders: Mapping[str, DicomDestination] | None = None,
    ) -> None:
        self.index = index
        self.destinations = destinations
        self.calling_ae = calling_ae
        self.policy = policy
        self.senders = senders or {}
        # Built once: a certificate that cannot be loaded is a config error at start.
        self._tls: dict[int, ssl.SSLContext] = {}
        for destination in [*destinations.values(), *self.senders.values()]:
            if isinstance(destination, DicomDestination) and destination.tls is not None:
                self._tls[id(destination)] = client_context(destination.tls)

    def run_due(self, now: float | None = None) -> int:
        """Attempt every delivery that is due; returns how many were delivered."""
        delivered = 0
        for record in self.index.due_deliveries(time.time() if now is None else now):
            delivered += self._attempt(record)
        return delivered

    def _attempt(self, record: DeliveryRecord) -> int:
        attempt = record.attempts + 1
        destination, unresolved = self._resolve(record)
        if destination is None:
            self._failed(record, unresolved, final=True)
            return 0
        missing = [p for p in record.files if not p.exists()]
        if missing:
            self._failed(
                record, f"result files missing: {', '.join(map(str, missing))}", final=True
            )
            return 0
        where = _describe(destination)
        try:
            results = self._send(destination, record.files)
        except (DicomAIError, OSError, RuntimeError) as exc:
            self._failed(record, f"attempt {attempt} to {where}: {exc}", final=False)
            return 0
        refused = [r for r in results if r.status not in _STORED]
        if refused:
            detail = ", ".join(
                f"{r.path.name}: {'not sent' if r.status is None else f'0x{r.status:04X}'}"
                for r in refused
            )
            self._failed(record, f"attempt {attempt} to {where}: {detail}", final=False)
            return 0
        self.index.delivery_succeeded(record.id)
        log.info(
            "job %d: delivered %d objects to %s (%s)",
            record.job_id,
            len(results),
            record.destination,
            where,
        )
        return 1

    def _resolve(self, record: DeliveryRecord) -> tuple[DestinationConfig | None, str]:
        """The destination to send to, or None and why it cannot be resolved (final)."""
        calling_ae = bound_sender(record.destination)
        if calling_ae is None:
            destination = self.destinations.get(record.destination)
            if destination is None:
                return None, f"destination {record.destination!r} is not configured"
            return destination, ""
        peer = self.senders.get(calling_ae)
        if peer is None:
            return None, f"return to sender: calling AE {calling_ae!r} has no entry in senders"
        return peer, ""

    def _send(self, destination: DestinationConfig, files: Sequence[Path]) -> list[SendResult]:
        timeout = self.policy.timeout_seconds
        if isinstance(destination, DicomWebDestination):
            return stow_files(destination.url, files, timeout, destination.ca_certificates)
        peer = Peer(destination.ae_title, destination.host, destination.port)
        return send_files(peer, files, self.calling_ae, timeout, tls=self._tls.get(id(destination)))

    def _failed(self, record: DeliveryRecord, error: str, final: bool) -> None:
        attempts = record.attempts + 1
        if final or attempts >= self.policy.max_attempts:
            self.index.delivery_failed(record.id, error, None)
            log.error(
                "job %d: delivery to %s is dead letter: %s",
                record.job_id,
                record.destination,
                error,
            )
            return
        delay = backoff_seconds(attempts, self.policy)
        self.index.delivery_failed(record.id, error, time.time() + delay)
        log.warning(
            "job %d: delivery to %s failed (%s); retry in %.1f s",
            record.job_id,
            record.destination,
            error,
            delay,
        )


def _describe(destination: DestinationConfig) -> str:
    if isinstance(destination, DicomWebDestination):
        return redacted_url(destination.url)
    tls = " (TLS)" if destination.tls else ""
    return f"{destination.ae_title}@{destination.host}:{destination.port}{tls}"

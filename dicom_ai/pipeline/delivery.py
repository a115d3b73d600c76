"""Send results to their destinations with retry, exponential backoff and dead letter.

Every attempt is recorded in the index before the next is planned, so a restart picks up
the same schedule. A delivery that used up ``max_attempts`` is parked as dead letter; an
operator resubmits it with ``dicom-ai resubmit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from dicom_ai.config import DeliveryConfig, DestinationConfig
from dicom_ai.dimse.scu import Peer, send_files
from dicom_ai.errors import DicomAIError
from dicom_ai.store.index import DeliveryRecord, Index

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
        index: Index,
        destinations: Mapping[str, DestinationConfig],
        calling_ae: str,
        policy: DeliveryConfig,
    ) -> None:
        self.index = index
        self.destinations = destinations
        self.calling_ae = calling_ae
        self.policy = policy

    def run_due(self, now: float | None = None) -> int:
        """Attempt every delivery that is due; returns how many were delivered."""
        delivered = 0
        for record in self.index.due_deliveries(time.time() if now is None else now):
            delivered += self._attempt(record)
        return delivered

    def _attempt(self, record: DeliveryRecord) -> int:
        attempt = record.attempts + 1
        destination = self.destinations.get(record.destination)
        if destination is None:
            self._failed(
                record, f"destination {record.destination!r} is not configured", final=True
            )
            return 0
        peer = Peer(destination.ae_title, destination.host, destination.port)
        missing = [p for p in record.files if not p.exists()]
        if missing:
            self._failed(
                record, f"result files missing: {', '.join(map(str, missing))}", final=True
            )
            return 0
        try:
            results = send_files(peer, record.files, self.calling_ae, self.policy.timeout_seconds)
        except (DicomAIError, OSError, RuntimeError) as exc:
            self._failed(record, f"attempt {attempt} to {peer}: {exc}", final=False)
            return 0
        refused = [r for r in results if r.status not in _STORED]
        if refused:
            detail = ", ".join(
                f"{r.path.name}: {'not sent' if r.status is None else f'0x{r.status:04X}'}"
                for r in refused
            )
            self._failed(record, f"attempt {attempt} to {peer}: {detail}", final=False)
            return 0
        self.index.delivery_succeeded(record.id)
        log.info(
            "job %d: delivered %d objects to %s (%s)",
            record.job_id,
            len(results),
            record.destination,
            peer,
        )
        return 1

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

"""When is a series complete? DICOM has no "end of series" message, so we infer it.

A series is complete when no instance arrived for ``quiet_seconds``, or when every
association that delivered to it has released and ``release_grace_seconds`` passed (a
scanner that sends a series in one association and releases is done; the grace covers a
sender that opens the next association right away). Instances arriving later start a new
run of the series; nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_ai.store.index import PendingSeries

__all__ = ["AssemblyPolicy"]


@dataclass(frozen=True)
class AssemblyPolicy:
    quiet_seconds: float = 5.0
    release_grace_seconds: float = 1.0

    def is_complete(self, series: PendingSeries, now: float) -> bool:
        if now - series.last_received >= self.quiet_seconds:
            return True
        return (
            series.open_associations == 0
            and series.last_closed_at is not None
            and now - series.last_closed_at >= self.release_grace_seconds
        )

    def complete(self, pending: list[PendingSeries], now: float) -> list[PendingSeries]:
        return [s for s in pending if self.is_complete(s, now)]

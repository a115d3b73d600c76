"""When is a series complete? DICOM has no "end of series" message, so we infer it.

A series is complete when no instance arrived for ``quiet_seconds``, or when every
association that delivered to it has released and ``release_grace_seconds`` passed (a
scanner that sends a series in one association and releases is done; the grace covers a
sender that opens the next association right away). Instances arriving later start a new
run of the series; nothing is dropped.

Early start (``early_start``): a batch that one association delivered (two instances or
more) and then released starts its run at once, without waiting out the grace; its results
are held until the grace has passed with nothing new (``Index.due_deliveries``), else a new
run replaces them. A sender that opens an association per instance never starts early, so
it does not set off a run per instance.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_ai.store.index import PendingSeries

__all__ = ["AssemblyPolicy"]


@dataclass(frozen=True)
class AssemblyPolicy:
    quiet_seconds: float = 5.0
    release_grace_seconds: float = 1.0
    early_start: bool = False

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

    def runnable(
        self, pending: list[PendingSeries], now: float
    ) -> list[tuple[PendingSeries, float | None]]:
        """Series to start a run for now, each with the time before which its results are
        held (None: the series is complete, nothing to hold)."""
        runs: list[tuple[PendingSeries, float | None]] = []
        for series in pending:
            if self.is_complete(series, now):
                runs.append((series, None))
            elif self.early_start and self._released_by_its_one_sender(series):
                assert series.last_closed_at is not None
                runs.append((series, series.last_closed_at + self.release_grace_seconds))
        return runs

    @staticmethod
    def _released_by_its_one_sender(series: PendingSeries) -> bool:
        return (
            series.open_associations == 0
            and series.last_closed_at is not None
            and series.batch_associations == 1
            and series.batch_instances >= 2
        )

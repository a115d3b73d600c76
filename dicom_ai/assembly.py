"""When does a series run, and which of its results go out? The rule lives here.

DICOM has no "end of series" message, so completeness is inferred. A series is complete
when no instance arrived for ``quiet_seconds``, or when every association that delivered to
it has released and ``release_grace_seconds`` passed (a scanner that sends a series in one
association and releases is done; the grace covers a sender that opens the next association
right away). Instances arriving later start a new run of the series; nothing is dropped.

Early start (``early_start``): a batch that one association delivered (two instances or
more) and then released starts its run at once, without waiting out the grace. Its results
are held until the grace has passed (`RunStart.hold_until`). A sender that opens an
association per instance never starts early, so it does not set off a run per instance.

Hold and supersede, the whole rule (the index stores ``hold_until`` with the run's jobs
through `Index.start_run` and applies it; nothing else decides it):

- Held results go out from ``hold_until`` on, and only while no instance of the series came
  since and no later run started (`Index.due_deliveries`).
- A new run of the series supersedes the held, undelivered results of earlier runs
  (`Index.start_run`).
- Results of one series and model share their UIDs, so the last delivered is what the PACS
  keeps: a finished job supersedes the undelivered results of earlier runs of the same
  model, and a job that finishes after a later run's (or, if held, after a later run
  started) is superseded at once (`Index.finish_job`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from dicom_ai.store.index import PendingSeries

__all__ = ["AssemblyPolicy", "RunStart"]


class RunStart(NamedTuple):
    """A series to start a run for now."""

    series: PendingSeries
    hold_until: float | None  # results held before this time; None: complete, none held


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

    def runnable(self, pending: list[PendingSeries], now: float) -> list[RunStart]:
        """Series to start a run for now, complete or started early."""
        runs: list[RunStart] = []
        for series in pending:
            if self.is_complete(series, now):
                runs.append(RunStart(series, None))
            elif self.early_start and self._released_by_its_one_sender(series):
                assert series.last_closed_at is not None
                runs.append(RunStart(series, series.last_closed_at + self.release_grace_seconds))
        return runs

    @staticmethod
    def _released_by_its_one_sender(series: PendingSeries) -> bool:
        return (
            series.open_associations == 0
            and series.last_closed_at is not None
            and series.batch_associations == 1
            and series.batch_instances >= 2
        )

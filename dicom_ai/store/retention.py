"""Retention: which files and rows the cleaner deletes, when, and in what order.

The policy is the config's ``storage`` section (`RetentionPolicy`):

- a series' instance files go ``keep_sources`` after the last of its jobs finished and its
  last result was delivered, or ``keep_unrouted`` after routing when no rule claimed it;
- a job's result files go ``keep_results`` after its last delivery (or its end, when it had
  none to make);
- a series' index rows (with its jobs, deliveries and their attempts) go ``keep_records``
  after its last file went; so do closed associations nothing points to, and events;
- below ``emergency_free_bytes`` of free space, deletable files go oldest first, whatever
  their age, until there is that much free again.

Never deleted, whatever the age or disk pressure: instances of a series that is still
receiving or waiting to be routed, or has a job pending or running (a job the worker's
death sends back is pending); results and sources with a delivery pending, backing off or in
dead letter, until it is delivered, superseded or discarded by an operator. A failed job does
not hold its series' files: they go ``keep_sources`` after it failed, and from then on the
job cannot be rerun (`Index.rerun_job`).

A purge is two steps, so that ``kill -9`` at any moment leaves nothing that is needed
missing: the index marks the rows (`Index.mark_sources_purged`, a commit synced with
``synchronous=FULL``), then deletes the files and the marked rows in one transaction
(`Index.remove_purged_sources`). A crash between the two leaves marked rows whose files
nothing needs; `sweep` (at start and at every cleanup) finishes them, and removes result
folders of purged or pruned jobs and the empty folders a crash left.

More instances of a series whose sources were purged are stored and acknowledged as any
other; the series is run again only once every purged instance has come back (a modality or
PACS resending the whole series): until then it is routed to nothing, with the reason in its
note (`Scheduler`), and a run on part of the series never supersedes results made from all
of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from dicom_ai.config import StorageConfig
from dicom_ai.store.index import Index, PurgeCandidate, SweepIndex
from dicom_ai.store.spool import Spool

__all__ = ["PurgePlan", "PurgeReport", "Purger", "RetentionPolicy", "SweepReport", "sweep"]

log = logging.getLogger(__name__)

HOUR = 3600.0
DAY = 24 * HOUR
_PRUNE_BATCH = 50  # series per transaction: a few milliseconds of the write lock


@dataclass(frozen=True)
class RetentionPolicy:
    keep_sources_seconds: float
    keep_results_seconds: float
    keep_unrouted_seconds: float
    keep_records_seconds: float
    emergency_free_bytes: int | None = None

    @classmethod
    def from_config(cls, storage: StorageConfig) -> RetentionPolicy:
        return cls(
            keep_sources_seconds=storage.keep_sources_hours * HOUR,
            keep_results_seconds=storage.keep_results_hours * HOUR,
            keep_unrouted_seconds=storage.keep_unrouted_hours * HOUR,
            keep_records_seconds=storage.keep_records_days * DAY,
            emergency_free_bytes=storage.emergency_free_bytes,
        )


@dataclass
class PurgeReport:
    series: int = 0
    instances: int = 0
    instance_bytes: int = 0
    jobs: int = 0
    result_bytes: int = 0
    records: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.series or self.jobs or any(self.records.values()))

    def summary(self) -> str:
        records = ", ".join(f"{n} {table}" for table, n in self.records.items() if n)
        return (
            f"sources of {self.series} series ({self.instances} files, "
            f"{_mb(self.instance_bytes)}), results of {self.jobs} jobs ({_mb(self.result_bytes)})"
            f"; index rows: {records or 'none'}"
        )


@dataclass(frozen=True)
class PurgePlan:
    """What a purge would delete now (``dicom-ai purge --dry-run``)."""

    sources: list[PurgeCandidate]
    results: list[PurgeCandidate]
    records: dict[str, int]


@dataclass
class SweepReport:
    series: int = 0  # purges a crash interrupted, finished
    result_folders: int = 0  # of purged or pruned jobs
    empty_folders: int = 0

    def __bool__(self) -> bool:
        return bool(self.series or self.result_folders or self.empty_folders)


def sweep(index: SweepIndex, spool: Spool, empty_folders: bool = False) -> SweepReport:
    """Finish what an interrupted purge left: files of rows marked purged, result folders
    of jobs purged or gone from the index; with ``empty_folders`` (at start, before
    receiving), series and study folders left empty."""
    report = SweepReport()
    for uid in index.series_with_purged_instances():
        index.remove_purged_sources(uid, spool.remove_instance_files)
        report.series += 1
    for job_id in index.unneeded_results(spool.result_job_ids()):
        if index.remove_purged_results(job_id, partial(spool.remove_results, job_id)):
            report.result_folders += 1
    if empty_folders:
        report.empty_folders = spool.remove_empty_folders()
    return report


class Purger:
    """Applies a `RetentionPolicy` to one spool and its index.

    ``index``: a connection of its own (the cleaner runs in its own process); ``batch``:
    series or jobs marked per transaction; ``pause``: seconds after each transaction that
    deletes (the files of one series, the results of one job, a batch of rows), so that
    receivers waiting to index an instance get the index: SQLite's busy handler retries
    after 1, 2, 5, 10 ms and more, and a writer that takes the lock again at once keeps
    them waiting.
    """

    def __init__(
        self,
        index: Index,
        spool: Spool,
        policy: RetentionPolicy,
        batch: int = 100,
        pause: float = 0.01,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.spool = spool
        self.policy = policy
        self.batch = batch
        self.pause = pause
        self.clock = clock
        self.stopping = threading.Event()  # set: the purge under way ends after its series

    def plan(self) -> PurgePlan:
        now = self.clock()
        p = self.policy
        sources = self.index.sources_due(
            now, p.keep_sources_seconds, p.keep_unrouted_seconds, limit=-1
        )
        results = self.index.results_due(now, p.keep_results_seconds, limit=-1)
        records = self.index.prune_records(now - p.keep_records_seconds, dry_run=True)
        return PurgePlan(sources, results, records)

    def purge(self) -> PurgeReport:
        """Everything the policy says may go now: sources, results, then index rows."""
        report = PurgeReport()
        p = self.policy
        while True:
            due = self.index.sources_due(
                self.clock(), p.keep_sources_seconds, p.keep_unrouted_seconds, self.batch
            )
            if not due or not self._purge_sources(due, report) or self.stopping.is_set():
                break
        while not self.stopping.is_set():
            due = self.index.results_due(self.clock(), p.keep_results_seconds, self.batch)
            if not due or not self._purge_results(due, report):
                break
        cutoff = self.clock() - p.keep_records_seconds
        while not self.stopping.is_set():
            deleted = self.index.prune_records(cutoff, limit=_PRUNE_BATCH)
            for table, n in deleted.items():
                report.records[table] = report.records.get(table, 0) + n
            if not any(deleted.values()):
                break
            self._rest()
        if any(report.records.values()):
            self.index.compact()
        return report

    def relieve(self) -> PurgeReport:
        """Below ``emergency_free_bytes`` free: delete deletable files oldest first, whatever
        their age, until that much is free again or nothing more may go."""
        report = PurgeReport()
        target = self.policy.emergency_free_bytes
        if target is None:
            return report
        while self.spool.free_bytes() < target and not self.stopping.is_set():
            now = self.clock()
            sources = self.index.sources_due(now, 0, 0, self.batch, any_age=True)
            results = self.index.results_due(now, 0, self.batch, any_age=True)
            if not sources and not results:
                break
            # The oldest first, whichever kind it is; free space checked after each.
            oldest_source = sources[0].due if sources else float("inf")
            oldest_result = results[0].due if results else float("inf")
            done = (
                self._purge_sources(sources[:1], report)
                if oldest_source <= oldest_result
                else self._purge_results(results[:1], report)
            )
            if not done:
                break
        if report:
            log.warning(
                "free space below storage.emergency_free_bytes (%s): purged early %s; %s free now",
                _mb(target),
                report.summary(),
                _mb(self.spool.free_bytes()),
            )
        return report

    def run(self, stop: threading.Event, interval: float) -> None:
        """The cleaner's loop (cleaner.py): `sweep` and `purge` every ``interval`` seconds,
        and `relieve` every second in between. Never raises: a failure is one log line, and
        the next round tries again."""
        self.stopping = stop
        next_purge = 0.0
        while True:
            try:
                self.relieve()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + interval
                    swept = sweep(self.index, self.spool)
                    if swept:
                        log.info("finished interrupted purges: %s", swept)
                    report = self.purge()
                    if report:
                        log.info("purged %s", report.summary())
            except Exception as exc:  # the cleaner must outlive any failure
                log.error("cleanup failed, trying again at the next round: %s", exc)
            if stop.wait(min(1.0, interval)):
                return

    def _purge_sources(self, due: list[PurgeCandidate], report: PurgeReport) -> bool:
        marked = self.index.mark_sources_purged([c.key for c in due])
        for uid in marked:
            # A stop between two series leaves marks for `sweep` to finish: a clean stop.
            if self.stopping.is_set():
                break
            files, size = self.index.remove_purged_sources(uid, self.spool.remove_instance_files)
            report.series += 1
            report.instances += files
            report.instance_bytes += size
            self._rest()
        return bool(marked)

    def _purge_results(self, due: list[PurgeCandidate], report: PurgeReport) -> bool:
        marked = self.index.mark_results_purged([int(c.key) for c in due])
        sizes = {int(c.key): c.bytes for c in due}
        for job_id in marked:
            if self.stopping.is_set():
                break
            if self.index.remove_purged_results(job_id, partial(self.spool.remove_results, job_id)):
                report.jobs += 1
                report.result_bytes += sizes[job_id]
            self._rest()
        return bool(marked)

    def _rest(self) -> None:
        if self.pause:
            time.sleep(self.pause)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"

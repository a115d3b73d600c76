"""The running node: wires receive -> store -> assembly -> routing -> workers -> delivery.

This is the composition root; each stage stays ignorant of the ones before it. Besides the
receiving threads (an accept loop per port, one thread per association), two threads: the
scheduler (assembly, routing, job dispatch, prefetch, job outcomes) and the deliverer
(sending can block on a slow peer, and must not hold up the scheduler).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import dcmread

from dicom_ai.assembly import AssemblyPolicy
from dicom_ai.config import SENDER, Config, bind_sender
from dicom_ai.errors import ConfigError, InputError
from dicom_ai.lifecycle import wait_for_stop
from dicom_ai.pipeline.delivery import Deliverer
from dicom_ai.pipeline.worker import JobOutcome, JobSpec, WorkerPool
from dicom_ai.receivers import ReceiverProcesses, access_policy, make_scp, open_store
from dicom_ai.routing import RuleSet, SenderContext, load_rules
from dicom_ai.store.header import parse_header
from dicom_ai.store.index import InstanceRecord, JobRecord, PendingSeries, RunPlan

__all__ = ["Node", "access_policy", "check_rules_against_config"]

log = logging.getLogger(__name__)


def check_rules_against_config(rules: RuleSet, config: Config, source: Path) -> None:
    """Every model and destination a rule names must exist in the config."""
    unknown_models = sorted(m for m in rules.models if m not in config.known_models())
    unknown_destinations = sorted(d for d in rules.destinations if not config.has_destination(d))
    problems = []
    if unknown_models:
        problems.append(f"unknown model(s) {', '.join(unknown_models)}")
    if unknown_destinations:
        problems.append(f"unknown destination(s) {', '.join(unknown_destinations)}")
    if problems:
        raise ConfigError(f"{source}: rules name {'; '.join(problems)}")


@dataclass
class _LoadedRules:
    """One called AE title's rules file, as last loaded, for hot reload."""

    path: Path
    mtime: float
    rules: RuleSet


class Node:
    def __init__(self, config: Config, log_level: int = logging.INFO) -> None:
        self.config = config
        self.spool, self.index = open_store(config)
        self.rules: dict[str, _LoadedRules] = {}
        for title, called in config.called_ae_table().items():
            rules = load_rules(called.rules)
            check_rules_against_config(rules, config, called.rules)
            self.rules[title] = _LoadedRules(called.rules, called.rules.stat().st_mtime, rules)
        uses_sender = any(SENDER in loaded.rules.destinations for loaded in self.rules.values())
        if uses_sender and not config.senders:
            log.warning("rules send to %r but no senders are configured", SENDER)
        if config.node.tls and config.node.port is not None:
            plain = [t for t, c in config.called_ae_table().items() if not c.require_tls]
            if plain:
                log.warning(
                    "TLS is on, but %s also answer on plain port %d (require_tls, or port: null)",
                    ", ".join(plain),
                    config.node.port,
                )
        self.assembly = AssemblyPolicy(
            config.pipeline.quiet_seconds,
            config.pipeline.release_grace_seconds,
            config.pipeline.early_start,
        )
        self._receivers = ReceiverProcesses(config, config.node.receivers - 1, log_level)
        self.scp = make_scp(
            config,
            self.spool,
            self.index,
            port=config.node.port,
            tls_port=None,
            shared_limit=self._receivers.shared_limit,
        )
        # A released association wakes the scheduler (its series may be complete now).
        self._wake, self._waker = socket.socketpair()
        for end in (self._wake, self._waker):
            end.setblocking(False)
        self.scp.on_association_ended = self._wake_scheduler
        self.deliverer = Deliverer(
            self.index,
            config.destinations,
            config.node.ae_title,
            config.delivery,
            senders=config.senders,
        )
        self._log_level = log_level
        self._pool: WorkerPool | None = None
        # Series still arriving -> instances sent to a worker to decode ahead (-1: no model).
        self._prefetched: dict[str, int] = {}
        self._pending: list[PendingSeries] = []
        self._pending_version: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._deliver_now = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int | None:
        return self.scp.port

    @property
    def tls_port(self) -> int | None:
        return self.scp.tls_port

    def start(self) -> None:
        removed = self.spool.remove_stale_temp_files()
        self.index.close_stale_associations()
        resumed = self.index.requeue_running_jobs()
        reindexed = self._reindex_spooled_files()
        if removed or resumed or reindexed:
            log.info(
                "recovered: %d partial temp files removed, %d jobs resumed, %d instances reindexed",
                removed,
                resumed,
                reindexed,
            )
        pipeline = self.config.pipeline
        self._pool = WorkerPool(pipeline.workers, self._log_level, pipeline.warm_memory_mb << 20)
        self.scp.start()
        if self.config.node.receivers > 1:
            self._receivers.start(self.scp.listening())
        for target, name in ((self._schedule_loop, "scheduler"), (self._deliver_loop, "deliverer")):
            thread = threading.Thread(target=target, name=f"dicom-ai-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _reindex_spooled_files(self) -> int:
        """Index instance files that a power loss kept out of the index (see Index)."""
        orphans = self.index.unindexed(self.spool.instance_files())
        if not orphans:
            return 0
        # The called AE is not in the file. A known series keeps the association it came
        # with; for a new one: with one title it is that one, else the node's own.
        titles = list(self.config.called_ae_table())
        called = titles[0] if len(titles) == 1 else self.config.node.ae_title
        association_id = self.index.open_association("", called, "")
        for path in orphans:
            try:
                header = parse_header(path.read_bytes())
            except (InputError, OSError) as exc:
                log.error("spooled file %s cannot be reindexed: %s", path, exc)
                continue
            known = self.index.series_last_association(header.series_instance_uid)
            self.index.add_instance(
                InstanceRecord(
                    header.sop_instance_uid,
                    header.sop_class_uid,
                    header.series_instance_uid,
                    header.study_instance_uid,
                    header.modality,
                    path,
                    association_id if known is None else known,
                )
            )
        self.index.close_association(association_id)
        return len(orphans)

    def stop(self) -> None:
        self._stop.set()
        self._deliver_now.set()
        self._receivers.stop()
        self.scp.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown()
        self.index.close()
        self._wake.close()
        self._waker.close()

    def _wake_scheduler(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: woken already, not yet read
            self._waker.send(b"\0")

    def request_stop(self) -> None:
        """Safe from a signal handler: the caller of ``wait`` then calls ``stop``."""
        self._stop.set()

    def wait(self) -> None:
        wait_for_stop(self._stop)

    # -- scheduler ---------------------------------------------------------------------------

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reload_rules_if_changed()
                pending = self._pending_series()
                routed = self._route_complete_series(pending, time.time())
                self._dispatch_jobs()
                self._prefetch_arriving([s for s in pending if s.series_instance_uid not in routed])
                assert self._pool is not None
                for outcome in self._pool.poll(timeout=0.1, wake=self._wake):
                    self._record(outcome)
            except Exception:
                log.exception("scheduler step failed; continuing")
                self._stop.wait(1.0)

    def _pending_series(self) -> list[PendingSeries]:
        """The index's pending series, queried again only when the index changed: the
        query (~1 ms) ran ten times a second and held the interpreter lock from the
        receiving threads (~4% of it under load, py-spy)."""
        version = self.index.version()
        if version != self._pending_version:
            self._pending = self.index.pending_series()
            self._pending_version = version
        return self._pending

    def _reload_rules_if_changed(self) -> None:
        for title, loaded in self.rules.items():
            try:
                mtime = loaded.path.stat().st_mtime
            except OSError:
                continue
            if mtime == loaded.mtime:
                continue
            loaded.mtime = mtime
            try:
                rules = load_rules(loaded.path)
                check_rules_against_config(rules, self.config, loaded.path)
            except ConfigError as exc:
                log.error("rules of %s not reloaded, the running rules stay: %s", title, exc)
                continue
            loaded.rules = rules
            log.info("rules of %s reloaded from %s", title, loaded.path)

    def _route_complete_series(self, pending: list[PendingSeries], now: float) -> set[str]:
        """Route the series that are complete, or may start early (assembly.py); their UIDs."""
        routed = set()
        for series, hold_until in self.assembly.runnable(pending, now):
            self._route(series, hold_until)
            self._prefetched.pop(series.series_instance_uid, None)
            routed.add(series.series_instance_uid)
        return routed

    def _prefetch_arriving(self, pending: list[PendingSeries]) -> None:
        """Have an idle worker decode the instances of series still arriving (or waiting out
        their grace) that a rule sends to a model, so their job starts with them loaded."""
        assert self._pool is not None
        for series in pending:
            uid = series.series_instance_uid
            sent = self._prefetched.get(uid)
            if sent is not None and sent < 0:
                continue
            try:
                new = self.index.series_instance_paths(uid, skip=sent or 0)
                if sent is None:  # first sight: worth it only if a rule would run a model
                    plans, _ = self._plans(uid, new)
                    sent = self._prefetched[uid] = 0 if plans else -1
                    if sent < 0:
                        continue
                if new and self._pool.prefetch(uid, tuple(new)):
                    self._prefetched[uid] = sent + len(new)
            except Exception:  # best effort: the job reads whatever was not prefetched
                log.debug("no prefetch for series %s", uid, exc_info=True)
                self._prefetched[uid] = -1

    def _route(self, series: PendingSeries, hold_until: float | None = None) -> None:
        uid = series.series_instance_uid
        paths = self.index.series_instance_paths(uid)
        plans, notes = self._plans(uid, paths)
        note = "; ".join(notes) or "no rule matched"
        job_ids = self.index.start_run(uid, plans, note, hold_until if plans else None)
        if job_ids:
            log.info(
                "series %s complete (%d instances%s): jobs %s by %s",
                uid,
                len(paths),
                ""
                if hold_until is None
                else ", its one association released: started early, results held "
                f"{max(0.0, hold_until - time.time()):.1f} s for late instances",
                job_ids,
                ", ".join(p.rule for p in plans),
            )
        else:
            log.info(
                "series %s complete (%d instances): %s; kept, not processed", uid, len(paths), note
            )

    def _plans(self, uid: str, paths: list[Path]) -> tuple[list[RunPlan], list[str]]:
        """What the rules say for the series' current batch: runs to make, and why."""
        header = dcmread(paths[-1], stop_before_pixels=True)
        plans: list[RunPlan] = []
        notes: list[str] = []
        # Each called AE title that received this batch routes it by its own rules only.
        seen: set[str] = set()
        for calling, called, ip in self.index.series_senders(uid):
            if called in seen:
                continue
            seen.add(called)
            loaded = self.rules.get(called)
            if loaded is None:
                # Received on a title the node no longer serves (config changed since).
                notes.append(f"called AE {called!r} is no longer configured")
                continue
            evaluation = loaded.rules.evaluate(header, SenderContext(calling, called, ip))
            for d in evaluation.decisions:
                notes.append(f"{called}/{d.rule}: {', '.join(d.reasons)}")
                if d.model:
                    destinations = tuple(bind_sender(name, calling) for name in d.destinations)
                    same = [
                        n
                        for n, p in enumerate(plans)
                        if (p.model, p.destinations) == (d.model, destinations)
                    ]
                    if not same:
                        plans.append(RunPlan(d.rule, d.model, destinations, d.preview))
                    elif d.preview and not plans[same[0]].preview:
                        # One run serves both rules (same UIDs): it makes the preview too.
                        plans[same[0]] = replace(plans[same[0]], preview=True)
        return plans, notes

    def _dispatch_jobs(self) -> None:
        assert self._pool is not None
        for job in self.index.claim_pending_jobs(self._pool.idle()):
            self._pool.submit(self._spec(job))

    def _spec(self, job: JobRecord) -> JobSpec:
        model = self.config.model(job.model)
        return JobSpec(
            job_id=job.id,
            series_instance_uid=job.series_instance_uid,
            model_id=job.model,
            bundle=model.bundle,
            device=model.device,
            timeout_seconds=model.timeout_seconds,
            task=model.task,
            threshold=model.threshold,
            preview=job.preview,
            instance_paths=tuple(self.index.series_instance_paths(job.series_instance_uid)),
            results_dir=self.spool.results_dir(job.id),
            device_serial_number=self.config.device_serial_number,
            min_free_bytes=self.config.node.min_free_bytes,
        )

    def _record(self, outcome: JobOutcome) -> None:
        job = self.index.job(outcome.job_id)
        if outcome.ok:
            self.index.finish_job(job.id, outcome.files, job.destinations)
            log.info("job %d done in %.1f s", job.id, outcome.seconds)
            self._deliver_now.set()
            return
        retry = outcome.retry and job.attempts < self.config.pipeline.max_job_attempts
        self.index.fail_job(job.id, outcome.reason, retry=retry)
        log.error(
            "job %d (%s on series %s) failed%s: %s",
            job.id,
            job.model,
            job.series_instance_uid,
            ", will retry" if retry else "",
            outcome.reason,
        )

    # -- deliverer ---------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            # Results go out as soon as a job records them; the timeout paces retries.
            self._deliver_now.wait(0.2)
            self._deliver_now.clear()
            try:
                self.deliverer.run_due()
            except Exception:
                log.exception("delivery step failed; continuing")
                self._stop.wait(1.0)

"""The scheduler: from pending series to jobs on workers, one round at a time.

`Scheduler.step` does one round: reload changed rules; read the pending series (again only
when the index changed); start a run for each series assembly says may run; hand pending
jobs to idle workers; have idle workers decode ahead the series still arriving; record the
outcomes of finished jobs. Everything it touches is passed in (the index, a pool, the rules,
the assembly policy), so a test drives it with a fake pool and no sockets; the node runs
``step`` in a loop on its own thread.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from pydicom import dcmread

from dicom_ai.assembly import AssemblyPolicy, RunStart
from dicom_ai.config import Config
from dicom_ai.pipeline.worker import JobOutcome, JobSpec, RoleInput
from dicom_ai.routing import LiveRules, plan_runs
from dicom_ai.routing.studies import decide
from dicom_ai.store.index import JobRecord, PendingSeries, RunPlan, SchedulingIndex, StudyWait
from dicom_ai.store.spool import Spool

__all__ = ["Health", "JobSpecs", "Pool", "Prefetcher", "Scheduler"]

log = logging.getLogger(__name__)


class Pool(Protocol):
    """What the scheduler needs of `WorkerPool`."""

    def idle(self) -> int: ...
    def submit(self, spec: JobSpec) -> None: ...
    def prefetch(
        self, series_uid: str, paths: tuple[Path, ...], models: tuple[str, ...] = ()
    ) -> bool: ...
    def poll(self, timeout: float = 0.0, wake: socket.socket | None = None) -> list[JobOutcome]: ...


class Health(Protocol):
    """What the scheduler needs of `pipeline.health.ModelHealth`."""

    def broken(self, model_id: str) -> str | None: ...


def _node_python(model_id: str) -> Path | None:
    return None


@dataclass(frozen=True)
class JobSpecs:
    """A job's spec for a worker: the job, its model's settings, its instance files."""

    config: Config
    spool: Spool
    # The interpreter a model's jobs run (`ModelHealth.python`); None: the node's.
    python: Callable[[str], Path | None] = _node_python

    def __call__(
        self,
        job: JobRecord,
        instance_paths: tuple[Path, ...],
        role_paths: Mapping[str, tuple[Path, ...]] | None = None,
    ) -> JobSpec:
        """``role_paths``: a study job's instance files per series UID."""
        model = self.config.model(job.model)
        found = role_paths or {}
        roles = tuple(
            RoleInput(role, uid, found.get(uid, ()) if uid else ()) for role, uid in job.roles
        )
        return JobSpec(
            job_id=job.id,
            series_instance_uid=job.series_instance_uid,
            model_id=job.model,
            bundle=model.bundle,
            device=model.device,
            timeout_seconds=model.timeout_seconds,
            task=model.task,
            threshold=model.threshold,
            config_files=tuple(model.config_files),
            prompts=None if model.prompts is None else tuple(model.prompts),
            labels=None if model.labels is None else tuple(sorted(model.labels.items())),
            preview=job.preview,
            card=job.card,
            card_pdf=self.config.results.card_pdf,
            card_disclaimer=self.config.results.card_disclaimer,
            explain=model.explain,
            explain_layer=model.explain_layer,
            python=self.python(job.model),
            instance_paths=instance_paths,
            results_dir=self.spool.results_dir(job.id),
            device_serial_number=self.config.device_serial_number,
            min_free_bytes=self.config.node.min_free_bytes,
            roles=roles,
            reference_role=job.reference_role,
            role_input=job.role_input,
            result_key=(
                None
                if job.study_instance_uid is None
                else f"study/{job.study_instance_uid}/{job.rule}"
            ),
        )


_NO_MODEL = -1


class Prefetcher:
    """Has idle workers decode the instances of series still arriving (or waiting out their
    grace) that a rule sends to a model, so their job starts with them loaded.

    Keeps, per series, how many of its instances were sent (`_NO_MODEL`: none will be,
    no rule runs a model on it); best effort throughout: a job reads whatever was not
    prefetched.
    """

    def __init__(
        self,
        index: SchedulingIndex,
        pool: Pool,
        plans: Callable[[str, list[Path]], list[RunPlan]],
    ) -> None:
        self._index = index
        self._pool = pool
        self._plans = plans
        self._sent: dict[str, int] = {}
        self._models: dict[str, tuple[str, ...]] = {}  # the models its rules would run

    def forget(self, series_uid: str) -> None:
        """The series' run started: what comes next is a new batch."""
        self._sent.pop(series_uid, None)
        self._models.pop(series_uid, None)

    def arriving(self, pending: list[PendingSeries]) -> None:
        for series in pending:
            uid = series.series_instance_uid
            sent = self._sent.get(uid)
            if sent == _NO_MODEL:
                continue
            try:
                new = self._index.series_instance_paths(uid, skip=sent or 0)
                if sent is None:  # first sight: worth it only if a rule would run a model
                    models = tuple(dict.fromkeys(plan.model for plan in self._plans(uid, new)))
                    sent = self._sent[uid] = 0 if models else _NO_MODEL
                    if sent == _NO_MODEL:
                        continue
                    self._models[uid] = models
                if new and self._pool.prefetch(uid, tuple(new), self._models.get(uid, ())):
                    self._sent[uid] = sent + len(new)
            except Exception:  # best effort: the job reads whatever was not prefetched
                log.debug("no prefetch for series %s", uid, exc_info=True)
                self._sent[uid] = _NO_MODEL


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return "an unknown time"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _nothing() -> None:
    pass


class Scheduler:
    """Assembly, routing, job dispatch, prefetch and job outcomes, one `step` at a time.

    ``make_spec``: a job's spec for a worker (`JobSpecs`); ``results_ready``: called when
    a job recorded results to deliver; ``wake``: a socket whose byte ends ``step``'s wait
    for job outcomes early (an association released: its series may be complete now);
    ``health``: the start-time model checks: a job of a model they found broken fails at
    once with the reason (one whose check has not finished runs as usual: a broken model
    fails it in its worker, and the receiving of images never waits for a check).
    """

    def __init__(
        self,
        index: SchedulingIndex,
        pool: Pool,
        rules: LiveRules,
        assembly: AssemblyPolicy,
        make_spec: Callable[..., JobSpec],
        max_job_attempts: int,
        results_ready: Callable[[], None] = _nothing,
        wake: socket.socket | None = None,
        health: Health | None = None,
        max_concurrent: Mapping[str, int] | None = None,
    ) -> None:
        self.index = index
        self.pool = pool
        self.rules = rules
        self.assembly = assembly
        self.make_spec = make_spec
        self.max_job_attempts = max_job_attempts
        self.results_ready = results_ready
        self.wake = wake
        self.health = health
        self.max_concurrent = dict(max_concurrent or {})  # model id -> running jobs at most
        self.prefetcher = Prefetcher(index, pool, lambda uid, paths: self.plan(uid, paths)[0])
        self._pending: list[PendingSeries] = []
        self._pending_version: tuple[int, int] | None = None
        self._studies_version: tuple[int, int] | None = None
        self._next_deadline = math.inf  # of the studies waiting for roles

    def step(self, now: float, wait: float = 0.0) -> None:
        """One round at time ``now``; waits up to ``wait`` seconds for a job outcome."""
        self.rules.reload_if_changed()
        pending = self._pending_series()
        routed = set()
        for start in self.assembly.runnable(pending, now):
            self._start_run(start, now)
            routed.add(start.series.series_instance_uid)
        self._decide_studies(now)
        self._dispatch_jobs()
        self.prefetcher.arriving([s for s in pending if s.series_instance_uid not in routed])
        for outcome in self.pool.poll(timeout=wait, wake=self.wake):
            self._record(outcome)

    def plan(self, series_uid: str, paths: list[Path]) -> tuple[list[RunPlan], list[str]]:
        """What the rules say for the series' batch whose last instance is ``paths[-1]``:
        runs to make, and why."""
        header = dcmread(paths[-1], stop_before_pixels=True)
        senders = self.index.series_senders(series_uid)
        return plan_runs(header, senders, self.rules.by_called_ae())

    def _pending_series(self) -> list[PendingSeries]:
        """The index's pending series, queried again only when the index changed: the
        scheduler asks every round, and the query holds the interpreter lock that the
        receiving threads need."""
        version = self.index.version()
        if version != self._pending_version:
            self._pending = self.index.pending_series()
            self._pending_version = version
        return self._pending

    def _start_run(self, start: RunStart, now: float) -> None:
        uid = start.series.series_instance_uid
        self.prefetcher.forget(uid)
        paths = self.index.series_instance_paths(uid)
        missing, purged_at = self.index.purged_shortfall(uid)
        if missing:
            # The rest of the series was purged: a run on what is here would replace the
            # results made from all of it (store/retention.py).
            note = (
                f"not run: its earlier instances were purged at {_utc(purged_at)} after their "
                f"results were delivered, and {missing} of them have not come back; send the "
                "whole series again to run it"
            )
            self.index.start_run(uid, [], note)
            log.warning("series %s (%d new instances): %s", uid, len(paths), note)
            return
        plans, notes = self.plan(uid, paths)
        note = "; ".join(notes) or "no rule matched"
        hold_until = start.hold_until if plans else None
        job_ids = self.index.start_run(uid, plans, note, hold_until, claimed=bool(notes))
        studies = [p.rule for p in plans if p.study is not None]
        if studies:
            log.info(
                "series %s complete (%d instances): an input of study rule(s) %s",
                uid,
                len(paths),
                ", ".join(studies),
            )
        if not job_ids:
            if not studies:
                log.info(
                    "series %s complete (%d instances): %s; kept, not processed",
                    uid,
                    len(paths),
                    note,
                )
            return
        log.info(
            "series %s complete (%d instances%s): jobs %s by %s",
            uid,
            len(paths),
            ""
            if hold_until is None
            else ", its one association released: started early, results held "
            f"{max(0.0, hold_until - now):.1f} s for late instances",
            job_ids,
            ", ".join(p.rule for p in plans if p.study is None),
        )

    def _decide_studies(self, now: float) -> None:
        """Start, fail or note the studies whose members changed or whose deadline came
        (routing/studies.py has the rule). Asked again only when the index changed or a
        deadline is due."""
        version = self.index.version()
        if version == self._studies_version and now < self._next_deadline:
            return
        for study in self.index.studies_to_decide(now):
            self._decide_study(study, now)
        self._studies_version = self.index.version()
        self._next_deadline = self.index.next_study_deadline()

    def _decide_study(self, study: StudyWait, now: float) -> None:
        rules = self.rules.by_called_ae().get(study.called_ae)
        rule = None
        if rules is not None:
            rule = next((r for r in rules.rules if r.name == study.rule and r.study), None)
        if rule is None or rule.study is None:
            note = f"rule {study.rule} is no longer a study rule of {study.called_ae}"
            self.index.settle_study(study, "dropped", note)
            log.warning("study %s: %s; not run", study.study_instance_uid, note)
            return
        decision = decide(rule.study, study.members, study.deadline_at, now, study.last_run)
        for line in decision.selection.notes:
            log.info("study %s, rule %s: %s", study.study_instance_uid, study.rule, line)
        if decision.action == "start":
            roles = [
                (role, None if member is None else member.series_instance_uid)
                for role, member in decision.selection.chosen
            ]
            job_id = self.index.start_study_run(
                study,
                roles,
                rule.study.reference_role,
                rule.study.input,
                decision.selection.key,
                decision.note,
                decision.hold_until,
            )
            log.info(
                "study %s, rule %s: job %d (run %d): %s",
                study.study_instance_uid,
                study.rule,
                job_id,
                study.runs + 1,
                decision.note,
            )
        elif decision.action == "fail":
            job_id_failed = self.index.settle_study(study, "failed", decision.note)
            log.error(
                "study %s, rule %s: job %s failed: %s",
                study.study_instance_uid,
                study.rule,
                job_id_failed,
                decision.note,
            )
        elif decision.action == "wait":
            state = "overdue" if now >= study.deadline_at else "waiting"
            self.index.settle_study(study, state, decision.note)
            log.info("study %s, rule %s: %s", study.study_instance_uid, study.rule, decision.note)
        else:
            self.index.settle_study(study, study.state, decision.note)

    def _dispatch_jobs(self) -> None:
        for job in self.index.claim_pending_jobs(self.pool.idle(), self.max_concurrent):
            self._dispatch(job)

    def _dispatch(self, job: JobRecord) -> None:
        if self.health is not None:
            reason = self.health.broken(job.model)
            if reason is not None:
                # Known before any worker loads it: the job fails now, with the reason.
                reason = f"model {job.model} is broken: {reason}"
                self.index.fail_job(job.id, reason, retry=False)
                log.error(
                    "job %d (%s on series %s) failed: %s",
                    job.id,
                    job.model,
                    job.series_instance_uid,
                    reason,
                )
                return
        paths = tuple(self.index.series_instance_paths(job.series_instance_uid))
        if not job.roles:
            self.pool.submit(self.make_spec(job, paths))
            return
        role_paths = {
            uid: tuple(self.index.series_instance_paths(uid)) for _, uid in job.roles if uid
        }
        self.pool.submit(self.make_spec(job, paths, role_paths))

    def _record(self, outcome: JobOutcome) -> None:
        job = self.index.job(outcome.job_id)
        ran_on = outcome.ran_on or None
        where = f" on cluster node {ran_on}" if ran_on else ""
        if outcome.ok:
            self.index.finish_job(
                job.id, outcome.files, job.destinations, dict(outcome.stages), ran_on
            )
            log.info("job %d done in %.1f s%s", job.id, outcome.seconds, where)
            self.results_ready()
            return
        retry = outcome.retry and job.attempts < self.max_job_attempts
        self.index.fail_job(job.id, outcome.reason, retry=retry, ran_on=ran_on)
        log.error(
            "job %d (%s on series %s) failed%s%s: %s",
            job.id,
            job.model,
            job.series_instance_uid,
            where,
            ", will retry" if retry else "",
            outcome.reason,
        )

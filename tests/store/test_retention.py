"""Retention on a real spool and index: what goes when, what never goes, the two-step purge
and its sweep, late instances of a purged series, pruning and compaction.

Time is moved by the purger's clock (``Clock``); the index stamps rows with the real time,
so "an hour later" is the clock an hour ahead of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_ai.errors import StorageError
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.store.retention import Purger, RetentionPolicy, sweep
from dicom_ai.store.spool import Spool
from dicom_ai.store.states import IllegalTransition

HOUR = 3600.0
POLICY = RetentionPolicy(
    keep_sources_seconds=1 * HOUR,
    keep_results_seconds=2 * HOUR,
    keep_unrouted_seconds=3 * HOUR,
    keep_records_seconds=10 * HOUR,
)
CT = "1.2.840.10008.5.1.4.1.1.2"


class Clock:
    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


class Store:
    """A spool and an index with series, runs, results and deliveries made through the
    index's own methods, as the node makes them."""

    def __init__(self, root: Path, policy: RetentionPolicy = POLICY) -> None:
        self.spool = Spool(root / "spool")
        self.index = Index(root / "index.sqlite3")
        self.clock = Clock()
        self.purger = Purger(
            Index(root / "index.sqlite3"), self.spool, policy, pause=0,
            clock=self.clock,
        )  # fmt: skip
        self.association = self.index.open_association("CT", "DICOM_AI", "127.0.0.1")

    def receive(self, series: str, count: int, first: int = 1) -> list[Path]:
        paths = []
        for n in range(first, first + count):
            path = self.spool.instance_path("1.2.9", series, f"{series}.{n}")
            self.spool.write_atomic(path, b"x" * 1000)
            self.index.add_instance(
                InstanceRecord(f"{series}.{n}", CT, series, "1.2.9", "CT", path,
                               self.association, size=1000)
            )  # fmt: skip
            paths.append(path)
        return paths

    def run(self, series: str, model: str | None = "m") -> int | None:
        plans = [RunPlan("rule", model, ("pacs",))] if model else []
        job_ids = self.index.start_run(series, plans, "note", claimed=model is not None)
        if not job_ids:
            return None
        (job,) = self.index.claim_pending_jobs(1)
        return job.id

    def finish(self, job_id: int) -> Path:
        folder = self.spool.results_dir(job_id)
        self.spool.write_atomic(folder / "seg.dcm", b"s" * 500)
        self.index.finish_job(job_id, [folder / "seg.dcm"], ["pacs"])
        return folder

    def delivery(self, job_id: int) -> int:
        return next(d.id for d in self.index.deliveries() if d.job_id == job_id)

    def delivered_series(self, series: str, count: int = 3) -> tuple[list[Path], int, Path]:
        paths = self.receive(series, count)
        job_id = self.run(series)
        assert job_id is not None
        folder = self.finish(job_id)
        self.index.delivery_succeeded(self.delivery(job_id))
        return paths, job_id, folder


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def test_delivered_sources_and_results_go_after_their_time_not_before(store: Store) -> None:
    paths, _job_id, folder = store.delivered_series("1.1")
    assert not store.purger.purge()
    store.clock.ahead = 1.1 * HOUR
    report = store.purger.purge()
    assert (report.series, report.instances, report.instance_bytes) == (1, 3, 3000)
    assert report.jobs == 0 and folder.exists()
    assert not any(p.exists() for p in paths)
    assert not paths[0].parent.exists() and not paths[0].parent.parent.exists()
    store.clock.ahead = 2.1 * HOUR
    report = store.purger.purge()
    assert (report.jobs, report.result_bytes) == (1, 500)
    assert not folder.exists()
    counted = {
        labels: value
        for name, labels, value in store.index.metric_values().counters
        if name == "dicom_ai_purged_bytes_total"
    }
    assert counted == {(("kind", "results"),): 500.0, (("kind", "sources"),): 3000.0}


def test_nothing_undelivered_goes_whatever_the_age_or_pressure(tmp_path: Path) -> None:
    store = Store(tmp_path, RetentionPolicy(0, 0, 0, 0, emergency_free_bytes=1 << 62))
    pending = store.receive("2.1", 2)  # still receiving: not routed
    running_paths = store.receive("2.2", 2)
    assert store.run("2.2") is not None  # job running
    backing_off, _job_b, folder_b = store.delivered_series("2.3")
    # A second run's delivery backing off holds both runs' sources and its own results.
    store.receive("2.3", 1, first=9)
    job_b2 = store.run("2.3")
    assert job_b2 is not None
    folder_b2 = store.finish(job_b2)
    store.index.delivery_failed(store.delivery(job_b2), "refused", time.time() + 60)
    dead_paths = store.receive("2.4", 2)
    job_d = store.run("2.4")
    assert job_d is not None
    folder_d = store.finish(job_d)
    store.index.delivery_failed(store.delivery(job_d), "refused", None)
    store.clock.ahead = 1000 * HOUR
    store.purger.relieve()
    store.purger.purge()
    for path in pending + running_paths + backing_off + dead_paths:
        assert path.exists(), path
    assert folder_b2.exists() and folder_d.exists()
    assert not folder_b.exists()  # superseded by run 2: nothing will send it
    usage = store.index.storage_usage()
    reasons = {h.reason: h.count for h in usage.held_back}
    assert reasons == {
        "sources: series still receiving or not yet routed": 1,
        "sources: a job pending or running": 1,
        "sources: a delivery pending or backing off": 1,
        "sources: a delivery in dead letter": 1,
        "results: a delivery pending or backing off": 1,
        "results: a delivery in dead letter": 1,
    }
    # Discarded by an operator: the dead letter's results and sources may go.
    assert store.index.discard_delivery(store.delivery(job_d))
    store.purger.purge()
    assert not folder_d.exists() and not any(p.exists() for p in dead_paths)


def test_unrouted_and_failed_series_have_their_own_clocks(store: Store) -> None:
    unrouted = store.receive("3.1", 2)
    store.run("3.1", model=None)
    failed = store.receive("3.2", 2)
    job_id = store.run("3.2")
    assert job_id is not None
    store.index.fail_job(job_id, "model raised", retry=False)
    store.clock.ahead = 1.1 * HOUR
    store.purger.purge()
    assert all(p.exists() for p in unrouted)
    assert not any(p.exists() for p in failed)
    assert not store.index.rerun_job(job_id)  # its series is gone: no rerun on nothing
    store.clock.ahead = 3.1 * HOUR
    store.purger.purge()
    assert not any(p.exists() for p in unrouted)


def test_a_purge_killed_between_its_steps_is_finished_by_the_sweep(store: Store) -> None:
    paths, job_id, folder = store.delivered_series("4.1")
    store.clock.ahead = 5 * HOUR
    # The first steps only, as if killed right after them.
    assert store.purger.index.mark_sources_purged(["4.1"]) == ["4.1"]
    assert store.purger.index.mark_results_purged([job_id]) == [job_id]
    assert all(p.exists() for p in paths) and folder.exists()
    orphan = store.spool.results_dir(999)  # a job pruned from the index
    store.spool.write_atomic(orphan / "sr.dcm", b"r")
    report = sweep(store.index, store.spool, empty_folders=True)
    assert (report.series, report.result_folders) == (1, 2)
    assert not any(p.exists() for p in paths) and not folder.exists() and not orphan.exists()
    assert store.index.counts()["instances"] == 0


def test_a_late_instance_of_a_purged_series_never_runs_on_part_of_it(store: Store) -> None:
    _paths, _job_id, _ = store.delivered_series("5.1", count=3)
    store.clock.ahead = 1.1 * HOUR
    store.purger.purge()
    store.receive("5.1", 3, first=7)  # new instances, acknowledged and kept
    assert store.index.purged_shortfall("5.1")[0] == 3  # none of the 3 purged came back
    assert store.index.not_run_for_purge() == [("5.1", 3, 3)]  # dicom-ai status says it
    store.receive("5.1", 2)
    assert store.index.purged_shortfall("5.1")[0] == 1
    with pytest.raises(IllegalTransition):
        store.index.start_run("5.1", [RunPlan("rule", "m", ("pacs",))], "note")
    # The whole series sent again: it runs, and the purge is forgotten.
    store.receive("5.1", 3)
    assert store.index.purged_shortfall("5.1") == (0, pytest.approx(time.time(), abs=5))
    assert store.run("5.1") is not None
    assert store.index.purged_shortfall("5.1") == (0, None)


def test_a_file_written_again_during_a_purge_is_refused_not_acknowledged(store: Store) -> None:
    paths, _, _ = store.delivered_series("6.1", count=2)
    store.clock.ahead = 1.1 * HOUR
    assert store.purger.index.mark_sources_purged(["6.1"]) == ["6.1"]
    store.spool.write_atomic(paths[0], b"again")  # a resend, written, not yet indexed
    store.purger.index.remove_purged_sources("6.1", store.spool.remove_instance_files)
    with pytest.raises(StorageError, match="send it again"):
        store.index.add_instance(
            InstanceRecord("6.1.1", CT, "6.1", "1.2.9", "CT", paths[0], store.association)
        )
    store.receive("6.1", 1)  # sent again: written into a folder made again, acknowledged
    assert paths[0].exists()


def test_old_rows_are_pruned_and_their_pages_given_back(store: Store) -> None:
    for n in range(40):
        store.delivered_series(f"7.{n}", count=2)
    store.clock.ahead = 3 * HOUR
    store.purger.purge()
    before = store.index.counts()
    plan = store.purger.plan()
    assert not plan.sources and not plan.results and plan.records["series"] == 0
    store.clock.ahead = 14 * HOUR
    plan = store.purger.plan()
    # The newest job and delivery stay (their ids are never given again): 39 of 40 series.
    assert plan.records["series"] == 39 and store.index.counts() == before
    pages = _pages(store.index)
    report = store.purger.purge()
    assert report.records["series"] == 39 and report.records["jobs"] == 39
    assert report.records["delivery_attempts"] == 39
    counts = store.index.counts()
    assert counts["series"] == 1 and counts["jobs.done"] == 1
    assert _pages(store.index) <= pages


def _pages(index: Index) -> int:
    return int(index._query("PRAGMA page_count")[0][0])


def test_purge_cli_shows_then_deletes_and_status_says_what_is_held_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from typer.testing import CliRunner

    from dicom_ai.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    store = Store(tmp_path)
    paths, _, folder = store.delivered_series("8.1")
    held = store.receive("8.2", 2)
    job_id = store.run("8.2")
    assert job_id is not None
    store.finish(job_id)
    dead = store.delivery(job_id)
    store.index.delivery_failed(dead, "refused", None)
    config = tmp_path / "node.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"data_dir": str(tmp_path), "min_free_bytes": 0},
                "storage": {"keep_sources_hours": 0, "keep_results_hours": 0},
            }
        )
    )
    runner = CliRunner()
    shown = runner.invoke(app, ["purge", "--dry-run", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    rows = {
        cells[0]: cells[1:]
        for line in shown.output.splitlines()
        if "│" in line
        for cells in [[c.strip() for c in line.strip("│ ").split("│")]]
    }
    assert rows["received instances (series)"] == ["1", "3", "3.0 kB"]
    assert rows["results (jobs)"] == ["1", "", "500 bytes"]
    assert rows["index rows: series"][0] == "0"
    assert "held back: 1 (2.0 kB), sources: a delivery in dead letter" in shown.output
    assert all(p.exists() for p in paths) and folder.exists()
    done = runner.invoke(app, ["purge", "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert "purged sources of 1 series (3 files, 0.0 MB), results of 1 jobs" in done.output
    assert not any(p.exists() for p in paths) and not folder.exists()
    assert all(p.exists() for p in held)
    status = runner.invoke(app, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert "spool: 2.5 kB (2 received instances, 2.0 kB; results of 1 jobs, 500 bytes)" in (
        status.output
    )
    assert "held back: 1 (500 bytes), results: a delivery in dead letter" in status.output
    refused = runner.invoke(app, ["discard", "12345", str(dead), "--config", str(config)])
    assert refused.exit_code == 1 and "not dead letters, left as they are: 12345" in (
        refused.output
    )
    assert "1 dead-letter deliveries discarded" in refused.output
    runner.invoke(app, ["purge", "--config", str(config)])
    assert not any(p.exists() for p in held)


def test_emergency_threshold_must_be_above_the_refusal_watermark() -> None:
    from pydantic import ValidationError

    from dicom_ai.config import Config

    with pytest.raises(ValidationError, match=r"must be above node\.min_free_bytes"):
        Config.model_validate(
            {"node": {"min_free_bytes": 100}, "storage": {"emergency_free_bytes": 100}}
        )
    config = Config.model_validate(
        {"node": {"min_free_bytes": 100}, "storage": {"emergency_free_bytes": 101}}
    )
    policy = RetentionPolicy.from_config(config.storage)
    assert (policy.keep_sources_seconds, policy.keep_records_seconds) == (24 * HOUR, 90 * 24 * HOUR)
    assert policy.emergency_free_bytes == 101

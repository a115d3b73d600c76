"""Crash safety of a purge: ``dicom-ai purge`` is killed with SIGKILL at random moments while
it deletes, and the index never names a file that is gone unless the row says the file is
being purged; the next start's sweep leaves no orphan (store/retention.py).

A data directory is filled through the index's own methods, as the node fills it: many
delivered series of many small instance files with a results folder each, some unrouted
series and series whose job failed (all purgeable at once: every ``keep_*`` is zero), and
series that must never go: one with a delivery backing off, one with a dead letter. Then
``dicom-ai purge`` runs again and again, each run killed at a point drawn by a seeded
``random.Random`` (``DICOM_AI_PURGE_CRASH_SEED``, default 1; ``-s`` prints the schedule):

- ``marked``: as soon as a mark is committed (instance rows purged = 1), before or right
  after its first files go;
- ``unlink``: the purge kills itself right before a random one of its unlinks of instance
  files (in the first batch of series it purges): inside the transaction that deletes a
  series' files and rows, some files gone and some not;
- ``file``: as soon as a random one of the instance files not yet marked is gone from the
  disk, seen from outside;
- ``sources``: after a random number of instance rows went (a kill right after a commit);
- ``results-marked``: as soon as the first job's results are marked;
- ``unlink-results``: right before a random one of its unlinks of result files;
- ``results``: after a random number of result folders went;
- ``pruning``: a random few milliseconds after the last result folder went, while old
  index rows are pruned and the index compacted.

After each kill, on the index read only and the disk: every instance row not marked purged
names a file that is there, every file under ``spool/instances`` has a row (a file goes
before its row), every job whose results are not marked has its result files, and the
undelivered series have every row and file they had. One purge then runs to its end (it
does not sweep: what the kills left is still there), and the node starts on the data
directory with long retention, so that nothing is purged anew: the sweep of its recovery
must finish what the kills left: no row marked purged, no instance file without a row or of
a purged series, no result folder of a purged or pruned job, no empty folder, and the
undelivered series intact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.store.spool import Spool
from tests.peers import NodeProcess, free_port, node_config

pytestmark = [pytest.mark.slow]

SEED = int(os.environ.get("DICOM_AI_PURGE_CRASH_SEED", "1"))
CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.8.498.7777"
DELIVERED, FILES_PER_SERIES, FILE_BYTES = 480, 12, 2048
BATCH = 100  # series a purge marks per transaction (Purger.batch)
UNROUTED, FAILED = 12, 12
KILL_PLAN = (
    "marked",
    "unlink",
    "file",
    "sources",
    "unlink",
    "results-marked",
    "unlink-results",
    "results",
    "pruning",
)
KILL_TIMEOUT = 60  # for one kill point to come
POLL = 0.002


@dataclass
class Kept:
    """A series that must survive every kill and sweep, with what it has."""

    series_uid: str
    delivery_state: str
    instance_paths: list[Path]
    result_paths: list[Path]


@dataclass
class Data:
    data_dir: Path
    spool: Path
    kept: list[Kept] = field(default_factory=list)
    purgeable_series: set[str] = field(default_factory=set)
    purgeable_instances: int = 0
    purgeable_jobs: int = 0


def _fill(data_dir: Path) -> Data:
    """The data directory as a node leaves it after many studies, built with the index's
    methods; instance and result files are written plainly (the purge does not read them)."""
    spool = Spool(data_dir / "spool")
    index = Index(data_dir / "index.sqlite3")
    data = Data(data_dir, spool.root)
    association = index.open_association("CT", "DICOM_AI", "127.0.0.1")
    payload = b"\0" * FILE_BYTES

    def receive(study: str, series: str) -> list[Path]:
        paths = []
        for n in range(1, FILES_PER_SERIES + 1):
            path = spool.instance_path(study, series, f"{series}.{n}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)
            index.add_instance(
                InstanceRecord(f"{series}.{n}", CT, series, study, "CT", path, association,
                               size=FILE_BYTES)
            )  # fmt: skip
            paths.append(path)
        return paths

    def run_job(series: str) -> int:
        (job_id,) = index.start_run(series, [RunPlan("ct-body", "ct-body", ("pacs",))], "ct-body")
        (job,) = index.claim_pending_jobs(1)
        assert job.id == job_id
        return job_id

    def finish(job_id: int) -> tuple[list[Path], int]:
        folder = spool.results_dir(job_id)
        folder.mkdir(parents=True)
        files = [folder / "seg.dcm", folder / "sr.dcm"]
        for f in files:
            f.write_bytes(b"r" * 4096)
        index.finish_job(job_id, files, ["pacs"])
        (delivery,) = (d.id for d in index.deliveries() if d.job_id == job_id)
        return files, delivery

    for s in range(1, DELIVERED + UNROUTED + FAILED + 3):
        study, series = f"{UID}.{s}", f"{UID}.{s}.1"
        paths = receive(study, series)
        if s == 1 or s == DELIVERED // 2:  # undelivered: never purged, whatever happens
            files, delivery = finish(run_job(series))
            if s == 1:
                index.delivery_failed(delivery, "refused", time.time() + 3600)
                state = "pending"
            else:
                index.delivery_failed(delivery, "refused", None)
                state = "dead"
            data.kept.append(Kept(series, state, paths, files))
            continue
        if s <= DELIVERED + 2:
            files, delivery = finish(run_job(series))
            index.delivery_succeeded(delivery)
            data.purgeable_jobs += 1
        elif s <= DELIVERED + 2 + UNROUTED:
            assert index.start_run(series, [], "no rule matched", claimed=False) == []
        else:
            index.fail_job(run_job(series), "model raised", retry=False)
        data.purgeable_series.add(series)
        data.purgeable_instances += len(paths)
    index.close_association(association)
    index.close()
    return data


class Probe:
    """Read-only looks at the index and the spool while a purge runs or after it died."""

    def __init__(self, data: Data) -> None:
        self.data = data
        self.db = sqlite3.connect(
            f"file:{data.data_dir / 'index.sqlite3'}?mode=ro", uri=True, timeout=30
        )

    def close(self) -> None:
        self.db.close()

    def one(self, sql: str, *args: Any) -> int:
        return int(self.db.execute(sql, args).fetchone()[0])

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, args).fetchall()

    def result_folders(self) -> int:
        return len(os.listdir(self.data.spool / "results"))

    def figures(self) -> dict[str, int]:
        return {
            "instance rows": self.one("SELECT COUNT(*) FROM instances"),
            "marked purged": self.one("SELECT COUNT(*) FROM instances WHERE purged = 1"),
            "jobs": self.one("SELECT COUNT(*) FROM jobs"),
            "results marked": self.one(
                "SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NOT NULL"
            ),
            "result folders": self.result_folders(),
            "series rows": self.one("SELECT COUNT(*) FROM series"),
        }


def _files_on_disk(spool: Path) -> set[Path]:
    return set((spool / "instances").glob("*/*/*.dcm"))


def _check_consistent(probe: Probe, data: Data, when: str) -> None:
    """What must hold at any moment, a kill included."""
    rows = probe.rows("SELECT path, purged FROM instances")
    on_disk = _files_on_disk(data.spool)
    missing = [p for p, purged in rows if not purged and Path(p) not in on_disk]
    assert not missing, f"{when}: {len(missing)} unpurged instance rows lost their file"
    indexed = {Path(p) for p, _ in rows}
    orphans = on_disk - indexed
    assert not orphans, f"{when}: {len(orphans)} instance files have no row (a file outlived it)"
    for job_id, files in probe.rows(
        "SELECT id, result_files FROM jobs WHERE results_purged_at IS NULL "
        "AND result_files IS NOT NULL"
    ):
        gone = [f for f in json.loads(files) if not Path(f).exists()]
        assert not gone, f"{when}: job {job_id}'s results are not marked purged, yet {gone} gone"
    for delivery_id, files in probe.rows(
        "SELECT id, files FROM deliveries WHERE state IN ('pending', 'dead')"
    ):
        gone = [f for f in json.loads(files) if not Path(f).exists()]
        assert not gone, f"{when}: undelivered delivery {delivery_id} lost {gone}"
    _check_kept(probe, data, when)


def _check_kept(probe: Probe, data: Data, when: str) -> None:
    for kept in data.kept:
        rows = probe.rows(
            "SELECT path, purged FROM instances WHERE series_instance_uid = ? ORDER BY path",
            kept.series_uid,
        )
        assert sorted((Path(p), purged) for p, purged in rows) == sorted(
            (p, 0) for p in kept.instance_paths
        ), f"{when}: the {kept.delivery_state} series lost instance rows"
        lost = [p for p in kept.instance_paths + kept.result_paths if not p.is_file()]
        assert not lost, f"{when}: the {kept.delivery_state} series lost files {lost}"
        (state,) = probe.rows(
            "SELECT d.state FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE j.series_instance_uid = ?",
            kept.series_uid,
        )
        assert state == (kept.delivery_state,), when
        assert probe.one(
            "SELECT has_sources FROM series WHERE series_instance_uid = ?", kept.series_uid
        ), when


# ``dicom-ai purge`` that SIGKILLs itself right before its N-th os.unlink (Path.unlink and
# shutil.rmtree both call it): a kill point exact to the file, inside a purge's transaction.
_KILL_AT_UNLINK = """
import os, runpy, signal, sys
kill_at = int(sys.argv.pop(1))
unlink = os.unlink
calls = 0
def counting_unlink(*args, **kwargs):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return unlink(*args, **kwargs)
os.unlink = counting_unlink
sys.argv[0] = "dicom-ai"
runpy.run_module("dicom_ai.cli", run_name="__main__")
"""


class PurgeRun:
    """One ``dicom-ai purge`` process, killed when ``trigger`` says so, or by itself before
    its ``kill_at_unlink``-th unlink."""

    def __init__(self, config_path: Path, log: Path, kill_at_unlink: int | None = None) -> None:
        command = ["purge", "--config", str(config_path)]
        if kill_at_unlink is None:
            command = ["-m", "dicom_ai.cli", *command]
        else:
            command = ["-c", _KILL_AT_UNLINK, str(kill_at_unlink), *command]
        self.proc = subprocess.Popen(
            [sys.executable, *command], stdout=log.open("ab"), stderr=subprocess.STDOUT
        )

    def kill_when(self, trigger: Any, timeout: float) -> bool:
        """SIGKILL as soon as ``trigger()``; False when the purge ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if trigger():
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                return self.proc.returncode == -signal.SIGKILL
            if self.proc.poll() is not None:
                return False
            time.sleep(POLL)
        self.proc.kill()
        self.proc.wait(timeout=10)
        raise TimeoutError(f"no kill point within {timeout} s")


def _unlink_point(kind: str, probe: Probe, rng: random.Random) -> tuple[int, str]:
    """Which unlink of the next purge to kill before: one of the first batch of series it
    purges (``unlink``), or one of the results after every source (``unlink-results``)."""
    kept = [k.series_uid for k in probe.data.kept]
    sources = probe.one(
        "SELECT COUNT(*) FROM instances WHERE purged = 0 AND series_instance_uid NOT IN "
        f"({', '.join('?' * len(kept))})",
        *kept,
    )
    if kind == "unlink":
        assert sources > 1, "no purgeable instance left for this kill: KILL_PLAN asks too much"
        n = rng.randint(2, min(sources, BATCH * FILES_PER_SERIES))
        return n, f"before unlink {n} of the {sources} instance files it may delete"
    n = sources + rng.randint(1, 100)  # two files per result folder
    return n, f"before unlink {n - sources} of the result files, after {sources} instance files"


def _trigger(kind: str, probe: Probe, rng: random.Random) -> tuple[Any, str]:
    """The predicate that says when to kill, and what it waits for."""
    start = probe.figures()
    if kind == "marked":
        marked_rows = start["marked purged"]
        return (
            lambda: probe.one("SELECT COUNT(*) FROM instances WHERE purged = 1") > marked_rows,
            "the first mark committed",
        )
    if kind == "file":
        # One of the series the purge marks first (the oldest), so later kills have some left.
        kept = [k.series_uid for k in probe.data.kept]
        paths = sorted(
            Path(p)
            for (p,) in probe.rows(
                "SELECT path FROM instances WHERE purged = 0 AND series_instance_uid IN ("
                " SELECT series_instance_uid FROM series WHERE has_sources = 1"
                f" AND series_instance_uid NOT IN ({', '.join('?' * len(kept))})"
                " ORDER BY routed_at LIMIT ?)",
                *kept,
                BATCH,
            )
        )
        assert paths, "no purgeable instance left for this kill: KILL_PLAN asks too much"
        path = rng.choice(paths)
        return lambda: not path.exists(), f"instance file {path.name} gone from the disk"
    if kind == "sources":
        # Rows marked by an earlier kill go only at the sweep: not counted.
        left = probe.one("SELECT COUNT(*) FROM instances WHERE purged = 0") - sum(
            len(k.instance_paths) for k in probe.data.kept
        )
        assert left > 0, "no purgeable instance left for this kill: KILL_PLAN asks too much"
        drop = rng.randint(1, min(left, BATCH * FILES_PER_SERIES) * 2 // 3)
        target = start["instance rows"] - drop
        return (
            lambda: probe.one("SELECT COUNT(*) FROM instances") <= target,
            f"{drop} of {left} purgeable instance rows gone",
        )
    if kind == "results-marked":
        marked = start["results marked"]
        return (
            lambda: (
                probe.one("SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NOT NULL") > marked
            ),
            "the first results mark committed",
        )
    if kind == "results":
        # Folders of jobs marked by an earlier kill go only at the sweep: not counted.
        unmarked = probe.one(
            "SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NULL AND result_files IS NOT "
            "NULL AND id NOT IN (SELECT job_id FROM deliveries WHERE state IN ('pending', 'dead'))"
        )
        drop = rng.randint(1, max(1, unmarked * 2 // 3))
        target = start["result folders"] - drop
        return (
            lambda: probe.result_folders() <= target,
            f"{drop} of {unmarked} purgeable result folders gone",
        )
    assert kind == "pruning"
    delay = rng.uniform(0.0, 0.03)
    floor = start["result folders"] - probe.one(
        "SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NULL AND result_files IS NOT "
        "NULL AND id NOT IN (SELECT job_id FROM deliveries WHERE state IN ('pending', 'dead'))"
    )
    reached: list[float] = []

    def pruning() -> bool:
        if not reached and probe.result_folders() <= floor:
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() - reached[0] >= delay

    return pruning, f"{delay * 1000:.0f} ms after the last result folder went"


def test_purge_killed_at_random_moments_needs_no_missing_file_and_leaves_no_orphan(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    t0 = time.monotonic()
    data = _fill(tmp_path / "node" / "data")
    built = time.monotonic() - t0
    config = node_config(
        tmp_path / "node",
        free_port(),  # no PACS: nothing is delivered here
        storage={
            "keep_sources_hours": 0,
            "keep_results_hours": 0,
            "keep_unrouted_hours": 0,
            "keep_records_days": 0,
        },
    )
    config_path = tmp_path / "purge.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "purge.log"
    probe = Probe(data)
    before = probe.figures()
    print(
        f"\nseed {SEED}: {DELIVERED + UNROUTED + FAILED + 2} series built in {built:.1f} s, "
        f"{before['instance rows']} instance files, {before['result folders']} result "
        f"folders; {len(data.purgeable_series)} series purgeable, 2 undelivered"
    )
    _check_consistent(probe, data, "before")

    killed = 0
    for n, kind in enumerate(KILL_PLAN, 1):
        started = time.monotonic()
        if kind.startswith("unlink"):
            at, what = _unlink_point(kind, probe, rng)
            run = PurgeRun(config_path, log, kill_at_unlink=at)
            run.proc.wait(timeout=KILL_TIMEOUT)
            hit = run.proc.returncode == -signal.SIGKILL
        else:
            trigger, what = _trigger(kind, probe, rng)
            run = PurgeRun(config_path, log)
            hit = run.kill_when(trigger, KILL_TIMEOUT)
        killed += hit
        seen = probe.figures()
        print(
            f"kill {n} ({kind}, {what}): "
            f"{'killed' if hit else 'purge ended first'} after "
            f"{time.monotonic() - started:.2f} s; " + ", ".join(f"{k} {v}" for k, v in seen.items())
        )
        _check_consistent(probe, data, f"after kill {n} ({kind})")
    # Every kill but the last (whose point may come after the purge's end) hit a purge.
    assert killed >= len(KILL_PLAN) - 1, log.read_text(errors="replace")

    # What the kills left for the sweep: marked rows, folders of purged jobs.
    left = probe.figures()
    kept_jobs = {int(Path(k.result_paths[0]).parent.name) for k in data.kept}
    marked_jobs = {
        job_id
        for (job_id,) in probe.rows("SELECT id FROM jobs WHERE results_purged_at IS NOT NULL")
    }
    leftover_folders = {int(p.name) for p in (data.spool / "results").iterdir()} & marked_jobs
    print(
        "after the last kill: "
        + ", ".join(f"{k} {v}" for k, v in left.items())
        + f"; result folders of purged jobs {len(leftover_folders)}"
    )
    assert left["marked purged"] + len(leftover_folders) > 0, (
        "the kills left nothing for the sweep: the test proves nothing about it"
    )

    # The node's start: recovery sweeps; long retention, so its cleaner purges nothing.
    node_cfg = dict(config)
    node_cfg["storage"] = {"keep_sources_hours": 1000, "keep_results_hours": 1000}
    node = NodeProcess(tmp_path / "node", node_cfg).start()
    node.stop()
    after = probe.figures()
    print("after the node's start (sweep): " + ", ".join(f"{k} {v}" for k, v in after.items()))
    log_text = node.log_text()
    assert "interrupted purges finished" in log_text, log_text
    assert "cannot be reindexed" not in log_text and "Traceback" not in log_text, log_text
    _check_consistent(probe, data, "after the node's sweep")
    assert after["marked purged"] == 0
    folders = {int(p.name) for p in (data.spool / "results").iterdir()}
    assert not folders & marked_jobs, f"folders of purged jobs: {folders & marked_jobs}"

    # Then one purge to its end (it sweeps first too): only what must stay is left.
    final = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "purge", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert final.returncode == 0, final.stdout + final.stderr
    after = probe.figures()
    print("after a purge to its end: " + ", ".join(f"{k} {v}" for k, v in after.items()))

    _check_consistent(probe, data, "after the sweep")
    assert after["marked purged"] == 0
    kept_series = {k.series_uid for k in data.kept}
    assert {
        uid for (uid,) in probe.rows("SELECT DISTINCT series_instance_uid FROM instances")
    } == kept_series
    on_disk = _files_on_disk(data.spool)
    assert on_disk == {p for k in data.kept for p in k.instance_paths}
    folders = {int(p.name) for p in (data.spool / "results").iterdir()}
    assert folders == kept_jobs, f"result folders of purged or pruned jobs: {folders - kept_jobs}"
    series_dirs = [p for p in (data.spool / "instances").glob("*/*") if p.is_dir()]
    study_dirs = [p for p in (data.spool / "instances").glob("*") if p.is_dir()]
    assert all(any(d.iterdir()) for d in series_dirs + study_dirs), "empty folders left"
    assert len(series_dirs) == len(kept_series)
    assert after["jobs"] >= len(kept_series)
    probe.close()
    print(f"{killed} kills, total {time.monotonic() - t0:.1f} s")

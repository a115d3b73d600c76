"""Retention soak: a week of a busy node compressed into two minutes (store/retention.py).

Retention is set in seconds (sources 3 s after their last delivery, results 5 s, series no
rule claimed 4 s after routing, index rows 10 s after their files went; a cleanup every
0.5 s). For ``SEND_SECONDS`` a modality sends a study every ``STUDY_PERIOD`` seconds (one
storescu association each): a small CT series, which the rules route to the built-in
``ct-body`` model with results to two destinations, and in every ``LOCALIZER_EVERY``-th study
a localizer series, which no rule claims. Both destinations (DCMTK storescp) are down for a
while in the middle, at different times, so deliveries back off and hold their series.

A watcher samples every ``SAMPLE_INTERVAL`` seconds: the bytes and files under the spool,
the index's row counts and file size, which instance files are present; and on each sample,
in one read transaction of the index and right after it, that every file still needed is on
disk: the instance files of a series receiving or waiting to be routed, with a job pending or
running, or with a delivery pending or in dead letter, and the result files of a delivery
pending or in dead letter.

Afterwards:

- the spool and the index level off while studies keep coming: in the last third of the
  sending period they peak at most 1.25 times as high as in the middle third (where the
  outages are; a store that only grows peaks 1.5 times as high), far below what was sent,
  and their fitted growth is small against what was sent in it; figures are printed;
- once sending stops and the destinations are up, everything is delivered, then the spool
  empties and the index's rows are pruned (the rows of the newest job and delivery stay by
  design, `Index.prune_records`);
- every acknowledged instance was seen in the spool and is accounted for: delivered (its
  series' SEG and SR at both destinations reference it) and then purged no sooner than
  ``keep_sources`` after the last of those results arrived, or unrouted (the index said no
  rule claimed its series) and purged no sooner than ``keep_unrouted`` after it was routed;
  none vanished otherwise;
- no needed file was ever missing, and the node log has no traceback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, write_phantom_ct
from tests.peers import (
    NodeProcess,
    RestartableStoreSCP,
    node_config,
    storescu_acked,
)
from tests.results_check import COMPREHENSIVE_3D_SR, SEG_SOP_CLASS, sr_evidence_uids

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

UID_ROOT = "1.2.826.0.1.3680043.8.498.4343"
SEND_SECONDS = 96.0
STUDY_PERIOD = 1.2  # seconds between the starts of two studies
SLICES, LOCALIZER_SLICES = 6, 2
LOCALIZER_EVERY = 3  # every third study also has a localizer series, which no rule claims
# seconds since the first study: (down at, up at) per destination
OUTAGES = {"pacs": (15.0, 35.0), "archive": (26.0, 45.0)}
# keep_unrouted differs from keep_sources, so that using one for the other shows.
KEEP_SOURCES, KEEP_RESULTS, KEEP_UNROUTED, KEEP_RECORDS = 3.0, 5.0, 4.0, 10.0
CLEANUP_INTERVAL = 0.5
SAMPLE_INTERVAL = 0.5
# A missing file counts only when read and stat were this close (retention gives 3 s).
RACE_MARGIN = 2.0
DRAIN_TIMEOUT = 60.0  # after the last study, for all to be delivered, purged and pruned
TABLES = (
    "series",
    "instances",
    "jobs",
    "deliveries",
    "delivery_attempts",
    "associations",
    "series_associations",
    "events",
)

# A series' instance files are needed while it is receiving or not yet routed, has a job
# pending or running, or a delivery pending, backing off or in dead letter.
HOLDS = (
    "  WHEN s.dirty = 1 THEN 'receiving or not yet routed'"
    "  WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.series_instance_uid = s.series_instance_uid"
    "   AND j.state IN ('pending', 'running')) THEN 'a job pending or running'"
    "  WHEN EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id"
    "   WHERE j.series_instance_uid = s.series_instance_uid AND d.state IN ('pending', 'dead'))"
    "   THEN 'a delivery pending or dead'"
)
HELD_SERIES = (
    "SELECT uid, why FROM (SELECT s.series_instance_uid AS uid, CASE"
    + HOLDS
    + " END AS why FROM series s) WHERE why IS NOT NULL"
)
# The instance rows of those series (a purge takes a series' rows with its files).
HELD_INSTANCE_ROWS = (
    "SELECT i.path, i.series_instance_uid FROM instances i WHERE i.series_instance_uid IN ("
    "SELECT uid FROM (SELECT s.series_instance_uid AS uid, CASE"
    + HOLDS
    + " END AS why FROM series s) WHERE why IS NOT NULL)"
)
# Series routed, and no rule claimed them: keep_unrouted counts from their routed_at.
UNROUTED = (
    "SELECT series_instance_uid, routed_at FROM series"
    " WHERE claimed = 0 AND dirty = 0 AND routed_at IS NOT NULL"
)
HELD_RESULTS = "SELECT id, state, files FROM deliveries WHERE state IN ('pending', 'dead')"

RULES = """\
rules:
  - name: ct-body
    match:
      all:
        - Modality: {equals: CT}
        - not:
            ImageType: {regex: LOCALIZER}
    model: ct-body
    destinations: [pacs, archive]
"""


# -- the studies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    number: int
    uid: str
    paths: tuple[Path, ...]
    routed_series: str
    unrouted_series: str | None


def _write_localizer(directory: Path, spec: PhantomSpec) -> list[Path]:
    """A CT scout: CT, but ``LOCALIZER`` in its Image Type, so the ct-body rule skips it."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in phantom_ct_datasets(spec):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesNumber = 1
        path = directory / f"LOC{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _write_studies(directory: Path, count: int, sop_uid: dict[Path, str]) -> list[Study]:
    studies = []
    for s in range(1, count + 1):
        study_uid = f"{UID_ROOT}.{s}"
        ct = PhantomSpec(
            slices=SLICES,
            rows=64,
            columns=64,
            pixel_spacing_mm=4.0,
            patient_id=f"SOAK-{s:04d}",
            study_instance_uid=study_uid,
            series_instance_uid=f"{study_uid}.2",
            frame_of_reference_uid=f"{study_uid}.2.1",
            seed=s,
        )
        paths = write_phantom_ct(directory / f"study{s:03d}" / "ct", ct)
        unrouted = None
        if s % LOCALIZER_EVERY == 0:
            scout = PhantomSpec(
                slices=LOCALIZER_SLICES,
                rows=64,
                columns=64,
                pixel_spacing_mm=4.0,
                patient_id=ct.patient_id,
                study_instance_uid=study_uid,
                series_instance_uid=f"{study_uid}.1",
                frame_of_reference_uid=f"{study_uid}.1.1",
                series_description="Scout",
                seed=1000 + s,
            )
            paths += _write_localizer(directory / f"study{s:03d}" / "scout", scout)
            unrouted = scout.series_instance_uid
        for path in paths:
            sop_uid[path] = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        studies.append(Study(s, study_uid, tuple(paths), ct.series_instance_uid, unrouted))
    return studies


# -- the watcher ----------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the first study
    spool_bytes: int
    instance_files: int
    result_files: int
    index_bytes: int  # the index file
    wal_bytes: int  # its write-ahead log
    rows: dict[str, int]


@dataclass
class Missing:
    t: float
    what: str
    path: str
    why: str
    read_to_stat: float  # seconds between the index read and the stat


@dataclass
class Watcher:
    """Samples the node's spool and index in a thread of its own."""

    data_dir: Path
    t0: float
    samples: list[Sample] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    inconclusive: int = 0  # samples with a missing file whose stat came too late to count
    slowest_check: float = 0.0
    first_seen: dict[str, float] = field(default_factory=dict)  # SOP UID -> wall time
    gone_at: dict[str, float] = field(default_factory=dict)  # SOP UID -> wall time
    reappeared: set[str] = field(default_factory=set)
    unrouted_at: dict[str, float] = field(default_factory=dict)  # series -> routed_at, claimed 0
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    _present: set[str] = field(default_factory=set)
    _acked: dict[str, list[str]] = field(default_factory=dict)  # series -> spool paths
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name="soak-watcher", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.error is not None:
            raise self.error

    def acknowledged(self, series_uid: str, spool_paths: list[Path]) -> None:
        """Instances of the series the node acknowledged: the spool must hold them while
        the series is held."""
        with self._lock:
            self._acked.setdefault(series_uid, []).extend(map(str, spool_paths))

    def latest(self) -> Sample:
        if self.error is not None:
            raise self.error
        return self.samples[-1]

    def _run(self) -> None:
        index = self.data_dir / "index.sqlite3"
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=10, isolation_level=None)
        try:
            while not self.stop.is_set():
                began = time.monotonic()
                self._sample(db)
                self.stop.wait(max(0.0, SAMPLE_INTERVAL - (time.monotonic() - began)))
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc
        finally:
            db.close()

    def _sample(self, db: sqlite3.Connection) -> None:
        read_at = time.monotonic()
        db.execute("BEGIN")
        try:
            rows = {t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLES}
            held_series = dict(db.execute(HELD_SERIES).fetchall())
            held_rows = db.execute(HELD_INSTANCE_ROWS).fetchall()
            held_results = db.execute(HELD_RESULTS).fetchall()
            unrouted = db.execute(UNROUTED).fetchall()
        finally:
            db.execute("COMMIT")
        # The files of a held series: those its instance rows name, and those the test
        # knows were acknowledged (a purge would take the rows away with the files).
        needed = {(str(path), str(series)) for path, series in held_rows}
        with self._lock:
            needed.update(
                (path, series) for series in held_series for path in self._acked.get(series, ())
            )
        missing = [
            ("instance", path, f"series {series}: {held_series[series]}")
            for path, series in sorted(needed)
            if not os.path.exists(path)
        ]
        missing += [
            ("result", str(path), f"delivery {delivery_id} {state}")
            for delivery_id, state, files in held_results
            for path in json.loads(files)
            if not os.path.exists(path)
        ]
        read_to_stat = time.monotonic() - read_at
        for series, routed_at in unrouted:
            self.unrouted_at[series] = max(self.unrouted_at.get(series, 0.0), float(routed_at))
        self.slowest_check = max(self.slowest_check, read_to_stat)
        t = time.monotonic() - self.t0
        if missing and read_to_stat < RACE_MARGIN:
            self.missing += [Missing(t, *m, read_to_stat) for m in missing]
        elif missing:
            self.inconclusive += 1

        spool_bytes = instance_files = result_files = 0
        present = set()
        for folder, _, names in os.walk(self.data_dir / "spool"):
            kind = Path(folder).relative_to(self.data_dir / "spool").parts[:1]
            for name in names:
                try:
                    spool_bytes += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue
                if kind == ("instances",):
                    instance_files += 1
                    present.add(name.removesuffix(".dcm"))
                elif kind == ("results",):
                    result_files += 1
        now = time.time()
        for uid in present - self._present:
            if uid in self.gone_at:
                self.reappeared.add(uid)
            self.first_seen.setdefault(uid, now)
        for uid in self._present - present:
            self.gone_at.setdefault(uid, now)
        self._present = present

        index_bytes, wal_bytes = (
            p.stat().st_size if p.exists() else 0
            for p in (self.data_dir / "index.sqlite3", self.data_dir / "index.sqlite3-wal")
        )
        self.samples.append(
            Sample(t, spool_bytes, instance_files, result_files, index_bytes, wal_bytes, rows)
        )


# -- what reached the destinations ----------------------------------------------------------


@dataclass
class Arrived:
    """Per source series: the SEGs and SRs at one destination, and when they were written."""

    segs: dict[str, list[str]] = field(default_factory=dict)
    srs: dict[str, list[str]] = field(default_factory=dict)
    referenced: dict[str, set[str]] = field(default_factory=dict)  # by SEG and SR evidence
    last_written: dict[str, float] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


def _arrived(scp: RestartableStoreSCP, series_of: dict[str, str]) -> Arrived:
    arrived = Arrived()
    for path in scp.files():
        ds = dcmread(path, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID)
        if ds.SOPClassUID == SEG_SOP_CLASS:
            sources = {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence}
            references = {
                str(i.ReferencedSOPInstanceUID)
                for s in ds.ReferencedSeriesSequence
                for i in s.ReferencedInstanceSequence
            }
            bucket = arrived.segs
        elif ds.SOPClassUID == COMPREHENSIVE_3D_SR:
            references = set(sr_evidence_uids(ds))
            sources = {series_of[u] for u in references if u in series_of}
            bucket = arrived.srs
        else:
            arrived.unexpected.append(f"{path.name}: SOP class {ds.SOPClassUID}")
            continue
        if len(sources) != 1:
            arrived.unexpected.append(f"{path.name}: references series {sorted(sources)}")
            continue
        (source,) = sources
        bucket.setdefault(source, []).append(uid)
        arrived.referenced.setdefault(source, set()).update(references)
        arrived.last_written[source] = max(
            arrived.last_written.get(source, 0.0), path.stat().st_mtime
        )
    return arrived


def _when(done: Callable[[], bool], deadline: float, t0: float) -> float | None:
    """Seconds since ``t0`` when ``done()`` first held, polling until ``deadline``."""
    while time.monotonic() < deadline:
        if done():
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


# -- the figures ----------------------------------------------------------------------------


def _mb(size: float) -> str:
    return f"{size / 1e6:.2f} MB"


def _timeline(samples: list[Sample], every: float = 10.0) -> str:
    lines = [
        "      t       spool (instance, result files)   index    WAL       rows: series "
        "instances jobs deliveries attempts associations events"
    ]
    next_t = 0.0
    for s in samples:
        if s.t >= next_t or s is samples[-1]:
            r = s.rows
            lines.append(
                f"  {s.t:5.1f} s  {_mb(s.spool_bytes):>9} ({s.instance_files:4d}, "
                f"{s.result_files:4d})  {s.index_bytes / 1e3:5.0f} kB {s.wal_bytes / 1e3:5.0f} kB"
                f"  {r['series']:17d} {r['instances']:9d} {r['jobs']:4d} {r['deliveries']:10d} "
                f"{r['delivery_attempts']:8d} {r['associations']:12d} {r['events']:6d}"
            )
            next_t = s.t - s.t % every + every
    return "\n".join(lines)


def _fitted_growth(samples: list[Sample], value: Callable[[Sample], int]) -> float:
    """Least-squares slope of ``value`` over the samples, times their time span."""
    ts = [s.t for s in samples]
    ys = [float(value(s)) for s in samples]
    mean_t, mean_y = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var
    return slope * (ts[-1] - ts[0])


# -- the test -------------------------------------------------------------------------------


def test_a_week_compressed_levels_off_and_deletes_nothing_undelivered(tmp_path: Path) -> None:
    count = int(SEND_SECONDS / STUDY_PERIOD)
    sop_uid: dict[Path, str] = {}
    studies = _write_studies(tmp_path / "studies", count, sop_uid)
    series_of = {
        uid: (study.routed_series if path.parent.name == "ct" else str(study.unrouted_series))
        for study in studies
        for path in study.paths
        for uid in [sop_uid[path]]
    }
    routed = {s.routed_series for s in studies}
    sent_bytes = sum(p.stat().st_size for s in studies for p in s.paths)

    scps = {
        "pacs": RestartableStoreSCP(tmp_path / "pacs", "PACS"),
        "archive": RestartableStoreSCP(tmp_path / "archive", "ARCHIVE"),
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = node_config(
        tmp_path / "node",
        scps["pacs"].port,
        rules=rules,
        destinations={
            name: {"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}
            for name, scp in scps.items()
        },
        pipeline={"workers": 1, "quiet_seconds": 2, "release_grace_seconds": 0.5},
        delivery={
            "retry_base_seconds": 0.5,
            "retry_max_seconds": 2,
            "max_attempts": 100,  # an outage never sends a delivery to dead letter here
            # Short: now and then pynetdicom's reactor takes a C-STORE response meant for the
            # SCU ("Received unexpected C-STORE service message"), which then waits out this
            # timeout and holds up every delivery; it is counted below.
            "timeout_seconds": 2,
        },
        storage={
            "keep_sources_hours": KEEP_SOURCES / 3600,
            "keep_results_hours": KEEP_RESULTS / 3600,
            "keep_unrouted_hours": KEEP_UNROUTED / 3600,
            "keep_records_days": KEEP_RECORDS / 86400,
            "cleanup_interval_seconds": CLEANUP_INTERVAL,
        },
    )
    node = NodeProcess(tmp_path / "node", config)
    acked: set[str] = set()  # SOP UIDs storescu saw answered with Success
    refused: list[str] = []
    outage_log: list[str] = []
    watcher: Watcher | None = None
    began = time.monotonic()
    for scp in scps.values():
        scp.start()
    try:
        node.start()
        t0 = time.monotonic()
        watcher = Watcher(node.data_dir, t0).start()
        for study in studies:
            due = t0 + (study.number - 1) * STUDY_PERIOD
            time.sleep(max(0.0, due - time.monotonic()))
            t = time.monotonic() - t0
            for name, (down, up) in OUTAGES.items():
                scp = scps[name]
                if scp.proc is not None and down <= t < up:
                    scp.stop()
                    outage_log.append(f"{name} down at {t:.1f} s")
                elif scp.proc is None and t >= up:
                    scp.start()
                    outage_log.append(f"{name} up at {t:.1f} s")
            code, acked_paths, output = storescu_acked(node.port, study.paths)
            spooled: dict[str, list[Path]] = {}
            for path in acked_paths:
                uid = sop_uid[path]
                acked.add(uid)
                series = series_of[uid]
                spooled.setdefault(series, []).append(
                    node.data_dir / "spool" / "instances" / study.uid / series / f"{uid}.dcm"
                )
            for series, paths in spooled.items():
                watcher.acknowledged(series, paths)
            if code != 0 or len(acked_paths) != len(study.paths):
                refused.append(f"study {study.number}: exit {code}\n{output}")
            if watcher.error is not None:
                break
        sent_at = time.monotonic() - t0
        for name, scp in scps.items():
            if scp.proc is None:
                scp.start()
                outage_log.append(f"{name} up at {time.monotonic() - t0:.1f} s")

        def nothing_to_do() -> bool:
            rows = node.index_rows(
                "SELECT (SELECT COUNT(*) FROM series WHERE dirty = 1)"
                " + (SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running'))"
                " + (SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'dead'))"
            )
            return int(rows[0][0]) == 0

        def spool_empty() -> bool:
            return watcher.latest().instance_files + watcher.latest().result_files == 0

        def index_pruned() -> bool:
            return watcher.latest().rows["series"] <= 1 and watcher.latest().rows["instances"] == 0

        # Each in turn, within one deadline; the figures come first, then what was missed.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        drained = {
            what: _when(done, deadline, t0)
            for what, done in (
                ("nothing left to do", nothing_to_do),
                ("spool empty", spool_empty),
                ("index pruned", index_pruned),
            )
        }
        time.sleep(2 * SAMPLE_INTERVAL)  # a last look, after the last prune's compaction
        watcher.finish()
    finally:
        if watcher is not None:
            watcher.stop.set()
        node.stop()
        for scp in scps.values():
            scp.stop()
    runtime = time.monotonic() - began
    samples = watcher.samples
    final = samples[-1]

    # -- the figures
    sending = [s for s in samples if s.t <= sent_at]
    thirds = [
        [s for s in sending if k * sent_at / 3 <= s.t < (k + 1) * sent_at / 3] for k in range(3)
    ]
    total_instances = sum(len(s.paths) for s in studies)
    total_series = len(studies) + sum(s.unrouted_series is not None for s in studies)
    print(
        f"\nretention soak: {len(studies)} studies ({total_series} series, {total_instances} "
        f"instances, {_mb(sent_bytes)}) in {sent_at:.1f} s; keep sources {KEEP_SOURCES:g} s, "
        f"results {KEEP_RESULTS:g} s, unrouted {KEEP_UNROUTED:g} s, records {KEEP_RECORDS:g} s"
        f"\n  outages: {', '.join(outage_log)}"
        "\n  after sending: "
        + ", ".join(
            f"{what} {'never' if at is None else f'at {at:.1f} s'}" for what, at in drained.items()
        )
        + f"; test {runtime:.0f} s in all"
    )
    print(_timeline(samples))
    measures: dict[str, Callable[[Sample], int]] = {
        "spool bytes": lambda s: s.spool_bytes,
        "spool files": lambda s: s.instance_files + s.result_files,
        "series rows": lambda s: s.rows["series"],
        "instance rows": lambda s: s.rows["instances"],
        "job rows": lambda s: s.rows["jobs"],
        "index bytes": lambda s: s.index_bytes,
        "WAL bytes": lambda s: s.wal_bytes,
    }
    peaks = {
        name: [max(value(s) for s in third) for third in thirds] for name, value in measures.items()
    }
    growth = {name: _fitted_growth(thirds[2], value) for name, value in measures.items()}
    for name in measures:
        first, middle, last = peaks[name]
        print(
            f"  {name:>13}: peak per third {first:>9,} {middle:>9,} {last:>9,}; "
            f"fitted growth over the last third {growth[name]:+,.0f}; "
            f"at the end {measures[name](final):,}"
        )
    log = node.log_text()
    print(
        "  C-STORE responses the SCU missed (pynetdicom reactor race), each a stall of "
        f"{config['delivery']['timeout_seconds']} s: "
        f"{log.count('Received unexpected C-STORE service message')}"
    )
    print(
        f"  watcher: {len(samples)} samples, slowest read-and-stat {watcher.slowest_check:.3f} s,"
        f" samples with a late stat {watcher.inconclusive}"
    )

    # -- nothing undelivered was ever deleted
    assert not refused, "studies not acknowledged in full:\n" + "\n\n".join(refused)
    first_missing: dict[str, Missing] = {}
    for m in watcher.missing:
        first_missing.setdefault(m.path, m)
    assert not first_missing, (
        f"{len(first_missing)} needed files missing, first seen so:\n"
        + "\n".join(
            f"  {m.t:.1f} s: {m.what} {'/'.join(Path(m.path).parts[-2:])} ({m.why}; stat "
            f"{m.read_to_stat:.3f} s after the read)"
            for m in list(first_missing.values())[:30]
        )
    )
    assert watcher.inconclusive <= len(samples) // 20, watcher.inconclusive

    # -- the spool and the index level off while studies keep coming
    sent_last_third = sum(
        len(s.paths) for s in studies if (s.number - 1) * STUDY_PERIOD >= 2 * sent_at / 3
    )
    sent_series_last_third = sum(
        1 + (s.unrouted_series is not None)
        for s in studies
        if (s.number - 1) * STUDY_PERIOD >= 2 * sent_at / 3
    )
    # The WAL is not held to it: SQLite checkpoints it at about 4 MB, and the cleaner
    # truncates it after each prune; its figures are printed.
    for name in measures.keys() - {"WAL bytes"}:
        _, middle, last = peaks[name]
        assert last <= 1.25 * middle, f"{name}: last third peaks at {last:,}, middle at {middle:,}"
    assert peaks["spool bytes"][2] <= 0.35 * sent_bytes, peaks["spool bytes"]
    assert peaks["series rows"][2] <= 0.35 * total_series, peaks["series rows"]
    assert peaks["instance rows"][2] <= 0.35 * total_instances, peaks["instance rows"]
    assert growth["instance rows"] <= 0.25 * sent_last_third, (growth, sent_last_third)
    assert growth["series rows"] <= 0.25 * sent_series_last_third, (growth, sent_series_last_third)

    # -- drained: the spool is empty and the index holds the newest job's rows at most
    missed = [what for what, at in drained.items() if at is None]
    assert not missed, f"not within {DRAIN_TIMEOUT:g} s of the last study: {missed}; {final}"
    assert final.spool_bytes == 0 and final.instance_files == final.result_files == 0, final
    rows = final.rows
    assert rows["instances"] == 0 and rows["series"] <= 1, rows
    # The newest job's series stays, with its deliveries (one per destination).
    assert rows["jobs"] <= 1 and rows["deliveries"] <= len(scps) and rows["events"] <= 1, rows
    assert rows["associations"] <= 2 and rows["series_associations"] <= 1, rows
    assert rows["delivery_attempts"] <= 2 * len(scps), rows

    # -- every acknowledged instance: delivered then purged, unrouted then purged, or here
    assert len(acked) == total_instances, (len(acked), total_instances)
    arrived = {name: _arrived(scp, series_of) for name, scp in scps.items()}
    unexpected = [f"{n}: {u}" for n, a in arrived.items() for u in a.unexpected]
    assert not unexpected, unexpected
    outcome: dict[str, int] = {"delivered then purged": 0, "unrouted then purged": 0}
    kept: dict[str, list[float]] = {"after delivery": [], "after routing to nothing": []}
    still_here, problems = 0, []
    for uid in sorted(acked):
        series = series_of[uid]
        if uid not in watcher.first_seen:
            problems.append(f"{uid}: acknowledged, never seen in the spool")
            continue
        if uid in watcher.reappeared:
            problems.append(f"{uid}: came back to the spool after it went")
        gone = watcher.gone_at.get(uid)
        if gone is None:
            still_here += 1
            continue
        if series in routed:
            at_all = [a for a in arrived.values() if series in a.segs and series in a.srs]
            if len(at_all) != len(arrived) or any(uid not in a.referenced[series] for a in at_all):
                problems.append(f"{uid} of {series}: purged, but not delivered everywhere")
                continue
            results_written = max(a.last_written[series] for a in at_all)
            if gone < results_written + KEEP_SOURCES:
                problems.append(
                    f"{uid} of {series}: seen gone {gone - results_written:+.2f} s from when "
                    f"its results arrived (keep_sources {KEEP_SOURCES:g} s)"
                )
                continue
            outcome["delivered then purged"] += 1
            kept["after delivery"].append(gone - results_written)
        else:
            if any(series in a.referenced for a in arrived.values()):
                problems.append(f"{uid} of unrouted {series}: results were delivered")
            unrouted_at = watcher.unrouted_at.get(series)
            if unrouted_at is None:
                problems.append(f"{uid} of {series}: purged, never seen routed to nothing")
                continue
            if gone < unrouted_at + KEEP_UNROUTED:
                problems.append(
                    f"{uid} of unrouted {series}: seen gone {gone - unrouted_at:+.2f} s from "
                    f"its routing (keep_unrouted {KEEP_UNROUTED:g} s)"
                )
                continue
            outcome["unrouted then purged"] += 1
            kept["after routing to nothing"].append(gone - unrouted_at)
    print(f"  acknowledged instances: {outcome}, still in the spool {still_here}")
    for what, seconds in kept.items():
        if seconds:
            print(
                f"  seen gone {what}: min {min(seconds):.2f} s, median "
                f"{statistics.median(seconds):.2f} s, max {max(seconds):.2f} s"
            )
    assert not problems, f"{len(problems)} acknowledged instances:\n" + "\n".join(problems[:40])
    assert still_here == 0
    localizers = {s.unrouted_series for s in studies if s.unrouted_series is not None}
    assert set(watcher.unrouted_at) == localizers, set(watcher.unrouted_at) ^ localizers
    for name, a in arrived.items():
        counts = {s: (len(a.segs.get(s, [])), len(a.srs.get(s, []))) for s in routed}
        wrong = {s: c for s, c in counts.items() if c != (1, 1)}
        assert not wrong, f"{name}: series without exactly one SEG and one SR: {wrong}"

    assert "Traceback (most recent call last)" not in log, log[-20000:]
    assert "cleanup failed" not in log, log[-20000:]

"""Purge while receiving: ingest during a purge of 10,000 series against ingest without one.

    .venv/bin/python -m benchmarks.purge [--series 10000] [--instances-per-series 3]
                                         [--rounds 3] [--slices 300] [--file-kb 4]
                                         [--receivers N] [--peer-sends 3] [--no-profile]

The issue's target: a purge of 10,000 series does not stall receiving, ingest within 10% of
no purge, same run.

Setup, once: a node data directory holding --series delivered series, each with
--instances-per-series instance files (--file-kb each, dummy bytes written without fsync)
and a results folder of two files, its rows made by the index's own methods as the node
makes them (add_instance, start_run, claim_pending_jobs, finish_job, delivery_succeeded);
three series per study. `Purger.plan` must find every series and every job due under the
purge round's policy. Every round starts from a copy of it (`cp -a --reflink=auto`, at the
same path, so the index's file paths hold), after `settle` (file creation cheap again).

Before the rounds (unless --no-profile), the lock profile: one purge of a copy in this
process, nothing else writing, as the node's cleaner runs it (`Purger` with its defaults on
a connection of its own), each Index call it makes timed, and a probe waiting for the write
lock every 50 ms: how long each step holds the lock and how long a writer waits while it
runs.

Each round starts the node (`dicom-ai serve`, no rules: receive only) on its copy and sends
one --slices-slice 512x512 CT with DCMTK storescu (TCP_NODELAY=1), one association per send,
back to back from the moment the node is ready until its window ends (the same series every
time: the node overwrites the files, so the spool does not grow). Ingest is counted by the
node itself: the instances it indexed (received_hourly, written with each instance just
before Success), polled every 0.2 s and interpolated at the window's ends, so a send that
runs past the window counts up to the window's end.

- purge: storage keep_sources_hours, keep_results_hours and keep_records_days 0, so the
  node's cleaner purges everything at start: sources, then results, then index rows and a
  compaction (keep_unrouted_hours stays 24: the series sent is not purged). The window: from
  the node's "ready" log line (the cleaner starts just before it) to the cleaner's "purged"
  line, the whole purge.
- no purge: every keep_* 100,000 hours or days (the cleaner runs and finds nothing due);
  the window: as long as the purge round it is paired with.

Rounds alternate (purge first, then no purge, then no purge first, ...), --rounds of each.
Prints each round; the medians of instances/s and MB/s, the ratio (the target: 0.9 or
more), the purge's duration and series/s and the share of it a send was under way; the
phases of each purge (from the index, polled every 0.2 s: sources, results, index rows,
compaction until the cleaner logs) with the ingest in each; the node's CPU per image (all
its processes, the cleaner's included); and the wait of a writer for the index's
write lock (a probe: BEGIN IMMEDIATE then COMMIT, changing nothing, every 50 ms from this
process, in both kinds of round), per phase. Beside it, the peer: DCMTK storescp receiving
the same series (--peer-sends sends per round, fresh each round). The node keeps
fsync-before-Success; storescp does not fsync.
"""

from __future__ import annotations

import argparse
import bisect
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.ingest import _cpu_seconds, _timed_send
from benchmarks.settle import file_create_ms, settle
from dicom_ai.config import NodeConfig
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.store.retention import Purger, RetentionPolicy
from dicom_ai.store.spool import Spool
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, free_port, node_config

TARGET = 0.90  # ingest during the purge / without it
CT = "1.2.840.10008.5.1.4.1.1.2"
_UID = "1.2.826.0.1.3680043.10.998"  # the template's series: {_UID}.1.n, studies .2.n
_SERIES_PER_STUDY = 3
_FOREVER = 100_000.0
_PURGE = {"keep_sources_hours": 0, "keep_results_hours": 0, "keep_records_days": 0}
_NO_PURGE = {
    "keep_sources_hours": _FOREVER,
    "keep_results_hours": _FOREVER,
    "keep_unrouted_hours": _FOREVER,
    "keep_records_days": _FOREVER,
}
_POLL = 0.2  # seconds between the watcher's looks at the index and the log
_PROBE = 0.05  # seconds between two write-lock probes


# -- the template ----------------------------------------------------------------------------


def build_template(
    data_dir: Path, series: int, per_series: int, file_bytes: int
) -> tuple[float, str]:
    """``series`` delivered series in a node data directory, made by `Index` methods as the
    node makes them; the seconds it took and what `Purger.plan` finds due."""
    started = time.perf_counter()
    spool = Spool(data_dir / "spool")
    index = Index(data_dir / "index.sqlite3")
    payload = b"\0" * file_bytes
    plans = [RunPlan("bench", "bench-model", ("pacs",))]
    try:
        for n in range(series):
            series_uid = f"{_UID}.1.{n + 1}"
            study_uid = f"{_UID}.2.{n // _SERIES_PER_STUDY + 1}"
            association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
            for k in range(per_series):
                path = spool.instance_path(study_uid, series_uid, f"{series_uid}.{k + 1}")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)  # no fsync: setup speed
                index.add_instance(
                    InstanceRecord(
                        f"{series_uid}.{k + 1}",
                        CT,
                        series_uid,
                        study_uid,
                        "CT",
                        path,
                        association,
                        size=file_bytes,
                    )
                )
            index.close_association(association)
            index.start_run(series_uid, plans, "rule bench")
            (job,) = index.claim_pending_jobs(1)
            folder = spool.results_dir(job.id)
            folder.mkdir(parents=True)
            results = [folder / "seg.dcm", folder / "sr.dcm"]
            for path in results:
                path.write_bytes(payload)
            index.finish_job(job.id, results, ["pacs"], {"load": 0.4, "infer": 8.7})
            (delivery,) = index.due_deliveries(time.time() + 1)
            index.delivery_succeeded(delivery.id)
        plan = Purger(index, spool, RetentionPolicy(0, 0, _FOREVER, 0)).plan()
    finally:
        index.close()
    files = sum(c.files for c in plan.sources)
    if len(plan.sources) != series or len(plan.results) != series or files != series * per_series:
        raise RuntimeError(
            f"the template is not what a purge takes: {len(plan.sources)} series "
            f"({files} files) and {len(plan.results)} jobs due, {series} expected"
        )
    due = (
        f"due under the purge round's policy: {len(plan.sources)} series ({files} files), "
        f"{len(plan.results)} jobs' results, index rows: "
        + ", ".join(f"{n} {table}" for table, n in plan.records.items() if n)
    )
    return time.perf_counter() - started, due


# The Index methods a purge calls, and whether each holds the write lock (BEGIN IMMEDIATE
# to COMMIT, or a write outside a transaction) for its whole call.
_STEPS = {
    "sources_due": False,
    "mark_sources_purged": True,
    "remove_purged_sources": True,
    "results_due": False,
    "mark_results_purged": True,
    "remove_purged_results": True,
    "prune_records": True,
    "compact": True,
}


@dataclass
class Profile:
    seconds: float
    summary: str
    calls: list[tuple[str, float, float]]  # (Index call, start, end), perf_counter
    probes: list[tuple[float, float]]  # (start, wait in ms) of each write-lock probe

    def during(self, name: str) -> list[float]:
        """Waits of the probes that began while ``name`` ran, or after it and before the
        next call (the purger's own time: its pause, its Python)."""
        starts = [start for _, start, _ in self.calls]
        waits = []
        for at, wait in self.probes:
            i = bisect.bisect_right(starts, at) - 1
            if i >= 0 and self.calls[i][0] == name:
                waits.append(wait)
        return waits


def profile_purge(template: Path, workdir: Path) -> Profile:
    """One purge of a copy of the template in this process, nothing else writing, as the
    node's cleaner makes it (a connection of its own, the default batch and pause), each
    Index call timed, while a probe waits for the write lock every ``_PROBE`` s."""
    node_dir = workdir / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    _copy(template, node_dir)
    data = node_dir / "data"
    index = Index(data / "index.sqlite3")
    calls: list[tuple[str, float, float]] = []
    for name in _STEPS:
        method = getattr(index, name)

        def timed(*args: object, _method: Any = method, _name: str = name, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return _method(*args, **kw)
            finally:
                calls.append((_name, started, time.perf_counter()))

        setattr(index, name, timed)
    probes: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe() -> None:
        db = sqlite3.connect(data / "index.sqlite3", isolation_level=None, timeout=60)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                probes.append((started, (time.perf_counter() - started) * 1000))
                db.execute("COMMIT")
                stop.wait(_PROBE)
        finally:
            db.close()

    prober = threading.Thread(target=probe, daemon=True)
    try:
        purger = Purger(index, Spool(data / "spool"), RetentionPolicy(0, 0, _FOREVER, 0))
        prober.start()
        started = time.perf_counter()
        report = purger.purge()
        took = time.perf_counter() - started
    finally:
        stop.set()
        prober.join(timeout=120)
        index.close()
        shutil.rmtree(node_dir, ignore_errors=True)
    return Profile(took, report.summary(), calls, probes)


def _print_profile(profile: Profile) -> None:
    took = profile.seconds
    per_step: dict[str, list[float]] = {name: [] for name in _STEPS}
    for name, start, end in profile.calls:
        per_step[name].append(end - start)
    held = sum(sum(calls) for name, calls in per_step.items() if _STEPS[name])
    print(
        f"lock profile: one purge in this process, nothing else writing: {took:.1f} s "
        f"({profile.summary}); the write lock held {held:.1f} s of it ({held / took:.0%})"
    )
    print(
        f"  a probe waited for the write lock every {_PROBE * 1000:.0f} ms: "
        f"{_wait_summary([w for _, w in profile.probes])}; by the call running when it began "
        "(or the last one before it):"
    )
    print(
        f"  {'Index call':<22} {'lock':>4} {'calls':>6} {'total s':>8} {'median ms':>9} "
        f"{'p99 ms':>8} {'max ms':>8}  {'probe waits':<}"
    )
    for name, calls in per_step.items():
        ms = [c * 1000 for c in calls]
        if not ms:
            continue
        print(
            f"  {name:<22} {'yes' if _STEPS[name] else 'no':>4} {len(ms):>6} "
            f"{sum(calls):>8.2f} {statistics.median(ms):>9.2f} {_pct(ms, 0.99):>8.1f} "
            f"{max(ms):>8.1f}  {_wait_summary(profile.during(name))}"
        )


def _copy(source: Path, target: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(target)], check=True)
    return time.perf_counter() - started


# -- watching a round ------------------------------------------------------------------------


def _log_time(line: str) -> float:
    """The epoch of a node log line (``%(asctime)s``: local time, milliseconds)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Sample:
    at: float
    received: int  # instances the node has indexed (received_hourly's sum), ever
    cpu: float  # CPU seconds of the node's processes so far
    sources_left: int  # template series with instance files not yet marked purged
    marked: int  # instance rows marked purged, files not yet removed
    results_left: int  # jobs whose results are not yet marked purged
    series_rows: int


@dataclass
class Probe:
    at: float
    wait_ms: float


@dataclass
class Watch:
    """Polls the node's index, CPU and log (every ``_POLL`` s) and probes its write lock
    (every ``_PROBE`` s), in two threads, until stopped."""

    index_path: Path
    log_path: Path
    pid: int
    samples: list[Sample] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    purged_at: float | None = None  # the cleaner's "purged ..." log line
    purged_line: str = ""
    failure: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Watch:
        self.samples.append(self._sample(self._connect()))  # before the first send
        for target in (self._watch, self._probe):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def sampled_after(self, at: float) -> bool:
        return self.samples[-1].at > at

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True, timeout=30)

    def _sample(self, db: sqlite3.Connection) -> Sample:
        at = time.time()
        cpu = _cpu_seconds(self.pid, None)[0]
        (received,) = db.execute(
            "SELECT COALESCE(SUM(instances), 0) FROM received_hourly"
        ).fetchone()
        (sources,) = db.execute(
            "SELECT COUNT(*) FROM series WHERE has_sources = 1 AND series_instance_uid LIKE ?",
            (f"{_UID}.%",),
        ).fetchone()
        (marked,) = db.execute("SELECT COUNT(*) FROM instances WHERE purged = 1").fetchone()
        (results,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NULL"
        ).fetchone()
        (rows,) = db.execute("SELECT COUNT(*) FROM series").fetchone()
        return Sample(at, received, cpu, sources, marked, results, rows)

    def _watch(self) -> None:
        db = self._connect()
        offset = 0
        try:
            while not self._stop.wait(_POLL):
                with self.log_path.open("rb") as log:
                    log.seek(offset)
                    chunk = log.read()
                # Whole lines only: a line being written is read at the next look.
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    if "dicom_ai.store.retention: purged " in line and self.purged_at is None:
                        self.purged_at = _log_time(line)
                        self.purged_line = line.split(": purged ", 1)[1]
                    elif "cleanup failed" in line:
                        self.failure = line
                self.samples.append(self._sample(db))
        finally:
            db.close()

    def _probe(self) -> None:
        db = sqlite3.connect(self.index_path, isolation_level=None, timeout=30)
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                waited = time.perf_counter() - started
                db.execute("COMMIT")  # nothing changed: nothing written
                self.probes.append(Probe(time.time(), waited * 1000))
                self._stop.wait(_PROBE)
        finally:
            db.close()


# -- one round -------------------------------------------------------------------------------


@dataclass
class Send:
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Phase:
    name: str
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Round:
    """One round. Its window: from the node's ready line to the cleaner's purged line (a
    purge round) or as long after ready as the purge round it is paired with took."""

    purge: bool
    settled: str
    copy_seconds: float
    ready: float
    end: float
    sends: list[Send]
    watch: Watch
    phases: list[Phase] = field(default_factory=list)
    create_ms_after: float | None = None  # file creation cost right after the purge

    @property
    def seconds(self) -> float:
        return self.end - self.ready

    def _at(self, at: float, value: Callable[[Sample], float]) -> float:
        """``value`` at ``at``, interpolated between the two samples around it."""
        samples = self.watch.samples
        i = bisect.bisect_left([s.at for s in samples], at)
        if i == 0:
            return value(samples[0])
        if i == len(samples):
            return value(samples[-1])
        a, b = samples[i - 1], samples[i]
        share = (at - a.at) / (b.at - a.at) if b.at > a.at else 1.0
        return value(a) + share * (value(b) - value(a))

    def instances(self, start: float, end: float) -> float:
        """Instances the node indexed (just before answering Success) in [start, end]."""
        return self._at(end, lambda s: s.received) - self._at(start, lambda s: s.received)

    def rate(self, start: float | None = None, end: float | None = None) -> float:
        start, end = start or self.ready, end or self.end
        return self.instances(start, end) / (end - start)

    def cpu_ms_per_image(self) -> float:
        cpu = self._at(self.end, lambda s: s.cpu) - self._at(self.ready, lambda s: s.cpu)
        return cpu / max(1.0, self.instances(self.ready, self.end)) * 1000

    def waits(self, start: float, end: float) -> list[float]:
        """The probes' waits for the write lock that began between ``start`` and ``end``."""
        return [p.wait_ms for p in self.watch.probes if start <= p.at - p.wait_ms / 1000 < end]

    def covered(self) -> float:
        """The share of the window during which a send was under way."""
        busy = sum(max(0.0, min(s.end, self.end) - max(s.start, self.ready)) for s in self.sends)
        return busy / self.seconds


PHASES = ("sources", "results", "rows", "compaction")


def _phases(ready: float, watch: Watch) -> list[Phase]:
    """The purge's phases from the watcher's samples (each boundary: the first look that
    saw it, so up to ``_POLL`` s late): sources (until every template series is marked and
    no marked row is left), results (until no job's results are kept), index rows (until
    the series rows are down to what the purge leaves), then compaction (until the cleaner
    logged)."""
    assert watch.purged_at is not None
    end = watch.purged_at
    samples = watch.samples
    left = next((s.series_rows for s in samples if s.at > end), samples[-1].series_rows)
    bounds = [ready]
    done: list[Callable[[Sample], bool]] = [
        lambda s: s.sources_left == 0 and s.marked == 0,
        lambda s: s.results_left == 0,
        lambda s: s.series_rows == left,
    ]
    for test in done:
        at = next((s.at for s in samples if s.at >= bounds[-1] and test(s)), end)
        bounds.append(min(at, end))
    bounds.append(end)
    return [Phase(name, a, b) for name, a, b in zip(PHASES, bounds, bounds[1:], strict=False)]


def _run_round(
    purge: bool,
    template: Path,
    workdir: Path,
    probe_dir: Path,
    files: list[Path],
    seconds: float | None,
    receivers: int | None,
    max_seconds: float,
) -> Round:
    """One round on a fresh copy of the template: the node, its sends and the watcher.
    ``seconds``: how long to send after the node is ready (None: until the purge ends)."""
    node_dir = workdir / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    copy_seconds = _copy(template, node_dir)
    settled = settle(probe_dir)
    rules = workdir / "rules.yaml"
    rules.write_text("rules: []\n")
    storage: dict[str, object] = dict(_PURGE if purge else _NO_PURGE)
    overrides: dict[str, dict[str, object]] = {"storage": storage}
    if receivers is not None:
        overrides["node"] = {"receivers": receivers}
    config = node_config(node_dir, free_port(), rules=rules, **overrides)
    node = NodeProcess(node_dir, config)
    if node.log.exists():
        node.log.unlink()
    sends: list[Send] = []
    watch: Watch | None = None
    create_after = None
    try:
        node.start(timeout=300)
        assert node.proc is not None
        ready_line = next(line for line in node.log_text().splitlines() if "dicom-ai ready" in line)
        ready = _log_time(ready_line)
        watch = Watch(node_dir / "data" / "index.sqlite3", node.log, node.proc.pid).start()

        def sending() -> bool:
            assert watch is not None
            if watch.failure:
                raise RuntimeError(f"the cleaner failed: {watch.failure}")
            if time.time() - ready > max_seconds:
                raise RuntimeError(f"no purge logged {max_seconds:.0f} s after the node started")
            if seconds is not None:
                return time.time() < ready + seconds
            return watch.purged_at is None

        # Back to back from ready until the window ends; the last send runs past it.
        while sending():
            start = time.time()
            _timed_send(node.port, "DICOM_AI", [files], nodelay=True)
            sends.append(Send(start, time.time()))
        end = watch.purged_at if seconds is None else ready + seconds
        assert end is not None
        while not watch.sampled_after(end):  # a look at the index after the window
            time.sleep(_POLL / 4)
        watch.stop()
        if purge:
            create_after = file_create_ms(probe_dir)
    finally:
        if watch is not None:
            watch.stop()
        node.stop()
    result = Round(purge, settled, copy_seconds, ready, end, sends, watch, [], create_after)
    if purge:
        result.phases = _phases(ready, watch)
    return result


def _peer(workdir: Path, files: list[Path], sends: int) -> list[float]:
    """Seconds per send to a fresh storescp."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    scp = StoreSCP(workdir / "out").start()
    try:
        return [_timed_send(scp.port, "PACS", [files], nodelay=True) for _ in range(sends)]
    finally:
        scp.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _wait_summary(waits: Sequence[float]) -> str:
    if not waits:
        return "no probes"
    return (
        f"{len(waits)} probes, mean {statistics.fmean(waits):.1f} ms, median "
        f"{statistics.median(waits):.2f} ms, p99 {_pct(waits, 0.99):.1f} ms, "
        f"max {max(waits):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", type=int, default=10_000, help="series to purge")
    parser.add_argument("--instances-per-series", type=int, default=3)
    parser.add_argument("--file-kb", type=int, default=4, help="size of each purged file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind")
    parser.add_argument("--slices", type=int, default=300, help="CT slices per send")
    parser.add_argument("--receivers", type=int, default=None, help="node receiver processes")
    parser.add_argument("--peer-sends", type=int, default=3, help="sends to storescp per round")
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the in-process purge that times each Index call (the lock profile)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=1200, help="give up on a purge after this long"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dicom-ai-bench-purge-"))
    try:
        files = write_phantom_ct(root / "ct", PhantomSpec(slices=args.slices, seed=1))
        images = len(files)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        # Built where every round's copy lives, so the paths in the index hold there.
        work = root / "work"
        built_seconds, due = build_template(
            work / "node" / "data", args.series, args.instances_per_series, args.file_kb * 1024
        )
        template = root / "template"
        (work / "node").rename(template)
        spool_files = sum(1 for p in (template / "data" / "spool").rglob("*") if p.is_file())
        print(
            f"template: {args.series} delivered series x {args.instances_per_series} instance "
            f"files of {args.file_kb} KiB + 2 result files per job ({spool_files} files), "
            f"built with Index methods in {built_seconds:.1f} s; {due}"
        )
        print(
            f"each send: {images} CT slices 512x512, {megabytes:.1f} MB, one storescu "
            f"association, TCP_NODELAY=1, back to back; node receiver processes: "
            f"{args.receivers or NodeConfig().receivers}; rounds: {args.rounds} of each kind"
        )
        if not args.no_profile:
            _print_profile(profile_purge(template, work))

        rounds: list[Round] = []
        peer: list[float] = []
        purge_seconds: float | None = None
        for i in range(args.rounds):
            for purge in [True, False] if i % 2 == 0 else [False, True]:
                r = _run_round(
                    purge,
                    template,
                    work,
                    root / "probe",
                    files,
                    None if purge else purge_seconds,
                    args.receivers,
                    args.max_seconds,
                )
                rounds.append(r)
                if purge:
                    purge_seconds = r.seconds
                _print_round(len(rounds), r, images, megabytes, args.series)
            peer.extend(images / s for s in _peer(root / "storescp", files, args.peer_sends))
        _report(rounds, peer, images, megabytes, args.series)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _print_round(n: int, r: Round, images: int, megabytes: float, series: int) -> None:
    rate = r.rate()
    print(
        f"round {n} ({'purge' if r.purge else 'no purge'}): copy {r.copy_seconds:.1f} s, "
        f"{r.settled}; window {r.seconds:.1f} s, {r.instances(r.ready, r.end):.0f} instances "
        f"indexed, {rate:.0f} img/s, {rate * megabytes / images:.1f} MB/s; sends under way "
        f"{r.covered():.0%} of it ({len(r.sends)} sends, the first {r.sends[0].start - r.ready:.2f}"
        f" s after ready, the last ending {r.sends[-1].end - r.end:.1f} s after the window); "
        f"node CPU {r.cpu_ms_per_image():.2f} ms/image"
    )
    if r.purge:
        print(
            f"  purge: {r.seconds:.1f} s, {series / r.seconds:.0f} series/s; {r.watch.purged_line}"
        )
        if r.create_ms_after is not None:
            print(f"  file creation right after the purge: {r.create_ms_after:.2f} ms")
        for phase in r.phases:
            print(
                f"  {phase.name:<11} {phase.seconds:6.1f} s; {_phase_rate(r, phase)}; "
                f"write lock: {_wait_summary(r.waits(phase.start, phase.end))}"
            )
    else:
        print(f"  write lock: {_wait_summary(r.waits(r.ready, r.end))}")


def _phase_rate(r: Round, phase: Phase) -> str:
    if phase.seconds < 2 * _POLL:
        return "too short to rate"
    return f"{r.rate(phase.start, phase.end):.0f} img/s"


def _report(
    rounds: list[Round], peer: list[float], images: int, megabytes: float, series: int
) -> None:
    purge = [r for r in rounds if r.purge]
    plain = [r for r in rounds if not r.purge]
    mb = megabytes / images
    print()
    print(f"{'receiver':<24} {'rounds (img/s)':<36} {'median img/s':>12} {'median MB/s':>12}")
    rows = {
        "dicom-ai, no purge": [r.rate() for r in plain],
        "dicom-ai, during purge": [r.rate() for r in purge],
        "storescp (peer)": peer,
    }
    medians = {}
    for name, values in rows.items():
        medians[name] = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:<24} {runs:<36} {medians[name]:>12.0f} {medians[name] * mb:>12.1f}")
    ratio = medians["dicom-ai, during purge"] / medians["dicom-ai, no purge"]
    pairs = ", ".join(f"{p.rate() / q.rate():.2f}" for p, q in zip(purge, plain, strict=True))
    print(
        f"during purge / no purge: {ratio:.3f}x ({(ratio - 1) * 100:+.1f}%; per round pair: "
        f"{pairs}); target: within 10%, {'met' if ratio >= TARGET else 'NOT met'}"
    )
    scp = medians["storescp (peer)"]
    print(
        f"dicom-ai / storescp: no purge {medians['dicom-ai, no purge'] / scp:.2f}x, "
        f"during purge {medians['dicom-ai, during purge'] / scp:.2f}x"
    )
    took = statistics.median(r.seconds for r in purge)
    print(
        f"purge of {series} series: median {took:.1f} s ({series / took:.0f} series/s; "
        f"runs: {', '.join(f'{r.seconds:.1f}' for r in purge)}); sends under way "
        f"{', '.join(f'{r.covered():.0%}' for r in purge)} of it"
    )
    print(
        f"node CPU per image: no purge {statistics.median(r.cpu_ms_per_image() for r in plain):.2f}"
        f" ms, during purge {statistics.median(r.cpu_ms_per_image() for r in purge):.2f} ms "
        "(all its processes, the cleaner included)"
    )
    print("by purge phase, all purge rounds (img/s: instances indexed in the phase / its time):")
    waits = [w for r in plain for w in r.waits(r.ready, r.end)]
    print(f"  {'no purge':<11} write lock: {_wait_summary(waits)}")
    for name in PHASES:
        phases = [(r, p) for r in purge for p in r.phases if p.name == name]
        waits = [w for r, p in phases for w in r.waits(p.start, p.end)]
        each = ", ".join(f"{p.seconds:.1f} s: {_phase_rate(r, p)}" for r, p in phases)
        print(f"  {name:<11} {each}; write lock: {_wait_summary(waits)}")


if __name__ == "__main__":
    main()

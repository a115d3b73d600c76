"""Crash safety: the node is killed with SIGKILL at random moments and restarted each time.

20 studies (3 series of 6 small CT slices each, one storescu association per study) go
through a node whose process is killed 6 times (one kill of each kind below, and one more
of a kind the seed draws) and restarted after each. Which study gets which kill, and the
delays, come from a seeded ``random.Random`` (the seed is ``DICOM_AI_CRASH_SEED``, default 1;
``-s`` prints the schedule, so a failure reproduces with the same seed):

- ``mid-association``: right after storescu got the n-th Success of a study (n random); after
  the restart the sender resends the whole study (after a random delay), as a modality
  retries a failed association;
- ``after-ack``: storescu got Success for every file and released; the kill comes before the
  series are routed (assembly waits for the release grace);
- ``inference``: a job is running in a worker that already finished one (the model is loaded);
- ``delivery-retrying``: the PACS is down and deliveries wait for their next attempt; the
  outage lasts until 1-3 more studies have been sent;
- ``delivery-in-transfer``: the PACS is slow (storescp ``--sleep-after``), the SEG of a
  delivery is at the PACS and its SR not yet.

Afterwards (DESIGN.md "Nothing lost", "Idempotent results"):

- every instance storescu saw answered with Success has a row in the index, and its spool file
  parses and holds the pixel data that was sent;
- every series has exactly one SEG and one SR at the PACS (distinct SOP Instance UIDs per
  source series; storescp names files by SOP Instance UID, so a re-delivery overwrites), and
  they are the current results: the SEG references every instance of the series;
- no series, job or delivery is left unfinished in the index, and the latest run of every
  series was delivered;
- the node log has no traceback except a killed node's orphaned worker failing to report.

The workers die with the node (as under systemd or in a container), except at the inference
kill, where the warm worker is left orphaned, as after a bare ``kill -9``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import (
    NodeProcess,
    RestartableStoreSCP,
    child_pids,
    node_config,
    pid_alive,
    storescu_acked,
    wait_until,
)
from tests.results_check import COMPREHENSIVE_3D_SR, SEG_SOP_CLASS, sr_evidence_uids

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SEED = int(os.environ.get("DICOM_AI_CRASH_SEED", "1"))
STUDIES, SERIES_PER_STUDY, SLICES = 20, 3, 6
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242"
# One kill of each kind, and one more of a kind drawn by the seed: 6 kills, 7 node processes.
KILLS = (
    "mid-association",
    "after-ack",
    "inference",
    "delivery-retrying",
    "delivery-in-transfer",
)
EXTRA_KILL_KINDS = ("mid-association", "after-ack", "inference")
STEP_TIMEOUT = 60  # for one kill point to come
FINISH_TIMEOUT = 90  # for the node to finish everything after the last study


@dataclass(frozen=True)
class Study:
    number: int
    series_uids: tuple[str, ...]
    paths: tuple[Path, ...]


@dataclass
class Kill:
    kind: str
    study: int
    detail: str
    seen: str  # the index and the PACS right after the kill
    at: float  # seconds since the first start


def _write_studies(directory: Path, run: CrashRun) -> list[Study]:
    """The studies; each file's SOP Instance UID and Series Instance UID go into ``run``."""
    studies = []
    for s in range(1, STUDIES + 1):
        series, paths = [], []
        for k in range(1, SERIES_PER_STUDY + 1):
            spec = PhantomSpec(
                slices=SLICES,
                rows=64,
                columns=64,
                pixel_spacing_mm=4.0,
                study_instance_uid=f"{UID_ROOT}.{s}",
                series_instance_uid=f"{UID_ROOT}.{s}.{k}",
                frame_of_reference_uid=f"{UID_ROOT}.{s}.{k}.1",
                seed=s * 10 + k,
            )
            written = write_phantom_ct(directory / f"study{s:02d}" / f"series{k}", spec)
            for path in written:
                ds = dcmread(path, stop_before_pixels=True)
                run.sop_uid[path] = str(ds.SOPInstanceUID)
                run.series_uid[path] = spec.series_instance_uid
            series.append(spec.series_instance_uid)
            paths += written
        studies.append(Study(s, tuple(series), tuple(paths)))
    return studies


class CrashRun:
    """The node, the PACS and the record of what was acknowledged and when the node died."""

    def __init__(self, tmp_path: Path, rng: random.Random) -> None:
        self.rng = rng
        self.pacs = RestartableStoreSCP(tmp_path / "pacs")
        config = node_config(
            tmp_path / "node",
            self.pacs.port,
            pipeline={"workers": 1, "quiet_seconds": 2, "release_grace_seconds": 1},
            delivery={
                "retry_base_seconds": 0.5,
                "retry_max_seconds": 2,
                "max_attempts": 30,
                "timeout_seconds": 10,
            },
        )
        self.node = NodeProcess(tmp_path / "node", config)
        self.acked: set[Path] = set()
        self.sop_uid: dict[Path, str] = {}
        self.series_uid: dict[Path, str] = {}
        self.kills: list[Kill] = []
        self.workers: set[int] = set()  # worker pids of every node process, to reap orphans
        self.started_at = 0.0
        self.t0 = time.monotonic()
        self.pacs_down_until = 0  # study number after which a PACS outage ends

    def start_node(self) -> None:
        self.node.start()
        self.started_at = time.time()

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return self.node.index_rows(sql, *args)

    def count(self, sql: str, *args: object) -> int:
        return int(self.rows(sql, *args)[0][0])

    def send(self, study: Study) -> None:
        """Send a study and require every file to be acknowledged."""
        code, acked, output = storescu_acked(self.node.port, study.paths)
        self.acked.update(acked)
        assert code == 0 and len(acked) == len(study.paths), output

    def kill(self, kind: str, study: Study, detail: str, orphan_workers: bool = False) -> None:
        """SIGKILL the node; its workers too unless ``orphan_workers``.

        Under systemd or in a container the workers die with the node; after a bare
        ``kill -9`` they live on as orphans, finish their job and cannot report it. Orphans
        are left only where the worker is warm (inference): an orphan still importing torch
        would cost seconds of CPU this test does not have.
        """
        assert self.node.proc is not None
        workers = child_pids(self.node.proc.pid)
        self.workers.update(workers)
        self.node.kill9()
        if not orphan_workers:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            detail += ", workers killed too"
        else:
            detail += ", workers left orphaned"
        at = time.monotonic() - self.t0
        self.kills.append(Kill(kind, study.number, detail, self._seen(), at))

    def _seen(self) -> str:
        jobs = dict(self.rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        retrying = self.count(
            "SELECT COUNT(*) FROM deliveries WHERE state = 'pending' AND attempts > 0"
        )
        pending = self.count("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'")
        return (
            f"instances {self.count('SELECT COUNT(*) FROM instances')}, "
            f"series to route {self.count('SELECT COUNT(*) FROM series WHERE dirty = 1')}, "
            f"jobs running {jobs.get('running', 0)} pending {jobs.get('pending', 0)} "
            f"done {jobs.get('done', 0)}, deliveries pending {pending} (retrying {retrying}), "
            f"PACS files {len(self.pacs.files())}"
        )

    def series_routed(self, study: Study) -> int:
        marks = ",".join("?" * len(study.series_uids))
        return self.count(
            f"SELECT COUNT(DISTINCT series_instance_uid) FROM jobs "
            f"WHERE series_instance_uid IN ({marks})",
            *study.series_uids,
        )

    # -- kill points -------------------------------------------------------------------------

    def mid_association(self, study: Study) -> None:
        after = self.rng.randint(1, len(study.paths) - 1)

        def on_success(n: int) -> None:
            if n == after:
                self.kill("mid-association", study, f"after Success {after}/{len(study.paths)}")

        kills = len(self.kills)
        code, acked, output = storescu_acked(self.node.port, study.paths, on_success)
        self.acked.update(acked)
        assert len(self.kills) == kills + 1, output
        # Usually storescu fails at the next file; it may have finished the study first.
        self.kills[-1].detail += f", storescu saw {len(acked)} Success, exit code {code}"
        self.start_node()
        # The modality retries the study a little later: after the release grace, the part
        # that arrived was routed as a run of its own and the resend makes a second run.
        delay = self.rng.uniform(0.0, 3.0)
        time.sleep(delay)
        self.send(study)
        self.kills[-1].detail += f", resent {delay:.2f} s after the restart"

    def after_ack(self, study: Study) -> None:
        self.send(study)
        delay = self.rng.uniform(0.0, 0.3)
        time.sleep(delay)
        self.kill("after-ack", study, f"{delay:.2f} s after the release")
        self.kills[-1].detail += f", series routed {self.series_routed(study)}/3"
        self.start_node()

    def inference(self, study: Study) -> None:
        self.send(study)
        since = self.started_at

        def warm_and_running() -> bool:
            done = self.count(
                "SELECT COUNT(*) FROM jobs WHERE state = 'done' AND updated_at > ?", since
            )
            return done > 0 and bool(self.rows("SELECT 1 FROM jobs WHERE state = 'running'"))

        wait_until(warm_and_running, STEP_TIMEOUT, "a job running in a warm worker", 0.005)
        delay = self.rng.uniform(0.0, 0.05)
        time.sleep(delay)
        self.kill(
            "inference", study, f"{delay:.3f} s after a job was seen running", orphan_workers=True
        )
        self.start_node()

    def delivery_retrying(self, study: Study) -> None:
        self.pacs.stop()
        self.send(study)
        wait_until(
            lambda: bool(
                self.rows("SELECT 1 FROM deliveries WHERE state = 'pending' AND attempts > 0")
            ),
            STEP_TIMEOUT,
            "a delivery waiting to be retried",
            0.05,
        )
        delay = self.rng.uniform(0.0, 1.0)
        time.sleep(delay)
        self.kill("delivery-retrying", study, f"PACS down, {delay:.2f} s after a failed attempt")
        self.start_node()
        # The outage goes on while the next studies arrive (and maybe their kills).
        self.pacs_down_until = study.number + self.rng.randint(1, 3)
        self.kills[-1].detail += f", PACS up after study {self.pacs_down_until}"

    def after_study(self, study: Study) -> None:
        if self.pacs.proc is None and study.number >= self.pacs_down_until:
            self.pacs.start()

    def delivery_in_transfer(self, study: Study) -> None:
        self.pacs.stop()  # ends an outage too
        self.pacs.start(sleep_after=1)

        def seg_without_sr() -> bool:
            names = [p.name for p in self.pacs.files()]
            return sum(n.startswith("SG.") for n in names) > sum(n.startswith("SR") for n in names)

        self.send(study)
        wait_until(seg_without_sr, STEP_TIMEOUT, "a SEG at the PACS before its SR", 0.01)
        delay = self.rng.uniform(0.0, 0.5)
        time.sleep(delay)
        self.kill("delivery-in-transfer", study, f"{delay:.2f} s after a SEG arrived without SR")
        self.pacs.stop()
        self.pacs.start()
        self.start_node()

    # -- the end -----------------------------------------------------------------------------

    def unfinished(self) -> dict[str, int]:
        return {
            "series": self.count("SELECT COUNT(*) FROM series WHERE dirty = 1"),
            "jobs": self.count("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')"),
            "deliveries": self.count("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'"),
        }

    def wait_until_finished(self, series: int, timeout: float) -> None:
        """Until every series was routed and nothing is left to do (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            routed = self.count("SELECT COUNT(*) FROM series")
            if routed == series and not any(self.unfinished().values()):
                return
            time.sleep(0.2)

    def reap_orphans(self) -> list[int]:
        """Kill, by pid, worker processes that outlived their killed node; returns them."""
        lingering = []
        for pid in sorted(self.workers):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if pid_alive(pid) and b"multiprocessing" in cmdline:
                lingering.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return lingering

    def schedule(self, seed: int) -> str:
        lines = [f"crash-safety seed {seed} (DICOM_AI_CRASH_SEED={seed} to reproduce)"]
        for n, kill in enumerate(self.kills, start=1):
            lines.append(
                f"  kill {n} at {kill.at:4.1f} s: study {kill.study:2d} {kill.kind}: {kill.detail}"
            )
            lines.append(f"          seen: {kill.seen}")
        return "\n".join(lines)


def _plan(rng: random.Random) -> dict[int, str]:
    """Study number -> kill point; no kill in the first study (nothing to recover yet)."""
    kinds = [*KILLS, rng.choice(EXTRA_KILL_KINDS)]
    rng.shuffle(kinds)
    return dict(zip(sorted(rng.sample(range(2, STUDIES + 1), len(kinds))), kinds, strict=True))


# A worker whose node was killed under it finishes its job, then cannot report it.
_ORPHAN_TRACEBACK = re.compile(
    r"^Process dicom-ai-worker[^\n]*:\nTraceback \(most recent call last\):\n"
    r"(?:[ \t][^\n]*\n)+(?:BrokenPipeError|ConnectionResetError|EOFError)\b[^\n]*\n",
    re.MULTILINE,
)


def _unexpected_tracebacks(log: str) -> list[str]:
    rest = _ORPHAN_TRACEBACK.sub("", log)
    blocks = []
    for match in re.finditer(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*.*", rest):
        blocks.append(match.group(0))
    return blocks


@pytest.mark.parametrize("seed", [SEED])
def test_kill9_at_random_moments_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, seed: int
) -> None:
    run = run_scenario(tmp_path, seed)
    check_outcome(run)


def run_scenario(tmp_path: Path, seed: int) -> CrashRun:
    """Send every study with the kills of ``seed``, wait for the node to finish, stop it."""
    rng = random.Random(seed)
    plan = _plan(rng)
    run = CrashRun(tmp_path, rng)
    studies = _write_studies(tmp_path / "studies", run)
    actions = {
        "mid-association": run.mid_association,
        "after-ack": run.after_ack,
        "inference": run.inference,
        "delivery-retrying": run.delivery_retrying,
        "delivery-in-transfer": run.delivery_in_transfer,
    }
    run.t0 = started = time.monotonic()
    sent = finished = started
    run.pacs.start()
    try:
        run.start_node()
        for study in studies:
            actions.get(plan.get(study.number, ""), run.send)(study)
            run.after_study(study)
        if run.pacs.proc is None:
            run.pacs.start()
        sent = time.monotonic()
        run.wait_until_finished(STUDIES * SERIES_PER_STUDY, FINISH_TIMEOUT)
        finished = time.monotonic()
    finally:
        print("\n" + run.schedule(seed))
        run.node.stop()
        run.pacs.stop()
        lingering = run.reap_orphans()
    print(
        f"  sending and kills {sent - started:.1f} s, finishing {finished - sent:.1f} s; "
        f"series run more than once {run.count('SELECT COUNT(*) FROM series WHERE runs > 1')}, "
        f"jobs attempted more than once "
        f"{run.count('SELECT COUNT(*) FROM jobs WHERE attempts > 1')}, "
        f"re-deliveries overwritten at the PACS {run.pacs.logs().count('overwriting')}, "
        f"orphaned workers still alive at the end {len(lingering)}"
    )
    assert len(run.kills) == len(plan), run.kills
    return run


def check_outcome(run: CrashRun) -> None:
    """The contracts, checked on the stopped node's index and spool and on the PACS."""
    # Nothing lost: every acknowledged instance is indexed and spooled, as sent.
    never = sorted(p.name for p in set(run.sop_uid) - run.acked)
    assert not never, f"never acknowledged, even when sent again: {never}"
    instances = dict(run.rows("SELECT sop_instance_uid, path FROM instances"))
    lost = []
    for path in sorted(run.acked):
        uid = run.sop_uid[path]
        if uid not in instances:
            lost.append(f"{uid} ({path.name}): not in the index")
            continue
        spooled = Path(str(instances[uid]))
        if not spooled.is_file():
            lost.append(f"{uid}: indexed, but {spooled} is missing")
            continue
        ds = dcmread(spooled)
        if ds.SOPInstanceUID != uid or ds.PixelData != dcmread(path).PixelData:
            lost.append(f"{uid}: {spooled} does not hold what was sent")
    assert not lost, "acknowledged instances lost:\n" + "\n".join(lost)
    assert len(instances) == len(run.acked)

    # Nothing stuck: every series routed, its latest run done and delivered.
    unfinished = run.unfinished()
    assert unfinished == {"series": 0, "jobs": 0, "deliveries": 0}, unfinished
    assert run.count("SELECT COUNT(*) FROM series") == STUDIES * SERIES_PER_STUDY
    job_states = dict(run.rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
    assert set(job_states) == {"done"}, job_states
    delivery_states = dict(run.rows("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
    # An earlier run's undelivered results are superseded by the later run's, never sent.
    assert set(delivery_states) <= {"delivered", "superseded"}, delivery_states
    undelivered_runs = run.rows(
        "SELECT s.series_instance_uid, s.runs FROM series s WHERE NOT EXISTS ("
        "  SELECT 1 FROM jobs j JOIN deliveries d ON d.job_id = j.id"
        "  WHERE j.series_instance_uid = s.series_instance_uid AND j.run = s.runs"
        "  AND j.state = 'done' AND d.state = 'delivered')"
    )
    assert not undelivered_runs, undelivered_runs

    # Exactly one current set of results per series at the PACS.
    series_instances: dict[str, set[str]] = {}
    for path, series in run.series_uid.items():
        series_instances.setdefault(series, set()).add(run.sop_uid[path])
    segs: dict[str, set[str]] = {s: set() for s in series_instances}
    srs: dict[str, set[str]] = {s: set() for s in series_instances}
    problems = []
    for path in run.pacs.files():
        ds = dcmread(path)
        uid = str(ds.SOPInstanceUID)
        if ds.SOPClassUID == SEG_SOP_CLASS:
            sources = {str(s.SeriesInstanceUID) for s in ds.ReferencedSeriesSequence}
            referenced = {
                str(i.ReferencedSOPInstanceUID)
                for s in ds.ReferencedSeriesSequence
                for i in s.ReferencedInstanceSequence
            }
            if len(sources) != 1 or not sources <= set(segs):
                problems.append(f"SEG {uid} references series {sorted(sources)}")
                continue
            (source,) = sources
            segs[source].add(uid)
            if referenced != series_instances[source]:
                problems.append(
                    f"SEG {uid} of series {source} references {len(referenced)} instances, "
                    f"not the {len(series_instances[source])} of the series (stale results)"
                )
        elif ds.SOPClassUID == COMPREHENSIVE_3D_SR:
            evidence = set(sr_evidence_uids(ds))
            matching = [s for s, uids in series_instances.items() if uids & evidence]
            if len(matching) != 1:
                problems.append(f"SR {uid} has evidence from series {matching}")
                continue
            srs[matching[0]].add(uid)
            if not series_instances[matching[0]] <= evidence:
                problems.append(f"SR {uid} of series {matching[0]} lacks source evidence")
        else:
            problems.append(f"{path.name}: unexpected SOP class {ds.SOPClassUID}")
    for series in sorted(series_instances):
        if len(segs[series]) != 1 or len(srs[series]) != 1:
            problems.append(
                f"series {series}: {len(segs[series])} SEG, {len(srs[series])} SR at the PACS"
            )
    assert not problems, "results at the PACS:\n" + "\n".join(problems)

    # No unexpected traceback in the node's log.
    tracebacks = _unexpected_tracebacks(run.node.log_text())
    assert not tracebacks, "\n\n".join(tracebacks)

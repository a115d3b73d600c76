"""Study jobs through the running node, with real peers: DCMTK storescu -> node -> storescp.

The model is tests/study_bundles.py's contrast enhancement bundle: CT phases of one study as
input keys (``pre``, ``post``, an optional ``delayed``); its SEG is exactly the box of
voxels where a contrast phase is 100 HU above ``pre``, on the ``pre`` series' frames.

- a required role missing: at the deadline the study's job fails naming the role, as
  ``dicom-ai status`` shows; an optional role missing: the job runs at the deadline without
  it, and its SEG and SR reach the PACS;
- a late series replacing a role after the first results were delivered: the study runs
  again and the PACS holds one SEG and one SR (the same SOP Instance UIDs, storescp
  overwrites by them) whose contents are the rerun's;
- priority: one worker busy, three normal jobs queued, an urgent series (by the sender's AE
  title) arrives: its job starts before the queued ones (the index's ``started_at``);
- kill -9 while a study waits for a role and again while its job runs: after the restarts
  one SEG and one SR, every acknowledged instance indexed, nothing left unfinished.

Every SEG and SR the node delivered passes dciodvfy and reads back with highdicom; the
rerun's SR passes PixelMed's TID 1500 validator too (see ``_validate``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.peers import (
    NodeProcess,
    StoreSCP,
    child_pids,
    node_config,
    storescu,
    storescu_acked,
    wait_until,
)
from tests.results_check import COMPREHENSIVE_3D_SR, SEG_SOP_CLASS, sr_evidence_uids
from tests.study_bundles import (
    ENHANCEMENT_LABEL,
    LIVER_BOX,
    OTHER_LIVER_BOX,
    Box,
    Phase,
    make_enhancement_bundle,
    make_slow_bundle,
    release,
    write_phases,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.java, pytest.mark.slow]

DEADLINE = 4.0  # seconds after a study's first instance
TIMEOUT = 60  # for any one thing the node does here
PIPELINE = {"workers": 1, "quiet_seconds": 1, "release_grace_seconds": 0.2}


def _study_rules(path: Path, deadline: float) -> Path:
    path.write_text(
        "rules:\n"
        "  - name: enhancement\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: enhancement\n"
        "    destinations: [pacs]\n"
        "    study:\n"
        "      input: keys\n"
        "      reference: pre\n"
        f"      deadline_seconds: {deadline}\n"
        "      roles:\n"
        "        - {name: pre, match: {SeriesDescription: {equals: pre}}}\n"
        '        - {name: post, match: {SeriesDescription: {regex: "^post"}}}\n'
        "        - {name: delayed, match: {SeriesDescription: {equals: delayed}},"
        " required: false}\n"
    )
    return path


def _model(bundle: Path) -> dict[str, Any]:
    return {"bundle": str(bundle), "device": "cpu", "timeout_seconds": 120}


def _send(node: NodeProcess, paths: list[Path], calling_ae: str = "SCANNER") -> None:
    sent = storescu(node.port, paths, calling_ae=calling_ae)
    assert sent.returncode == 0, sent.stdout + sent.stderr


def _study_uid(paths: list[Path]) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _uids(paths: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _series_uid(paths: list[Path]) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


@dataclass
class Results:
    """The SEGs and SRs of one study at the PACS."""

    segs: list[tuple[Path, Dataset]]
    srs: list[tuple[Path, Dataset]]

    @property
    def one(self) -> tuple[Path, Dataset, Path, Dataset]:
        assert len(self.segs) == 1 and len(self.srs) == 1, (self.segs, self.srs)
        return (*self.segs[0], *self.srs[0])


def _results(pacs: StoreSCP, study_uid: str) -> Results:
    found = Results([], [])
    for path in pacs.files():
        ds = dcmread(path)
        if ds.StudyInstanceUID != study_uid:
            continue
        if ds.SOPClassUID == SEG_SOP_CLASS:
            found.segs.append((path, ds))
        elif ds.SOPClassUID == COMPREHENSIVE_3D_SR:
            found.srs.append((path, ds))
        else:
            raise AssertionError(f"{path.name}: unexpected SOP class {ds.SOPClassUID}")
    return found


def _delivered(node: NodeProcess, study_uid: str, jobs: int = 1) -> bool:
    """``jobs`` jobs of the study are done and the latest one's results delivered."""
    rows = node.index_rows(
        "SELECT j.state, d.state FROM jobs j LEFT JOIN deliveries d ON d.job_id = j.id "
        "WHERE j.study_instance_uid = ? ORDER BY j.run",
        study_uid,
    )
    return len(rows) >= jobs and rows[-1] == ("done", "delivered")


def _validate(seg_path: Path, sr_path: Path, template: bool = False) -> None:
    """dciodvfy (both) and highdicom reads both back; with ``template``, PixelMed's TID 1500
    validator too. That takes 7-15 s per SR on two shared cores, so it checks one study SR:
    the rerun's (three series, one role replaced); the others differ from it only in how
    many series and instances they name (the priority test's are one-series SRs, as
    elsewhere in the suite)."""
    assert_dciodvfy_clean(seg_path)
    assert_dciodvfy_clean(sr_path)
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY"
    hd.sr.srread(sr_path)
    if template:
        assert_sr_template_valid(sr_path)


def _seg_mask(seg: Dataset, reference: list[Path]) -> npt.NDArray[np.bool_]:
    """The SEG's segments on the reference series' grid, (slices, rows, columns)."""
    slice_of = {uid: k for k, uid in enumerate(_ordered_uids(reference))}
    first = dcmread(reference[0], stop_before_pixels=True)
    mask = np.zeros((len(reference), int(first.Rows), int(first.Columns)), dtype=bool)
    pixels = seg.pixel_array.reshape(-1, mask.shape[1], mask.shape[2])
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        mask[slice_of[str(source.ReferencedSOPInstanceUID)]] |= frame.astype(bool)
    return mask


def _ordered_uids(paths: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def _check_study_results(
    seg: Dataset,
    sr: Dataset,
    reference: list[Path],
    inputs: list[list[Path]],
    box: Box,
    not_inputs: Sequence[list[Path]] = (),
) -> None:
    """The SEG lies on the reference (``pre``) frames and is exactly ``box``; the SR's
    evidence names every instance of every input series and the SEG, and none of
    ``not_inputs``."""
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == [ENHANCEMENT_LABEL]
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {
        _series_uid(reference)
    }
    mask = _seg_mask(seg, reference)
    assert np.array_equal(mask, box.mask(mask.shape)), (int(mask.sum()), box.voxels)
    evidence = set(sr_evidence_uids(sr))
    assert str(seg.SOPInstanceUID) in evidence
    for paths in inputs:
        assert _uids(paths) <= evidence, f"series {_series_uid(paths)} not in the SR's evidence"
    for paths in not_inputs:
        assert not _uids(paths) & evidence, f"series {_series_uid(paths)} in the SR's evidence"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == _study_uid(reference)


def _unfinished(node: NodeProcess) -> dict[str, int]:
    def count(sql: str) -> int:
        return int(node.index_rows(sql)[0][0])

    return {
        "series": count("SELECT COUNT(*) FROM series WHERE dirty = 1"),
        "studies": count("SELECT COUNT(*) FROM studies WHERE state IN ('waiting', 'overdue')"),
        "jobs": count("SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')"),
        "deliveries": count("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'"),
    }


def _no_traceback(node: NodeProcess) -> None:
    log = node.log_text()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :]


# -- a node with the study rule, for the role tests ---------------------------------------------


@dataclass
class StudyNode:
    node: NodeProcess
    pacs: StoreSCP
    cases: Path


@pytest.fixture(scope="class")
def study_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudyNode]:
    root = tmp_path_factory.mktemp("studies")
    bundle = make_enhancement_bundle(root / "bundles")
    pacs = StoreSCP(root / "pacs").start()
    config = node_config(
        root / "node",
        pacs.port,
        rules=_study_rules(root / "rules.yaml", DEADLINE),
        models={"enhancement": _model(bundle)},
        pipeline=PIPELINE,
    )
    node = NodeProcess(root / "node", config)
    try:
        node.start()
        yield StudyNode(node, pacs, root / "cases")
        _no_traceback(node)
    finally:
        node.stop()
        pacs.stop()


class TestRoles:
    """Two studies' roles on one node (the class's): the deadline, a role replaced."""

    def test_missing_roles_at_the_deadline(self, study_node: StudyNode) -> None:
        node, pacs, cases = study_node.node, study_node.pacs, study_node.cases
        # Study 1 lacks the required post phase, study 2 the optional delayed one.
        no_post = write_phases(cases / "no-post", "no-post", [Phase("pre"), Phase("delayed")])
        no_delayed = write_phases(
            cases / "no-delayed", "no-delayed", [Phase("pre"), Phase("post", LIVER_BOX)]
        )
        for phases in (no_post, no_delayed):
            for paths in phases.values():
                _send(node, paths)
        failing, running = _study_uid(no_post["pre"]), _study_uid(no_delayed["pre"])

        def study_jobs(study: str) -> list[tuple[Any, ...]]:
            return node.index_rows(
                "SELECT j.state, j.error, j.inputs, j.created_at - s.first_received FROM jobs j "
                "JOIN studies s ON s.study_instance_uid = j.study_instance_uid "
                "WHERE j.study_instance_uid = ?",
                study,
            )

        wait_until(lambda: _delivered(node, running), TIMEOUT, "the study without delayed to run")
        wait_until(lambda: bool(study_jobs(failing)), TIMEOUT, "the study without post to fail")
        # Each job was made at its study's deadline, not before.
        ((state, error, _, after),) = study_jobs(failing)
        assert (state, error) == ("failed", "required role post missing")
        assert float(after) >= DEADLINE
        ((state, _, inputs, after),) = study_jobs(running)
        assert state == "done" and float(after) >= DEADLINE
        assert dict(json.loads(inputs)["roles"]) == {
            "pre": _series_uid(no_delayed["pre"]),
            "post": _series_uid(no_delayed["post"]),
            "delayed": None,
        }
        status = subprocess.run(
            [sys.executable, "-m", "dicom_ai.cli", "status", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        out = " ".join(status.stdout.split())  # rich wraps long lines
        assert f"study {failing} (rule enhancement, failed" in out, out
        assert "required role post missing" in out, out
        assert not _results(pacs, failing).segs + _results(pacs, failing).srs

        seg_path, seg, sr_path, sr = _results(pacs, running).one
        _validate(seg_path, sr_path)
        pre, post = no_delayed["pre"], no_delayed["post"]
        _check_study_results(seg, sr, pre, [pre, post], LIVER_BOX)

    def test_a_late_series_replacing_a_role_reruns_and_supersedes(
        self, study_node: StudyNode
    ) -> None:
        node, pacs = study_node.node, study_node.pacs
        phases = write_phases(
            study_node.cases / "late",
            "late",
            [
                Phase("pre"),
                Phase("post", LIVER_BOX),
                Phase("delayed"),
                Phase("post repeat", OTHER_LIVER_BOX),
            ],
        )
        pre, post, delayed, repeat = (phases[k] for k in ("pre", "post", "delayed", "post repeat"))
        study = _study_uid(pre)
        # Every role in one association: the study starts at once, well before its deadline.
        _send(node, [*pre, *post, *delayed])
        wait_until(lambda: _delivered(node, study), TIMEOUT, "the first run's results")
        seg_path, seg, sr_path, sr = _results(pacs, study).one
        _check_study_results(seg, sr, pre, [pre, post, delayed], LIVER_BOX, [repeat])
        first_uids = {str(seg.SOPInstanceUID), str(sr.SOPInstanceUID)}

        _send(node, repeat)  # post is taken again: the latest series fitting it
        wait_until(lambda: _delivered(node, study, jobs=2), TIMEOUT, "the rerun's results")
        seg_path, seg, sr_path, sr = _results(pacs, study).one
        assert {str(seg.SOPInstanceUID), str(sr.SOPInstanceUID)} == first_uids
        stored = pacs.log.read_text()  # the rerun's objects replaced the first run's files
        assert f"overwriting: {seg_path}" in stored and f"overwriting: {sr_path}" in stored
        _validate(seg_path, sr_path, template=True)
        _check_study_results(seg, sr, pre, [pre, repeat, delayed], OTHER_LIVER_BOX, [post])
        runs = node.index_rows(
            "SELECT j.run, j.state, d.state FROM jobs j JOIN deliveries d ON d.job_id = j.id "
            "WHERE j.study_instance_uid = ? ORDER BY j.run",
            study,
        )
        assert runs == [(1, "done", "delivered"), (2, "done", "delivered")], runs


# -- priority ----------------------------------------------------------------------------------


def test_an_urgent_series_runs_before_queued_normal_jobs(tmp_path: Path, pacs: StoreSCP) -> None:
    bundle = make_slow_bundle(tmp_path / "bundles", seconds=TIMEOUT)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: slow\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: slow\n"
        "    destinations: [pacs]\n"
        "    urgent: {calling_ae: {equals: ED_CT}}\n"
    )
    config = node_config(
        tmp_path / "node",
        pacs.port,
        rules=rules,
        models={"slow": _model(bundle)},
        pipeline=PIPELINE,
    )
    series = [
        write_phantom_ct(
            tmp_path / f"ct{n}",
            PhantomSpec(slices=4, rows=64, columns=64, pixel_spacing_mm=5.0, seed=n),
        )
        for n in range(5)
    ]
    *normal, urgent = [_series_uid(paths) for paths in series]
    node = NodeProcess(tmp_path / "node", config).start()
    try:

        def jobs() -> dict[str, tuple[str, int, float | None]]:
            rows = node.index_rows(
                "SELECT series_instance_uid, state, priority, started_at FROM jobs"
            )
            return {str(uid): (str(state), int(p), t) for uid, state, p, t in rows}

        for paths in series[:4]:
            _send(node, paths)
        # The first normal job holds the one worker (its model waits for the release).
        wait_until(
            lambda: (
                [jobs().get(uid, ("",))[0] for uid in normal]
                == ["running", "pending", "pending", "pending"]
            ),
            TIMEOUT,
            "one normal job running and three queued",
        )
        _send(node, series[4], calling_ae="ED_CT")
        wait_until(lambda: urgent in jobs(), TIMEOUT, "the urgent job")
        assert jobs()[urgent][:2] == ("pending", 1)
        assert [jobs()[uid][0] for uid in normal[1:]] == ["pending"] * 3
        release(bundle)
        wait_until(
            lambda: len(pacs.files()) == 10 and not any(_unfinished(node).values()),
            TIMEOUT,
            "every job's results at the PACS",
        )
        started = {uid: float(row[2] or 0) for uid, row in jobs().items()}
        _no_traceback(node)
    finally:
        release(bundle)
        node.stop()
    assert started[normal[0]] < started[urgent] < min(started[uid] for uid in normal[1:]), started
    assert {uid: p for uid, (_, p, _) in jobs().items()} == {**dict.fromkeys(normal, 0), urgent: 1}
    for paths in series:
        seg_path, _, sr_path, _ = _results(pacs, _study_uid(paths)).one
        _validate(seg_path, sr_path)


# -- kill -9 -----------------------------------------------------------------------------------


def _kill9(node: NodeProcess) -> None:
    """SIGKILL the node and, by pid, its workers (as systemd or a container would)."""
    assert node.proc is not None
    workers = child_pids(node.proc.pid)
    node.kill9()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_kill9_during_a_study_wait_and_during_its_job(tmp_path: Path) -> None:
    bundle = make_enhancement_bundle(tmp_path / "bundles", seconds=TIMEOUT)
    pacs = StoreSCP(tmp_path / "pacs").start()
    config = node_config(
        tmp_path / "node",
        pacs.port,
        rules=_study_rules(tmp_path / "rules.yaml", deadline=120),  # it waits for every role
        models={"enhancement": _model(bundle)},
        pipeline=PIPELINE,
    )
    node = NodeProcess(tmp_path / "node", config)
    phases = write_phases(
        tmp_path / "ct", "crash", [Phase("pre"), Phase("delayed"), Phase("post", LIVER_BOX)]
    )
    pre, delayed, post = (phases[k] for k in ("pre", "delayed", "post"))
    study = _study_uid(pre)
    acked: set[Path] = set()

    def send(paths: list[Path]) -> None:
        code, answered, output = storescu_acked(node.port, paths)
        acked.update(answered)
        assert code == 0 and len(answered) == len(paths), output

    try:
        node.start()
        send(pre)
        send(delayed)
        wait_until(
            lambda: (
                node.index_rows(
                    "SELECT state, dirty, (SELECT COUNT(*) FROM study_members m WHERE "
                    "m.study_instance_uid = s.study_instance_uid) FROM studies s"
                )
                == [("waiting", 0, 2)]
            ),
            TIMEOUT,
            "the study to wait for post",
        )
        _kill9(node)  # waiting for a role

        node.start()
        send(post)
        marker = bundle / "started"
        wait_until(marker.exists, TIMEOUT, "the study's job to reach the model")
        assert node.index_rows("SELECT state FROM jobs") == [("running",)]
        _kill9(node)  # in the study's job

        release(bundle)
        node.start()
        wait_until(lambda: _delivered(node, study), TIMEOUT, "the results after the restart")
        _no_traceback(node)
    finally:
        node.stop()
        pacs.stop()

    assert _unfinished(node) == {"series": 0, "studies": 0, "jobs": 0, "deliveries": 0}
    assert acked == {*pre, *delayed, *post}
    indexed = {str(uid) for (uid,) in node.index_rows("SELECT sop_instance_uid FROM instances")}
    assert indexed == _uids([*acked])
    # One job, run again after the kill in it, delivered once.
    assert node.index_rows("SELECT run, state, attempts FROM jobs") == [(1, "done", 2)]
    assert node.index_rows("SELECT state, attempts FROM deliveries") == [("delivered", 1)]
    seg_path, seg, sr_path, sr = _results(pacs, study).one
    _validate(seg_path, sr_path)
    _check_study_results(seg, sr, pre, [pre, post, delayed], LIVER_BOX)

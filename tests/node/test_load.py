"""Load: 8 associations at once, 100 slices each, each its own series.

Eight DCMTK storescu processes start together against one node. Every instance must be
acknowledged (storescu exits 0 and reports Success 100 times), fsynced in the spool and
indexed; every series routed to the built-in ct-body model; every job done; and the PACS
(DCMTK storescp) must hold exactly one SEG and one SR per series, each SEG referencing its
own series and each SR its own SEG. Slices are 64x64 so the models stay quick.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, node_config, wait_until
from tests.results_check import (
    COMPREHENSIVE_3D_SR,
    SEG_SOP_CLASS,
    Delivered,
    check_phantom_results,
    sr_evidence_uids,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.slow]

SENDERS = 8
SLICES = 100
RESULTS_TIMEOUT = 75


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[PhantomSpec, list[Path]]]:
    """Eight small phantom CT series, each in its own study, with distinct patients."""
    root = tmp_path_factory.mktemp("load")
    out = []
    for n in range(SENDERS):
        spec = PhantomSpec(
            slices=SLICES,
            rows=64,
            columns=64,
            pixel_spacing_mm=4.0,
            patient_id=f"LOAD-{n:04d}",
            seed=n + 1,
        )
        out.append((spec, write_phantom_ct(root / f"series{n}", spec)))
    return out


def _start_senders(
    port: int, workdir: Path, paths: list[list[Path]]
) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ, TCP_NODELAY="1")
    procs = []
    for n, files in enumerate(paths):
        # A file per sender, not a pipe: eight chatty processes must never block on output.
        log = (workdir / f"storescu-{n}.log").open("wb")
        procs.append(
            subprocess.Popen(
                # -v: one "Received Store Response (Success)" line per acknowledged instance
                [
                    "storescu",
                    "-v",
                    "-R",
                    "-aet",
                    f"SCANNER{n}",
                    "-aec",
                    "DICOM_AI",
                    "127.0.0.1",
                    str(port),
                    *map(str, files),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        log.close()
    return procs


def _pair_results(files: list[Path]) -> dict[str, Delivered]:
    """Source series UID -> the SEG that references it and the SR whose evidence is that SEG."""
    segs: dict[str, tuple[Path, Dataset]] = {}
    srs: list[tuple[Path, Dataset]] = []
    for path in files:
        ds = dcmread(path)
        if ds.SOPClassUID == SEG_SOP_CLASS:
            (referenced,) = ds.ReferencedSeriesSequence  # one source series per SEG
            source = str(referenced.SeriesInstanceUID)
            assert source not in segs, f"two SEGs reference series {source}"
            segs[source] = (path, ds)
        else:
            assert ds.SOPClassUID == COMPREHENSIVE_3D_SR, (path, ds.SOPClassUID)
            srs.append((path, ds))
    by_seg_uid = {str(ds.SOPInstanceUID): source for source, (_, ds) in segs.items()}
    paired: dict[str, Delivered] = {}
    for sr_path, sr in srs:
        sources = {by_seg_uid[uid] for uid in sr_evidence_uids(sr) if uid in by_seg_uid}
        assert len(sources) == 1, f"SR {sr_path.name} has evidence from SEGs of {sources}"
        (source,) = sources
        assert source not in paired, f"two SRs for series {source}"
        seg_path, seg = segs[source]
        paired[source] = Delivered(seg, sr, seg_path, sr_path)
    return paired


def test_eight_concurrent_associations(
    tmp_path: Path, series: list[tuple[PhantomSpec, list[Path]]]
) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    config = node_config(tmp_path / "node", pacs.port, pipeline={"workers": 2})
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        started = time.monotonic()
        senders = _start_senders(node.port, tmp_path, [paths for _, paths in series])
        codes = [p.wait(timeout=120) for p in senders]
        send_seconds = time.monotonic() - started
        logs = [(tmp_path / f"storescu-{n}.log").read_text() for n in range(SENDERS)]
        for n, (code, log) in enumerate(zip(codes, logs, strict=True)):
            assert code == 0, f"storescu {n} exited {code}:\n{log[-3000:]}"
            assert log.count("Received Store Response (Success)") == SLICES, log[-3000:]

        # Acknowledged means spooled and indexed: 800 rows, 100 per series, every file there.
        rows = node.index_rows("SELECT sop_instance_uid, series_instance_uid, path FROM instances")
        assert len(rows) == SENDERS * SLICES
        per_series: dict[str, set[str]] = {}
        for sop, series_uid, path in rows:
            per_series.setdefault(series_uid, set()).add(sop)
            assert Path(path).is_file(), path
        sent = {
            spec.series_instance_uid: {
                str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
            }
            for spec, paths in series
        }
        assert per_series == sent

        # The eight associations were open at the same time (not served one after another).
        # The node records a close after the sender has gone: wait for all eight.
        wait_until(
            lambda: (
                node.index_rows("SELECT count(*) FROM associations WHERE closed_at IS NOT NULL")
                == [(SENDERS,)]
            ),
            10,
            "every association's end recorded",
        )
        spans = node.index_rows("SELECT opened_at, closed_at FROM associations")
        assert len(spans) == SENDERS, spans
        assert max(opened for opened, _ in spans) < min(closed for _, closed in spans), spans

        wait_until(
            lambda: len(pacs.files()) >= 2 * SENDERS, RESULTS_TIMEOUT, "16 results at the PACS", 0.5
        )
        wait_until(
            lambda: (
                node.index_rows("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
                == [(SENDERS,)]
            ),
            10,
            "every delivery recorded",
        )
        time.sleep(1.0)  # a duplicate would come right after
        files = pacs.files()
        jobs = node.index_rows("SELECT series_instance_uid, rule, model, state FROM jobs")
        routed = node.index_rows("SELECT count(*) FROM series WHERE runs = 1 AND dirty = 0")
    finally:
        node.stop()
        pacs.stop()
    print(f"8 x {SLICES} sent in {send_seconds:.1f} s; results {time.monotonic() - started:.1f} s")

    assert routed == [(SENDERS,)]
    assert sorted(jobs) == sorted((uid, "ct-body", "ct-body", "done") for uid in sent)
    assert len(files) == 2 * SENDERS, [f.name for f in files]
    paired = _pair_results(files)
    assert set(paired) == set(sent)
    for spec, paths in series:
        delivered = check_phantom_results(
            [paired[spec.series_instance_uid].seg_path, paired[spec.series_instance_uid].sr_path],
            paths,
            spec,
        )
        assert delivered.seg.PatientID == spec.patient_id
    log = node.log_text()
    assert "Traceback" not in log, log[-5000:]

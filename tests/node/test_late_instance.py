"""A late instance of a series whose sources were purged, end to end (store/retention.py):
it is stored and acknowledged, never run on its own (a run on part of the series would
replace, at the PACS, results made from all of it), and the note of its series says why;
the whole series sent again runs again, and its results replace the first ones under the
same UIDs.

A node with tiny retention (sources and results kept seconds after delivery, a cleanup
every half second) and DCMTK storescp as the PACS. A CT series of 11 slices is sent as 10,
delivered and purged; then slice 11 comes alone; then all 11 are sent again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, node_config, storescu_acked, wait_until
from tests.results_check import SEG_SOP_CLASS, split_results, sr_evidence_uids

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SLICES = 11
KEEP_SECONDS = 5.0  # keep_sources_hours and keep_results_hours, in seconds
TIMEOUT = 60


def _rows(node: NodeProcess, sql: str, *args: object) -> list[tuple[Any, ...]]:
    uri = f"file:{node.data_dir / 'index.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql, args).fetchall()


def _seg_sources(pacs: StoreSCP) -> set[str]:
    """The source instances the SEG at the PACS references."""
    for path in pacs.files():
        ds = dcmread(path)
        if ds.SOPClassUID == SEG_SOP_CLASS:
            return {
                str(item.ReferencedSOPInstanceUID)
                for series in ds.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence
            }
    raise AssertionError("no SEG at the PACS")


def test_late_instance_of_a_purged_series_is_kept_not_run_until_the_whole_series_returns(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    t0 = time.monotonic()
    spec = PhantomSpec(slices=SLICES, rows=128, columns=128, pixel_spacing_mm=3.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    sop_uid = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    series = spec.series_instance_uid
    first, late = paths[:-1], paths[-1]
    config = node_config(
        tmp_path / "node",
        pacs.port,
        pipeline={"workers": 1, "quiet_seconds": 1, "release_grace_seconds": 0.3},
        storage={
            "keep_sources_hours": KEEP_SECONDS / 3600,
            "keep_results_hours": KEEP_SECONDS / 3600,
            "cleanup_interval_seconds": 0.5,
        },
    )
    node = NodeProcess(tmp_path / "node", config).start()

    def one(sql: str, *args: object) -> Any:
        return _rows(node, sql, *args)[0][0]

    def instances() -> int:
        return int(one("SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", series))

    def send(files: list[Path]) -> None:
        code, acked, output = storescu_acked(node.port, files)
        assert code == 0 and acked == files, output  # every one answered Success

    def pacs_state() -> dict[str, float]:
        return {p.name: p.stat().st_mtime_ns for p in pacs.files()}

    try:
        # 1. Ten slices: run, delivered, then purged (sources and results).
        send(first)
        # The files appear while storescp still writes them: wait for the node's record
        # that the PACS answered Success for both before taking their times.
        wait_until(
            lambda: (
                len(pacs.files()) == 2
                and one("SELECT COUNT(*) FROM deliveries WHERE state != 'delivered'") == 0
                and one("SELECT COUNT(*) FROM deliveries") > 0
            ),
            TIMEOUT,
            "SEG and SR delivered to the PACS",
        )
        delivered_first = pacs_state()
        first_sources = _seg_sources(pacs)
        assert first_sources == {sop_uid[p] for p in first}
        wait_until(
            lambda: (
                instances() == 0
                and one("SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NULL") == 0
            ),
            TIMEOUT,
            "the series' sources and results purged",
        )
        purged_after = time.monotonic() - t0
        assert not list((node.data_dir / "spool" / "results").iterdir())
        assert one(
            "SELECT purged_instances FROM series WHERE series_instance_uid = ?", series
        ) == len(first)

        # 2. The eleventh slice alone: acknowledged, kept, routed to nothing, with the reason.
        send([late])
        wait_until(
            lambda: one("SELECT runs FROM series WHERE series_instance_uid = ?", series) == 2,
            TIMEOUT,
            "the late instance routed",
        )
        (path, purged) = _rows(
            node,
            "SELECT path, purged FROM instances WHERE sop_instance_uid = ?",
            sop_uid[late],
        )[0]
        assert purged == 0 and Path(path).is_file()  # kept, as any acknowledged instance
        assert dcmread(path).SOPInstanceUID == sop_uid[late]
        note = one("SELECT routed_note FROM series WHERE series_instance_uid = ?", series)
        assert note.startswith("not run: its earlier instances were purged at "), note
        # The count is of instances, not of which: 10 purged, 1 new here, "9" missing.
        assert re.search(
            r"after their results were delivered, and \d+ of them have not come back", note
        ), note
        assert "send the whole series again to run it" in note, note
        status = subprocess.run(
            [sys.executable, "-m", "dicom_ai.cli", "status", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "120"},
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        # No job for it, nothing pending: the one job is run 1's.
        assert _rows(node, "SELECT run, state FROM jobs WHERE series_instance_uid = ?", series) == [
            (1, "done")
        ]
        # Until retention takes the late instance too, nothing new reaches the PACS.
        wait_until(lambda: instances() == 0, TIMEOUT, "the late instance purged in its turn")
        assert pacs_state() == delivered_first
        assert one(
            "SELECT purged_instances FROM series WHERE series_instance_uid = ?", series
        ) == len(paths)
        log = node.log_text()
        assert f"WARNING dicom_ai.pipeline.scheduler: series {series} (1 new instances): " in log
        late_seen = time.monotonic() - t0

        # 3. The whole series again: it runs, and replaces the results under the same UIDs.
        send(paths)
        wait_until(
            lambda: (
                pacs_state().keys() == delivered_first.keys()
                and all(pacs_state()[n] > delivered_first[n] for n in delivered_first)
                and one("SELECT COUNT(*) FROM deliveries WHERE state != 'delivered'") == 0
                and one("SELECT COUNT(*) FROM deliveries") == 2
            ),
            TIMEOUT,
            "the second run's SEG and SR at the PACS",
        )
        jobs = _rows(node, "SELECT run, state FROM jobs WHERE series_instance_uid = ?", series)
        note_after = one("SELECT routed_note FROM series WHERE series_instance_uid = ?", series)
    finally:
        node.stop()

    assert jobs == [(1, "done"), (3, "done")], jobs
    assert not note_after.startswith("not run"), note_after
    assert sorted(pacs_state()) == sorted(delivered_first)  # the same SOP Instance UIDs
    assert _seg_sources(pacs) == set(sop_uid.values())  # made from all eleven slices
    assert set(sr_evidence_uids(split_results(pacs.files()).sr)) >= set(sop_uid.values())
    print(
        f"\n{len(first)} slices delivered and purged at {purged_after:.1f} s; slice "
        f"{SLICES} alone kept and not run (note: {note!r}); {len(paths)} slices again at "
        f"{late_seen:.1f} s ran as run 3; the SEG now references {len(_seg_sources(pacs))} "
        f"instances (first: {len(first_sources)}); `dicom-ai status`:\n{status.stdout}"
        f"total {time.monotonic() - t0:.1f} s"
    )

"""Disk pressure: a node on a small disk keeps receiving for ever, because below
``storage.emergency_free_bytes`` the cleaner purges what was delivered, oldest first, long
before its time; what is not delivered stays, and C-STORE never answers 0xA700.

On a real, small filesystem: a size-limited tmpfs mounted here (needs root; skipped
otherwise, with the reason), the node's whole data directory on it. Every ``keep_*`` is a
thousand hours, so only the emergency path deletes. One study is routed to a destination
that is down (its delivery backs off, then goes to dead letter: never deleted); then study
after study goes to the PACS, each sent once its predecessor was delivered, until several
times the disk's size was sent.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import (
    NodeProcess,
    StoreSCP,
    free_port,
    node_config,
    storescu_acked,
    tmpfs,
    wait_until,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

MiB = 1024 * 1024
DISK = 32 * MiB
MIN_FREE = 2 * MiB  # node.min_free_bytes: C-STORE answers 0xA700 below it
EMERGENCY = 14 * MiB  # storage.emergency_free_bytes
STUDIES = 26  # of ~4.2 MB each (8 slices of 512x512), after the one that stays
SLICES = 8
DELIVERY_TIMEOUT = 60
LONG = 1000.0


@pytest.fixture
def pressure_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "disk", DISK // MiB) as mount_point:
        yield mount_point


def _rows(node: NodeProcess, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """``node.index_rows``, with the connection closed at once: an open one (a cycle keeps
    it until the garbage collector runs) would hold the tmpfs busy at its unmount."""
    uri = f"file:{node.data_dir / 'index.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql, args).fetchall()


RULES = """\
rules:
  - name: held
    priority: 20
    match: {SeriesDescription: {equals: HELD}}
    model: ct-body
    destinations: [archive]
  - name: ct-body
    priority: 10
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs]
"""


def _study(directory: Path, number: int, description: str) -> tuple[str, list[Path]]:
    spec = PhantomSpec(
        slices=SLICES,
        rows=512,
        columns=512,
        series_description=description,
        seed=number,
    )
    return spec.series_instance_uid, write_phantom_ct(directory / f"study{number:02d}", spec)


def test_emergency_purge_frees_delivered_studies_keeps_the_pending_one_c_store_succeeds(
    pressure_disk: Path, tmp_path: Path, pacs: StoreSCP
) -> None:
    t0 = time.monotonic()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = node_config(
        tmp_path / "node",
        pacs.port,
        rules=rules,
        node={"data_dir": str(pressure_disk / "data"), "min_free_bytes": MIN_FREE},
        destinations={"archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": free_port()}},
        pipeline={"workers": 1, "quiet_seconds": 1, "release_grace_seconds": 0.3},
        storage={
            "keep_sources_hours": LONG,
            "keep_results_hours": LONG,
            "keep_unrouted_hours": LONG,
            "emergency_free_bytes": EMERGENCY,
        },
    )
    node = NodeProcess(tmp_path / "node", config).start()
    spool = node.data_dir / "spool"

    def count(sql: str, *args: object) -> int:
        return int(_rows(node, sql, *args)[0][0])

    def delivery_state(series_uid: str) -> str | None:
        rows = _rows(
            node,
            "SELECT d.state FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE j.series_instance_uid = ? ORDER BY d.id DESC LIMIT 1",
            series_uid,
        )
        return str(rows[0][0]) if rows else None

    def wait_delivered(uid: str, what: str) -> None:
        wait_until(
            lambda: delivery_state(uid) == "delivered", DELIVERY_TIMEOUT, f"{what} delivered"
        )

    def send(paths: list[Path]) -> None:
        code, acked, output = storescu_acked(node.port, paths)
        assert code == 0 and acked == paths, output

    try:
        held_uid, held_paths = _study(tmp_path / "ct", 0, "HELD")
        send(held_paths)
        wait_until(
            lambda: (
                count(
                    "SELECT COUNT(*) FROM deliveries WHERE destination = 'archive' AND attempts > 0"
                )
                > 0
            ),
            DELIVERY_TIMEOUT,
            "the held study's first failed delivery",
        )
        held_job = count("SELECT id FROM jobs WHERE series_instance_uid = ?", held_uid)
        held_files = {p.name for p in (spool / "instances").rglob("*.dcm")}
        assert len(held_files) == SLICES

        sent_bytes = sum(p.stat().st_size for p in held_paths)
        lowest_free = shutil.disk_usage(pressure_disk).free
        delivered: list[str] = []
        for number in range(1, STUDIES + 1):
            uid, paths = _study(tmp_path / "ct", number, "Phantom CT")
            lowest_free = min(lowest_free, shutil.disk_usage(pressure_disk).free)
            send(paths)
            sent_bytes += sum(p.stat().st_size for p in paths)
            wait_delivered(uid, f"study {number}")
            delivered.append(uid)
            shutil.rmtree(paths[0].parent)  # the test's own copy: tmp_path is not the tmpfs
        # The cleaner relieves once a second: let it catch up with the last study.
        wait_until(
            lambda: shutil.disk_usage(pressure_disk).free >= EMERGENCY,
            10,
            "free space back above emergency_free_bytes",
        )
        log = node.log_text()
    finally:
        node.stop()

    purged = [
        uid
        for uid in delivered
        if count("SELECT COUNT(*) FROM instances WHERE series_instance_uid = ?", uid) == 0
    ]
    results_purged = count(
        "SELECT COUNT(*) FROM jobs WHERE results_purged_at IS NOT NULL "
        "AND series_instance_uid != ?",
        held_uid,
    )
    pacs_files = pacs.files()
    print(
        f"\nsent {sent_bytes / 1e6:.0f} MB ({sent_bytes / DISK:.1f} times the {DISK // MiB} MiB "
        f"disk) in {STUDIES + 1} studies; lowest free space before a study "
        f"{lowest_free / MiB:.1f} MiB (0xA700 below {MIN_FREE // MiB} MiB, emergency below "
        f"{EMERGENCY // MiB} MiB); sources of {len(purged)} of {len(delivered)} delivered "
        f"studies and results of {results_purged} jobs purged; the held study's "
        f"{SLICES} files kept; {len(pacs_files)} objects at the PACS; "
        f"{log.count('storage.emergency_free_bytes')} emergency purges logged; "
        f"{time.monotonic() - t0:.0f} s"
    )
    assert sent_bytes > 3 * DISK
    # C-STORE answered Success to every file (send()); and never refused anything.
    assert "0xA700" not in log and "free space below 2097152" not in log
    assert "WARNING dicom_ai.store.retention: free space below storage.emergency_free_bytes" in (
        log
    ), log
    # The delivered studies went, oldest first; only the newest few may still be here.
    assert len(purged) >= STUDIES - 4, (purged, delivered)
    assert purged == delivered[: len(purged)]
    assert results_purged >= STUDIES - 4
    # On disk, by the spool's own account: the held series and the delivered ones not purged.
    on_disk = {p.parent.name for p in (spool / "instances").rglob("*.dcm")}
    assert on_disk == {held_uid} | (set(delivered) - set(purged))
    kept_result_dirs = {int(p.name) for p in (spool / "results").iterdir()}
    assert held_job in kept_result_dirs
    # Every delivered study's SEG and SR reached the PACS before it went.
    assert len(pacs_files) == 2 * STUDIES
    # The held study: undelivered, every file and row still there, its results too.
    assert delivery_state(held_uid) in {"pending", "dead"}
    rows = _rows(node, "SELECT path, purged FROM instances WHERE series_instance_uid = ?", held_uid)
    assert len(rows) == SLICES and all(purged == 0 for _, purged in rows)
    for path, _ in rows:
        assert Path(path).name in held_files
        assert dcmread(path, stop_before_pixels=True).SeriesInstanceUID == held_uid
    assert count("SELECT has_sources FROM series WHERE series_instance_uid = ?", held_uid) == 1
    assert any((spool / "results" / str(held_job)).iterdir())

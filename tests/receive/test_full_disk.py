"""A full disk: C-STORE answers 0xA700, nothing partial is left, and receiving resumes by
itself when space returns. On a real, small filesystem: a size-limited tmpfs mounted here
(needs root; skipped otherwise, with the reason)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage

from dicom_ai.dimse.scp import StorageSCP
from dicom_ai.store.index import Index
from dicom_ai.store.spool import Spool
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, echoscu, node_config, storescu, tmpfs
from tests.raw_dicom import c_store_status

pytestmark = [pytest.mark.dcmtk]

MiB = 1024 * 1024
DISK = 24 * MiB
WATERMARK = 8 * MiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "disk", DISK // MiB) as mount_point:
        yield mount_point


def _fill(disk: Path, leave_free: int) -> Path:
    """A filler file that leaves about ``leave_free`` bytes free on ``disk``."""
    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - leave_free
    assert size > 0
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    assert abs(shutil.disk_usage(disk).free - leave_free) < MiB
    return filler


def _instance_files(spool: Path) -> list[Path]:
    return sorted((spool / "instances").rglob("*.dcm"))


@pytest.fixture
def node_on_small_disk(small_disk: Path, tmp_path: Path, pacs: StoreSCP) -> Iterator[NodeProcess]:
    data_dir = str(small_disk / "data")
    config = node_config(
        tmp_path / "node", pacs.port, node={"data_dir": data_dir, "min_free_bytes": WATERMARK}
    )
    node = NodeProcess(tmp_path / "node", config).start()
    yield node
    node.stop()


def test_below_the_watermark_0xa700_then_resumes_when_space_returns(
    node_on_small_disk: NodeProcess, small_disk: Path, tmp_path: Path
) -> None:
    node = node_on_small_disk
    spool = node.data_dir / "spool"
    paths = write_phantom_ct(tmp_path / "ct", PhantomSpec(slices=3, rows=64, columns=64))
    filler = _fill(small_disk, leave_free=WATERMARK // 2)

    refused = storescu(node.port, paths, options=["-v"])
    assert refused.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in refused.stdout + refused.stderr
    assert c_store_status(node.port, CTImageStorage, paths[1]) == 0xA700
    log = node.log_text()
    assert log.count("refused with 0xA700: free space below 8388608 bytes") == 2
    assert _instance_files(spool) == []
    assert list((spool / "tmp").iterdir()) == []
    assert node.index_rows("SELECT COUNT(*) FROM instances") == [(0,)]
    assert echoscu(node.port).returncode == 0  # refusing to store is not refusing to talk

    filler.unlink()
    assert node.proc is not None and node.proc.poll() is None  # the same process, no restart
    sent = storescu(node.port, paths)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(_instance_files(spool)) == 3
    assert node.index_rows("SELECT COUNT(*) FROM instances") == [(3,)]
    for stored in _instance_files(spool):
        assert stored.read_bytes()[128:132] == b"DICM"


class _BlindSpool(Spool):
    """A spool whose watermark check sees plenty of space: as when another process fills
    the disk between the check and the write. The write then meets ENOSPC for real."""

    def free_bytes(self) -> int:
        return 10**15


def test_disk_full_during_the_write_0xa700_and_no_partial_file(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_ai")
    spool_root = small_disk / "spool"
    scp = StorageSCP(
        "DICOM_AI", "127.0.0.1", 0, _BlindSpool(spool_root), Index(tmp_path / "index.db")
    )
    scp.start()
    try:
        assert scp.port is not None
        # A 256x256 slice is ~130 KiB; 64 KiB free: the write starts and runs out midway.
        ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=256, columns=256)))
        filler = _fill(small_disk, leave_free=64 * 1024)
        assert c_store_status(scp.port, CTImageStorage, ds) == 0xA700
        assert _instance_files(spool_root) == []
        assert list((spool_root / "tmp").iterdir()) == []  # the partial temp file is gone
        assert scp.index.series_instance_paths(ds.SeriesInstanceUID) == []
        assert "refused with 0xA700: no space left writing" in caplog.text

        filler.unlink()
        assert c_store_status(scp.port, CTImageStorage, ds) == 0x0000
        (stored,) = _instance_files(spool_root)
        assert stored.name == f"{ds.SOPInstanceUID}.dcm"
        assert scp.index.series_instance_paths(ds.SeriesInstanceUID) == [stored]
    finally:
        scp.stop()
        scp.index.close()

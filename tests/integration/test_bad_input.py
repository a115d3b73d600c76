"""Bad input gets its DIMSE status, and the node keeps serving."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from tests.peers import NodeProcess, StoreSCP, echoscu, node_config


@pytest.fixture
def node(tmp_path: Path, pacs: StoreSCP) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port)).start()
    yield proc
    proc.stop()


def _c_store(port: int, sop_class: str, dataset: Dataset | Path) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_AI")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(dataset)
        return int(rsp.Status)
    finally:
        assoc.release()


def _file_with_garbage_dataset(path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)  # type: ignore[arg-type]
        f.write(b"this is not a DICOM data set \xff\xfe\x00" + os.urandom(512))
    return path


def test_bytes_that_are_not_dicom_get_c210(node: NodeProcess, tmp_path: Path) -> None:
    bad = _file_with_garbage_dataset(tmp_path / "garbage.dcm")
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are
    try:
        assert _c_store(node.port, CTImageStorage, bad) == 0xC210
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert echoscu(node.port).returncode == 0
    assert "refused with 0xC210" in node.log_text()


def test_unsupported_sop_class_gets_0122(
    node: NodeProcess, ct_series: tuple[object, list[Path]]
) -> None:
    _, paths = ct_series
    ds = dcmread(paths[0])
    private_class = "1.2.826.0.1.3680043.8.498.999.1"
    ds.SOPClassUID = private_class
    ds.file_meta.MediaStorageSOPClassUID = private_class
    assert _c_store(node.port, private_class, ds) == 0x0122
    assert echoscu(node.port).returncode == 0
    assert "refused with 0x0122" in node.log_text()


def test_random_bytes_on_the_port_then_next_association_served(
    node: NodeProcess, ct_series: tuple[object, list[Path]]
) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(os.urandom(4096))
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    _, paths = ct_series
    assert _c_store(node.port, CTImageStorage, dcmread(paths[0])) == 0x0000
    assert echoscu(node.port).returncode == 0


def test_tilted_and_mixed_orientation_series_are_refused_with_a_log_line(
    node: NodeProcess, pacs: StoreSCP, tmp_path: Path
) -> None:
    """Geometry the models would mis-segment fails its job with the reason in the log, and
    nothing is sent; the node keeps serving."""
    import numpy as np

    from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets
    from tests.peers import storescu, wait_until

    def write(name: str, spec: PhantomSpec, edit: object) -> list[Path]:
        directory = tmp_path / name
        directory.mkdir()
        paths = []
        for k, ds in enumerate(phantom_ct_datasets(spec)):
            edit(k, ds)  # type: ignore[operator]
            paths.append(directory / f"{k}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
        return paths

    spec = PhantomSpec(slices=10, rows=64, columns=64, pixel_spacing_mm=4.0)

    def tilt(k: int, ds: Dataset) -> None:  # 15 degrees: y shifts with z
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + k * 2.5 * np.tan(np.radians(15)), 4), z]

    def mix(k: int, ds: Dataset) -> None:  # every other slice rotated 90 degrees in-plane
        if k % 2:
            ds.ImageOrientationPatient = [0, 1, 0, -1, 0, 0]

    tilted = write("tilted", spec, tilt)
    mixed = write("mixed", PhantomSpec(slices=10, rows=64, columns=64, pixel_spacing_mm=4.0), mix)
    for paths in (tilted, mixed):
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(
        lambda: node.log_text().count(") failed: GeometryError") >= 2, 120, "two refused jobs", 0.5
    )
    log = node.log_text()
    assert "gantry tilt about 15.0 degrees" in log
    assert "mixed orientations in one series" in log
    assert pacs.files() == []
    assert echoscu(node.port).returncode == 0

"""Bad input gets its DIMSE status, and the node keeps serving."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from dicom_ai.dimse.scp import StorageSCP
from tests.peers import (
    NodeProcess,
    StoreSCP,
    echoscu,
    local_scp,
    node_config,
    storescu,
    wait_until,
)
from tests.raw_dicom import associate, c_store_status, p_data_header, read_pdu

pytestmark = [pytest.mark.dcmtk]


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


# -- the rest of the matrix ------------------------------------------------------------------

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _tiny_ct(**changes: object) -> Dataset:
    from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=16, columns=16)))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _nothing_stored(node: NodeProcess) -> None:
    spool = node.data_dir / "spool"
    assert list((spool / "instances").rglob("*.dcm")) == []
    assert list((spool / "tmp").iterdir()) == []
    assert node.index_rows("SELECT sop_instance_uid FROM instances") == []


def _still_serving(node: NodeProcess) -> None:
    assert echoscu(node.port).returncode == 0
    good = _tiny_ct()
    assert c_store_status(node.port, CTImageStorage, good) == 0x0000
    rows = node.index_rows(
        "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid = ?", good.SOPInstanceUID
    )
    assert rows == [(good.SOPInstanceUID,)]


def test_sop_class_differs_from_its_presentation_context_gets_a900(
    node: NodeProcess, tmp_path: Path
) -> None:
    """The file meta says CT (so the context is CT Image Storage); the data set says MR."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = _tiny_ct(SOPClassUID=MR_IMAGE_STORAGE)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    path = tmp_path / "mismatch.dcm"
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)  # type: ignore[arg-type]
        f.write(body.getvalue())
    written = dcmread(path)
    assert written.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert written.SOPClassUID == MR_IMAGE_STORAGE
    assert c_store_status(node.port, CTImageStorage, path, raw=True) == 0xA900
    log = node.log_text()
    assert "refused with 0xA900" in log
    assert f"dataset SOP class {MR_IMAGE_STORAGE} differs from the presentation" in log
    _nothing_stored(node)
    _still_serving(node)


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "StudyInstanceUID"])
def test_dataset_without_its_study_or_series_uid_gets_a900(node: NodeProcess, keyword: str) -> None:
    ds = _tiny_ct()
    delattr(ds, keyword)
    assert c_store_status(node.port, CTImageStorage, ds) == 0xA900
    assert f"refused with 0xA900: dataset lacks {keyword}" in node.log_text()
    _nothing_stored(node)
    _still_serving(node)


def test_truncated_p_data_then_close_stores_nothing(node: NodeProcess) -> None:
    """A P-DATA-TF that announces 64 KiB, 200 bytes of it, then the socket closes."""
    with associate(node.port, CTImageStorage) as sock:
        sock.sendall(p_data_header(65536) + b"\x00\x00\x02\x00" + os.urandom(196))
    wait_until(
        lambda: "RAWPEER@127.0.0.1 ended without release" in node.log_text(),
        15,
        "the node to log the broken association",
    )
    assert "of 65536 bytes of a PDU (type 0x04)" in node.log_text()
    _nothing_stored(node)
    _still_serving(node)


@pytest.fixture(params=["fast", "pynetdicom"])
def quick_scp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StorageSCP]:
    """The node's SCP in this process with 1 s timeouts (node.acse_timeout_seconds, the
    ARTIM timer, and node.network_timeout_seconds), so silence is noticed at once; on
    each acceptor (node.acceptor)."""
    with local_scp(tmp_path, network_timeout=1.0, acse_timeout=1.0, acceptor=request.param) as scp:
        yield scp


def _own_acceptor(scp: StorageSCP) -> bool:
    """The node's own acceptor, whose log says why it closed; pynetdicom's does not."""
    return scp.acceptor == "fast"


def _closed_within(sock: socket.socket, seconds: float) -> list[int]:
    """PDU types received until the node closes the connection; fails if it does not."""
    sock.settimeout(seconds)
    received = []
    try:
        while True:
            pdu_type, _ = read_pdu(sock)
            received.append(pdu_type)
    except ConnectionError:
        return received
    except TimeoutError:
        pytest.fail(f"the node kept a silent connection open past {seconds} s")


def test_silent_connection_is_closed_by_the_artim_timer(
    quick_scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert quick_scp.port is not None
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", quick_scp.port)) as sock:
        assert _closed_within(sock, 10) == []  # closed without a word (PS3.8 AA-2)
    assert time.monotonic() - started < 8
    if _own_acceptor(quick_scp):
        wait_until(lambda: "ARTIM timeout" in caplog.text, 5, "the ARTIM log line")
        assert "connection from 127.0.0.1 closed: no valid association request within 1" in (
            caplog.text
        )
    assert echoscu(quick_scp.port).returncode == 0


def test_silent_association_is_aborted_by_the_network_timeout(
    quick_scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert quick_scp.port is not None
    started = time.monotonic()
    with associate(quick_scp.port, CTImageStorage) as sock:
        assert _closed_within(sock, 10) == [0x07]  # A-ABORT, then the node closes
    assert time.monotonic() - started < 8
    wait_until(lambda: "aborted by the node" in caplog.text, 5, "the abort log line")
    if _own_acceptor(quick_scp):
        assert "silent past the network timeout of 1.0 s" in caplog.text
    assert "association from RAWPEER@127.0.0.1 aborted by the node" in caplog.text
    assert echoscu(quick_scp.port).returncode == 0
    ds = _tiny_ct()
    assert c_store_status(quick_scp.port, CTImageStorage, ds) == 0x0000
    assert quick_scp.index.unindexed(quick_scp.spool.instance_files()) == []
    assert len(quick_scp.spool.instance_files()) == 1


def _jpeg_ls_with_garbage(directory: Path, slices: int) -> list[Path]:
    """A CT series that says JPEG-LS Lossless and holds bytes no decoder accepts."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

    directory.mkdir(parents=True)
    spec = PhantomSpec(slices=slices, rows=32, columns=32, series_description="Broken JPEG-LS")
    paths = []
    for k, ds in enumerate(phantom_ct_datasets(spec)):
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        # SOI, SOF55 marker, then noise: starts like JPEG-LS, decodes as nothing.
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + os.urandom(200)])
        ds["PixelData"].VR = "OB"
        paths.append(directory / f"{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.slow
def test_undecodable_pixel_data_fails_its_job_only(tmp_path: Path, pacs: StoreSCP) -> None:
    """Pixel data is only decoded in the pipeline: the broken series is received, its job
    fails with the reason, and a good series sent with it gets its SEG and SR."""
    from dicom_ai.synthetic import PhantomSpec, write_phantom_ct

    broken = _jpeg_ls_with_garbage(tmp_path / "broken", 4)
    good_spec = PhantomSpec(
        slices=12, rows=96, columns=96, pixel_spacing_mm=4.0, slice_thickness_mm=5.0, seed=3
    )
    good = write_phantom_ct(tmp_path / "good", good_spec)
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port)).start()
    try:
        sent = storescu(node.port, broken, options=["-xt"])  # propose JPEG-LS as it is
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent = storescu(node.port, good)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, 180, "SEG and SR of the good series", 0.5)
        broken_uid = str(dcmread(broken[0]).SeriesInstanceUID)
        wait_until(
            lambda: (
                node.index_rows("SELECT state FROM jobs WHERE series_instance_uid = ?", broken_uid)
                == [("failed",)]
            ),
            60,
            "the broken series' job to fail",
            0.5,
        )
        ((error,),) = node.index_rows(
            "SELECT error FROM jobs WHERE series_instance_uid = ?", broken_uid
        )
        assert "pixel data cannot be decoded" in error
        assert "failed: InputError" in node.log_text()
        assert "pixel data cannot be decoded" in node.log_text()
        good_jobs = node.index_rows(
            "SELECT state FROM jobs WHERE series_instance_uid = ?", good_spec.series_instance_uid
        )
        assert good_jobs == [("done",)]
        delivered = [dcmread(p) for p in pacs.files()]
        assert sorted(str(d.Modality) for d in delivered) == ["SEG", "SR"]
        for result in delivered:
            assert result.StudyInstanceUID == good_spec.study_instance_uid
        _still_serving(node)
    finally:
        node.stop()


def _many_tiny_instances(directory: Path, count: int) -> tuple[list[Path], str]:
    """``count`` 8x8 CT slices of one series. One slice is encoded by pydicom; the others
    are its bytes with the SOP Instance UID (meta and data set) and Instance Number
    swapped, fixed-width, which takes milliseconds instead of seconds."""
    from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

    spec = PhantomSpec(slices=1, rows=8, columns=8, series_description="Two thousand slices")
    ds = next(phantom_ct_datasets(spec))
    placeholder = f"{spec.series_instance_uid[:50]}.99999"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = placeholder
    ds.InstanceNumber = "99999"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    template = buffer.getvalue()
    assert template.count(placeholder.encode()) == 2
    number = b"IS\x06\x0099999 "  # InstanceNumber: VR, length 6, value
    assert template.count(number) == 1
    directory.mkdir(parents=True)
    paths = []
    for k in range(1, count + 1):
        data = template.replace(placeholder.encode(), f"{placeholder[:-6]}.{k:05d}".encode())
        paths.append(directory / f"{k:05d}.dcm")
        paths[-1].write_bytes(data.replace(number, b"IS\x06\x00" + f"{k:<6d}".encode()))
    return paths, spec.series_instance_uid


@pytest.mark.slow
def test_a_2000_instance_series_in_one_association(tmp_path: Path, pacs: StoreSCP) -> None:
    """Every instance acknowledged and indexed, and the series routed once, as one."""
    count = 2000
    paths, series_uid = _many_tiny_instances(tmp_path / "big", count)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: keep-big-series\n"
        "    match: {SeriesDescription: {equals: Two thousand slices}}\n"
        "    model: null\n"
    )
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port, rules))
    node.start()
    try:
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        rows = node.index_rows(
            "SELECT COUNT(*), COUNT(DISTINCT association_id) FROM instances "
            "WHERE series_instance_uid = ?",
            series_uid,
        )
        assert rows == [(count, 1)]
        assert len(list((node.data_dir / "spool" / "instances").rglob("*.dcm"))) == count
        wait_until(
            lambda: f"series {series_uid} complete" in node.log_text(),
            30,
            "the series to be routed",
            0.5,
        )
        time.sleep(1.0)  # a second, split routing would follow at once
        log = node.log_text()
        assert log.count(f"series {series_uid} complete ({count} instances)") == 1
        assert "keep-big-series" in log
        assert node.index_rows(
            "SELECT runs, dirty FROM series WHERE series_instance_uid = ?",
            series_uid,
        ) == [(1, 0)]
        assert "refused" not in log
        assert echoscu(node.port).returncode == 0
    finally:
        node.stop()

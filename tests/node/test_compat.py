"""The fenced library patches (dicom_ai._compat, dicom_ai.dimse._compat).

For each: (a) on the pinned version the patched path gives what the library's own path
gives; (b) with another version reported, the code takes the library's path and the
result is still right; (c) the library internals the patch relies on are still there and
still make the patch worth having, so that an upgrade fails here, loudly, rather than the
patch misbehaving in silence. (Moved here from test_results.py: the SEG-without-tables
and cached-IOD-lookup tests.)
"""

from __future__ import annotations

import inspect
import io
import logging
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom import _standard_utils
from highdicom.image import _Image
from highdicom.seg import Segmentation
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, SegmentationStorage
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from dicom_ai import _compat
from dicom_ai.dimse import _compat as dimse_compat
from dicom_ai.dimse import scu
from dicom_ai.dimse.scu import Peer, send_files
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.results import DeviceIdentity, build_seg, result_uids
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets, phantom_hu_volume

ROOT = Path(__file__).resolve().parents[2]
SPEC = PhantomSpec(
    slices=12,
    study_instance_uid="1.2.826.0.1.3680043.8.498.2001",
    series_instance_uid="1.2.826.0.1.3680043.8.498.2002",
    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2003",
)
DEVICE = DeviceIdentity.for_node("node-test-compat")


def _other_version(monkeypatch: pytest.MonkeyPatch, distribution: str) -> None:
    """Make ``distribution`` report a version no patch was written for."""
    real = _compat.installed_version

    def installed(name: str) -> str | None:
        return "99.0.0" if name == distribution else real(name)

    monkeypatch.setattr(_compat, "installed_version", installed)
    monkeypatch.setattr(_compat, "_warned", set())


# --- the pins -------------------------------------------------------------------------


def test_every_patch_is_for_the_pinned_version_and_that_version_is_installed() -> None:
    """Bumping a pin fails here: re-check each patch of that library against the new
    version (the (c) tests below), then update the constant it was written for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(pin.split("==", 1) for pin in project["dependencies"] if "==" in pin)
    written_for = {
        "highdicom": _compat.HIGHDICOM,
        "monai": _compat.MONAI,
        "pydicom": _compat.PYDICOM,
        "pynetdicom": dimse_compat.PYNETDICOM,
    }
    for distribution, version in written_for.items():
        assert pins[distribution] == version, f"re-check the {distribution} patches"
        assert _compat.installed_version(distribution) == version


def test_another_version_is_reported_once_per_patch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _other_version(monkeypatch, "pydicom")
    with caplog.at_level(logging.WARNING, logger="dicom_ai._compat"):
        for _ in range(3):
            assert not _compat.pydicom_write_shortcuts()
    assert len(caplog.records) == 1
    assert "pydicom 3.0.2, 99.0.0 is installed" in caplog.records[0].getMessage()
    assert _compat.written_for("highdicom", _compat.HIGHDICOM, "x")  # the others untouched


# --- SEG fixtures -----------------------------------------------------------------------


def _header_only(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer, stop_before_pixels=True)


@pytest.fixture(scope="module")
def headers() -> list[Dataset]:
    return [_header_only(ds) for ds in phantom_ct_datasets(SPEC)]


@pytest.fixture(scope="module")
def findings(headers: list[Dataset]) -> SegmentationFindings:
    hu = phantom_hu_volume(SPEC)
    label_map = np.zeros(hu.shape, dtype=np.uint16)
    label_map[hu > -500] = 1
    label_map[hu > 200] = 3
    return SegmentationFindings(
        label_map=label_map,
        labels=(SegmentLabel(1, "body"), SegmentLabel(3, "bone")),
        algorithm=AlgorithmIdentification("CT threshold", "1.0", AlgorithmFamily.CLASSICAL),
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
    )


def _seg(headers: list[Dataset], findings: SegmentationFindings) -> Segmentation:
    uids = result_uids(SPEC.series_instance_uid, "compat", findings.algorithm.version)
    return build_seg(headers, findings, uids, DEVICE)


def _comparable(dataset: Dataset) -> Dataset:
    """``dataset`` without what differs between two builds a moment apart."""
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        delattr(dataset, keyword)
    for item in dataset.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    for item in (*dataset.DimensionOrganizationSequence, *dataset.DimensionIndexSequence):
        item.DimensionOrganizationUID = "1.2.3"
    return dataset


@pytest.fixture
def unpatched_iod_lookup(monkeypatch: pytest.MonkeyPatch) -> object:
    """highdicom's own ``is_attribute_in_iod`` back in place for the test (restored after)."""
    original = inspect.unwrap(_standard_utils.is_attribute_in_iod)
    monkeypatch.setattr(_standard_utils, "is_attribute_in_iod", original)
    return original


# --- cache_is_attribute_in_iod ----------------------------------------------------------


def test_cached_iod_lookup_answers_as_highdicom_does(unpatched_iod_lookup: object) -> None:
    original = unpatched_iod_lookup
    assert callable(original)
    assert _compat.cache_is_attribute_in_iod()
    assert _compat.cache_is_attribute_in_iod()  # idempotent: one wrapper, not two
    lookup = _standard_utils.is_attribute_in_iod
    assert lookup is not original and inspect.unwrap(lookup) is original
    for sop_class in (CTImageStorage, EnhancedCTImageStorage, SegmentationStorage):
        for attribute in ("PerFrameFunctionalGroupsSequence", "ImagePositionPatient"):
            assert lookup(attribute, sop_class) == original(attribute, sop_class)
        excluded = ["IconImageSequence"]
        assert lookup("PixelData", sop_class, excluded) == original(
            "PixelData", sop_class, excluded
        )
    for sop_class, multiframe in ((CTImageStorage, False), (EnhancedCTImageStorage, True)):
        image = Dataset()
        image.SOPClassUID = sop_class
        assert _standard_utils.is_multiframe_image(image) is multiframe


def test_cached_iod_lookup_is_not_installed_by_importing(unpatched_iod_lookup: object) -> None:
    code = (
        "import dicom_ai.results.seg, dicom_ai._compat\n"
        "from highdicom import _standard_utils\n"
        "print(hasattr(_standard_utils.is_attribute_in_iod, '__wrapped__'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def test_another_highdicom_keeps_its_iod_lookup(
    monkeypatch: pytest.MonkeyPatch,
    unpatched_iod_lookup: object,
    headers: list[Dataset],
    findings: SegmentationFindings,
) -> None:
    _other_version(monkeypatch, "highdicom")
    assert not _compat.cache_is_attribute_in_iod()
    seg = _seg(headers, findings)  # the SEG build asks for the cache, and is refused it
    assert _standard_utils.is_attribute_in_iod is unpatched_iod_lookup
    assert seg.NumberOfFrames > 0


def test_cached_iod_lookup_still_fits_highdicom(unpatched_iod_lookup: object) -> None:
    original = unpatched_iod_lookup
    assert list(inspect.signature(original).parameters) == [  # type: ignore[arg-type]
        "attribute",
        "sop_class_uid",
        "exclude_path_elements",
    ]
    assert not hasattr(original, "cache_info"), "highdicom caches it now: drop the patch"
    # is_multiframe_image must look the function up in its module's globals at call time,
    # or replacing it there does nothing.
    assert "is_attribute_in_iod" in _standard_utils.is_multiframe_image.__code__.co_names
    assert _compat.cache_is_attribute_in_iod()
    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # not asked before in this process
    info = _standard_utils.is_attribute_in_iod.cache_info  # type: ignore[attr-defined]
    before = info().hits
    for _ in range(3):
        _standard_utils.is_multiframe_image(image)
    assert info().hits == before + 2


# --- segmentation_without_luts ----------------------------------------------------------


def test_seg_without_tables_is_highdicoms_seg(
    monkeypatch: pytest.MonkeyPatch, headers: list[Dataset], findings: SegmentationFindings
) -> None:
    written = _seg(headers, findings)
    assert isinstance(written, Segmentation) and not hasattr(written, "_db_con")
    monkeypatch.setattr(_compat, "segmentation_without_luts", lambda: Segmentation)
    queryable = _seg(headers, findings)
    assert hasattr(queryable, "_db_con")  # highdicom's own, tables built
    assert file_bytes(_comparable(written)) == file_bytes(_comparable(queryable))


def test_another_highdicom_builds_its_own_seg(
    monkeypatch: pytest.MonkeyPatch, headers: list[Dataset], findings: SegmentationFindings
) -> None:
    written = _seg(headers, findings)
    _other_version(monkeypatch, "highdicom")
    assert _compat.segmentation_without_luts() is Segmentation
    fallback = _seg(headers, findings)
    assert type(fallback) is Segmentation and hasattr(fallback, "_db_con")
    assert fallback.get_segment_numbers() == [1, 2]  # queryable again
    assert file_bytes(_comparable(written)) == file_bytes(_comparable(fallback))


def test_seg_without_tables_still_fits_highdicom() -> None:
    assert list(inspect.signature(_Image._build_luts).parameters) == ["self"]
    assert "_build_luts" not in vars(Segmentation), "Segmentation overrides it now"
    assert "self._build_luts()" in inspect.getsource(_Image._init_multiframe_image)
    assert _compat.segmentation_without_luts()._build_luts is not _Image._build_luts


# --- pydicom write shortcuts (results.encoding) -----------------------------------------


def test_written_seg_is_what_save_as_writes(
    headers: list[Dataset], findings: SegmentationFindings
) -> None:
    seg = _seg(headers, findings)
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    assert bytes(file_bytes(seg)) == buffer.getvalue()


def test_another_pydicom_writes_with_save_as(
    monkeypatch: pytest.MonkeyPatch, headers: list[Dataset], findings: SegmentationFindings
) -> None:
    seg = _seg(headers, findings)
    expected = io.BytesIO()
    seg.save_as(expected, enforce_file_format=True)
    _other_version(monkeypatch, "pydicom")

    def not_called(dataset: Dataset) -> None:
        raise AssertionError("the shortcut was taken")

    monkeypatch.setattr(_compat, "pydicom_correct_ambiguous_vr", not_called)
    assert bytes(file_bytes(seg)) == expected.getvalue()


def test_write_shortcuts_still_fit_pydicom(
    monkeypatch: pytest.MonkeyPatch, headers: list[Dataset], findings: SegmentationFindings
) -> None:
    from pydicom import filewriter

    for function in (filewriter.correct_ambiguous_vr, filewriter.correct_ambiguous_vr_element):
        assert "ancestors" in inspect.signature(function).parameters
    assert list(inspect.signature(Dataset.set_original_encoding).parameters) == [
        "self",
        "is_implicit_vr",
        "is_little_endian",
        "character_encoding",
    ]
    assert isinstance(inspect.getattr_static(Dataset, "_character_set"), property)

    # Still needed: save_as corrects again on a dataset not marked, and not on one marked.
    calls = 0
    real = filewriter.correct_ambiguous_vr

    def counting(dataset: Dataset, *args: object, **kwargs: object) -> Dataset:
        nonlocal calls
        calls += not isinstance(dataset, FileMetaDataset)  # the file meta: once, flat
        return real(dataset, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(filewriter, "correct_ambiguous_vr", counting)
    seg = _seg(headers, findings)
    seg.save_as(io.BytesIO(), enforce_file_format=True)
    assert calls > 1, "pydicom no longer corrects at every level: drop the shortcut"
    _compat.pydicom_correct_ambiguous_vr(seg)
    _compat.pydicom_mark_explicit_little_endian(seg)
    calls = 0
    seg.save_as(io.BytesIO(), enforce_file_format=True)
    assert calls == 0, "pydicom corrects a marked dataset again"

    # Still right: a marked dataset's raw sequence is written as it is.
    raw_item = b"\x08\x00\x00\x01SH\x04\x00ABCD"  # (0008,0100) SH "ABCD"
    value = b"\xfe\xff\x00\xe0" + len(raw_item).to_bytes(4, "little") + raw_item
    dataset = Dataset()
    dataset[0x00081030] = RawDataElement(
        pydicom.tag.Tag(0x00081030), "SQ", len(value), value, 0, False, True
    )
    _compat.pydicom_mark_explicit_little_endian(dataset)
    out = io.BytesIO()
    dataset.save_as(out, implicit_vr=False, little_endian=True)
    assert out.getvalue().endswith(value)


# --- deferred_value_location (for inference.volume) -------------------------------------


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compat") / "ct.dcm"
    next(iter(phantom_ct_datasets(SPEC))).save_as(path, enforce_file_format=True)
    return path


def test_deferred_value_is_where_pydicom_reads_it(ct_file: Path) -> None:
    deferred = pydicom.dcmread(ct_file, defer_size=1024)
    location = _compat.deferred_value_location(deferred, "PixelData")
    assert location is not None
    offset, length = location
    with ct_file.open("rb") as f:
        f.seek(offset)
        assert f.read(length) == pydicom.dcmread(ct_file).PixelData
    assert _compat.deferred_value_location(deferred, "Rows") is None  # not deferred
    assert _compat.deferred_value_location(pydicom.dcmread(ct_file), "PixelData") is None


def test_another_pydicom_has_no_deferred_location(
    monkeypatch: pytest.MonkeyPatch, ct_file: Path
) -> None:
    _other_version(monkeypatch, "pydicom")
    deferred = pydicom.dcmread(ct_file, defer_size=1024)
    assert _compat.deferred_value_location(deferred, "PixelData") is None
    assert deferred.PixelData == pydicom.dcmread(ct_file).PixelData  # pydicom's own path


def test_deferred_value_location_still_fits_pydicom(ct_file: Path) -> None:
    assert {"value_tell", "length", "value"} <= set(RawDataElement._fields)
    assert "keep_deferred" in inspect.signature(Dataset.get_item).parameters
    element = pydicom.dcmread(ct_file, defer_size=1024).get_item("PixelData", keep_deferred=True)
    assert isinstance(element, RawDataElement) and element.value is None


# --- pynetdicom: chunked send, association socket ---------------------------------------


class _Peer:
    """A pynetdicom storage SCP in this process keeping each data set's bytes as received."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.nodelay: list[int] = []
        ae = AE(ae_title="PEER")
        ae.add_supported_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        self._server = server
        self.peer = Peer("PEER", "127.0.0.1", int(self._server.server_address[1]))

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.encoded_dataset(include_meta=False))
        return 0x0000

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def peer() -> Iterator[_Peer]:
    server = _Peer()
    yield server
    server.close()


def _data_set_bytes(path: Path) -> bytes:
    """The file's data set as written, after preamble and file meta."""
    with path.open("rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


def test_chunked_send_sends_the_file_as_it_is(
    monkeypatch: pytest.MonkeyPatch, peer: _Peer, ct_file: Path
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)  # the library default
    [result] = send_files(peer.peer, [ct_file], timeout=10)
    assert result.status == 0x0000
    assert _config.STORE_SEND_CHUNKED_DATASET is True  # applied by the send, not an import
    assert peer.received == [_data_set_bytes(ct_file)]


def test_another_pynetdicom_sends_decoded_datasets(
    monkeypatch: pytest.MonkeyPatch, peer: _Peer, ct_file: Path
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    _other_version(monkeypatch, "pynetdicom")
    [result] = send_files(peer.peer, [ct_file], timeout=10)
    assert result.status == 0x0000
    assert _config.STORE_SEND_CHUNKED_DATASET is False
    sent = pydicom.dcmread(io.BytesIO(peer.received[0]), force=True)
    original = pydicom.dcmread(ct_file)
    assert sent.SOPInstanceUID == original.SOPInstanceUID
    assert sent.PixelData == original.PixelData


def test_chunked_send_still_fits_pynetdicom() -> None:
    assert "_config.STORE_SEND_CHUNKED_DATASET" in inspect.getsource(Association.send_c_store)
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pynetdicom import _config; print(_config.STORE_SEND_CHUNKED_DATASET)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.strip() == "False", "pynetdicom streams by default now: drop the patch"


def _associated(peer: _Peer) -> Association:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate(peer.peer.host, peer.peer.port, ae_title="PEER")
    assert assoc.is_established
    return assoc


def test_association_socket_is_the_connection_to_the_peer(peer: _Peer) -> None:
    assoc = _associated(peer)
    try:
        sock = dimse_compat.association_socket(assoc)
        assert sock is not None
        assert sock.getpeername()[:2] == ("127.0.0.1", peer.peer.port)
        scu._set_nodelay(assoc)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_another_pynetdicom_keeps_its_socket_options(
    monkeypatch: pytest.MonkeyPatch, peer: _Peer, ct_file: Path
) -> None:
    _other_version(monkeypatch, "pynetdicom")
    assoc = _associated(peer)
    try:
        assert dimse_compat.association_socket(assoc) is None
        scu._set_nodelay(assoc)  # nothing to set, nothing raised
    finally:
        assoc.release()
    [result] = send_files(peer.peer, [ct_file], timeout=10)
    assert result.status == 0x0000


def test_association_socket_still_fits_pynetdicom(peer: _Peer) -> None:
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

    assert "self.socket" in inspect.getsource(DULServiceProvider.__init__)
    assert "self.socket" in inspect.getsource(AssociationSocket.__init__)
    assoc = _associated(peer)
    try:
        assert isinstance(assoc.dul.socket, AssociationSocket)
        assert isinstance(assoc.dul.socket.socket, socket.socket)
        # pynetdicom still leaves Nagle on: else the option is not needed.
        assert assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    finally:
        assoc.release()


def test_nothing_is_patched_by_importing_the_dimse_layer() -> None:
    code = (
        "import dicom_ai.dimse.scu, dicom_ai.dimse.scp, dicom_ai.dimse.ae_acceptor\n"
        "from pynetdicom import _config\n"
        "print(_config.STORE_SEND_CHUNKED_DATASET, _config.UNRESTRICTED_STORAGE_SERVICE)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False False"


_PRIVATE_SOP_CLASS = "1.3.6.1.4.1.9590.100.1.2.999"


def _private_context_accepted() -> bool:
    """Whether a pynetdicom acceptor supporting only CT accepts a private SOP class."""
    acceptor = AE(ae_title="ACCEPTOR")
    acceptor.add_supported_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    server = acceptor.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        requestor = AE(ae_title="SCU")
        requestor.add_requested_context(_PRIVATE_SOP_CLASS, pydicom.uid.ExplicitVRLittleEndian)
        requestor.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = requestor.associate("127.0.0.1", int(server.server_address[1]), ae_title="ACCEPTOR")
        assert assoc.is_established
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assoc.release()
        return _PRIVATE_SOP_CLASS in accepted
    finally:
        server.shutdown()


def test_unrestricted_storage_takes_a_private_sop_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)  # the library default
    assert dimse_compat.pynetdicom_unrestricted_storage()
    assert _private_context_accepted()


def test_another_pynetdicom_accepts_only_the_supported_contexts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    _other_version(monkeypatch, "pynetdicom")
    assert not dimse_compat.pynetdicom_unrestricted_storage()
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False
    assert not _private_context_accepted()


def test_unrestricted_storage_still_fits_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    # Still off by default, and still needed: else drop the patch.
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pynetdicom import _config; print(_config.UNRESTRICTED_STORAGE_SERVICE)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.strip() == "False"
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    assert not _private_context_accepted()


# --- not patches, but pydicom behaviour store.header relies on --------------------------


def test_data_element_generator_stops_before_the_stopping_element() -> None:
    """store.header reads the first elements of a peer's data set with pydicom's public
    ``data_element_generator`` and takes ``stream.tell()`` after it stops for where reading
    ended: that must be the start of the element it stopped at, not past it."""
    dataset = Dataset()
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = "1.2.3.4"
    dataset.SeriesInstanceUID = "1.2.3.5"
    encoded = io.BytesIO()
    dataset.save_as(encoded, implicit_vr=False, little_endian=True)
    data = encoded.getvalue()
    stream = io.BytesIO(data)
    seen = [
        int(element.tag)
        for element in pydicom.filereader.data_element_generator(
            stream, False, True, stop_when=lambda tag, vr, length: int(tag) > 0x00080018
        )
    ]
    assert seen == [0x00080016, 0x00080018]
    assert data[stream.tell() : stream.tell() + 4] == b"\x20\x00\x0e\x00"  # (0020,000E)


def test_monai_internals_the_loader_uses_are_there() -> None:
    """Fails when a MONAI upgrade renames what inference/loader.py reaches into."""
    from monai.data.image_reader import NibabelReader
    from monai.transforms.io.array import LoadImage
    from monai.transforms.io.dictionary import LoadImaged

    assert isinstance(_compat.monai_array_loader(LoadImaged(keys="image")), LoadImage)
    # get_data pairs its images with reader.filenames (read() sets them from the files).
    source = inspect.getsource(NibabelReader.get_data)
    assert "self.filenames" in source
    reader = NibabelReader()
    _compat.monai_reader_filenames(reader, ["a", "b"])
    assert reader.filenames == ["a", "b"]
    with pytest.raises(AttributeError, match="no array loader"):
        _compat.monai_array_loader(object())

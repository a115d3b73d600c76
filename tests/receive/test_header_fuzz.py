"""The header parser takes bytes from any peer: it returns a header or raises InputError,
whatever the bytes. And each kind of refusal maps to its DIMSE status."""

from __future__ import annotations

import contextlib
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_ai.dimse import scp
from dicom_ai.dimse.status import Status
from dicom_ai.errors import InputError
from dicom_ai.store.header import (
    InstanceHeader,
    MissingAttributeError,
    UnreadableDatasetError,
    parse_data_set,
    parse_header,
)
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
PREAMBLE = b"\0" * 128 + b"DICM"
# pydicom warns about every invalid value it reads or writes; here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow],
)


def _encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    # The meta always has its UIDs: the data set's own are what the parser must judge.
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _valid_slice() -> bytes:
    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=4, columns=4)))
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


VALID = _valid_slice()


def _parse_or_refuse(data: bytes) -> InstanceHeader | None:
    """The contract: a complete header, or InputError; any other exception fails the test."""
    try:
        header = parse_header(data)
    except InputError:
        return None
    for keyword, value in zip(UIDS, header.__dict__.values(), strict=False):
        assert value and isinstance(value, str), keyword
        assert set(value) <= set("0123456789."), (keyword, value)
    assert header.modality
    return header


def test_a_valid_slice_parses() -> None:
    header = parse_header(VALID)
    assert header.sop_class_uid == CTImageStorage and header.modality == "CT"


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _parse_or_refuse(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_after_a_part10_preamble(data: bytes) -> None:
    _parse_or_refuse(PREAMBLE + data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """The valid slice with bytes overwritten, inserted, deleted, or cut off."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if action == "overwrite":
            data[position : position + len(chunk)] = chunk
        elif action == "insert":
            data[position:position] = chunk
        elif action == "delete":
            del data[position : position + len(chunk)]
        else:
            del data[max(position, 1) :]
        if not data:
            break
    return bytes(data)


@FUZZ
@given(_mutated())
def test_mutated_valid_slice(data: bytes) -> None:
    _parse_or_refuse(data)


@FUZZ
@given(_mutated())
def test_mutations_in_the_header_region(data: bytes) -> None:
    # The same mutations, with the pixel data dropped so they land in the elements parsed.
    cut = VALID.find(b"\xe0\x7f\x10\x00")
    _parse_or_refuse(data[: max(cut, 132)] if cut > 0 else data)


_TEXT = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\\"), max_size=70
) | st.sampled_from(["", " ", "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1..2", ".1", "1.2\\1.3"])


@FUZZ
@given(
    values=st.fixed_dictionaries({k: st.none() | _TEXT for k in UIDS}),
    modality=st.none() | st.sampled_from(["CT", "MR", "", "SEG"]),
    transfer_syntax=st.sampled_from(
        [
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian,
        ]
    ),
)
def test_random_datasets(
    values: dict[str, str | None], modality: str | None, transfer_syntax: str
) -> None:
    ds = Dataset()
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    if modality is not None:
        ds.Modality = modality
    ds.PatientName = "FUZZ^TEST"
    try:
        data = _encode(ds, transfer_syntax)
    except (ValueError, TypeError, UnicodeError):
        return  # pydicom will not write it; nothing a peer could send either
    header = _parse_or_refuse(data)
    stripped = {k: (v or "").strip(" \0") for k, v in values.items()}
    if all(not v for v in stripped.values()):
        with pytest.raises(UnreadableDatasetError, match="does not parse"):
            parse_header(data)
    elif any(not v for v in stripped.values()):
        with pytest.raises(MissingAttributeError):
            parse_header(data)
    elif header is not None:
        assert header.sop_instance_uid == stripped["SOPInstanceUID"]
        assert header.series_instance_uid == stripped["SeriesInstanceUID"]
        assert header.modality == ((modality or "").strip() or "OT")


@pytest.mark.parametrize("keyword", UIDS)
def test_each_missing_uid_is_named(keyword: str) -> None:
    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=4, columns=4)))
    delattr(ds, keyword)
    with pytest.raises(MissingAttributeError, match=keyword):
        parse_header(_encode(ds))


@pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("filler", ["private element", "sequence"])
def test_uids_past_the_first_64_kib_are_found(transfer_syntax: str, filler: str) -> None:
    """The parser reads a prefix of the data set first; what lies past it is still read,
    whether a long element or a sequence runs across the prefix's end."""
    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=4, columns=4)))
    if filler == "private element":
        ds.add_new(0x00091010, "OB", b"\x01" * 100_000)
    else:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = "1.2.3"
        item.add_new(0x00091010, "OB", b"\x02" * 4000)
        ds.ReferencedImageSequence = [item] * 30
    header = parse_header(_encode(ds, transfer_syntax))
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.sop_instance_uid == ds.SOPInstanceUID


@FUZZ
@given(
    data=st.binary(max_size=2048),
    transfer_syntax=st.sampled_from(
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, "1.2.3"]
    ),
    cut=st.integers(0, 2048),
)
def test_random_data_set_fragments(data: bytes, transfer_syntax: str, cut: int) -> None:
    """As the SCP calls it: a data set in fragments, no file meta, any transfer syntax."""
    with contextlib.suppress(InputError):
        parse_data_set([data[:cut], memoryview(data)[cut:]], transfer_syntax)


@pytest.mark.parametrize("uid", ["1.2\\1.3", "1..2", "1.2.", "abc", "1." + "2" * 70])
def test_malformed_series_uid_is_unreadable(uid: str) -> None:
    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=4, columns=4)))
    ds.SeriesInstanceUID = uid
    with pytest.raises(UnreadableDatasetError, match="SeriesInstanceUID"):
        parse_header(_encode(ds))


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (MissingAttributeError("lacks SeriesInstanceUID"), 0xA900),
        (UnreadableDatasetError("does not parse"), 0xC210),
    ],
)
def test_header_refusals_map_to_their_status(error: Exception, status: int) -> None:
    assert scp._status_for(error) == Status(status)


def test_garbage_after_a_valid_file_meta_is_unreadable_not_incomplete() -> None:
    """pydicom reads such bytes as one odd element; that is no instance lacking UIDs."""
    from pydicom import dcmread

    # preamble + "DICM" (132 bytes), the group length element (12), then the group
    meta_end = 132 + 12 + int(dcmread(BytesIO(VALID)).file_meta.FileMetaInformationGroupLength)
    assert VALID[meta_end : meta_end + 2] == b"\x08\x00"  # group 0008 starts the data set
    garbage = VALID[:meta_end] + b"this is not a DICOM data set \xff\xfe\x00" + bytes(range(256))
    with pytest.raises(UnreadableDatasetError, match="does not parse as a DICOM instance"):
        parse_header(garbage)

"""Every failure the C-STORE handler meets maps to its DIMSE status in one place."""

from __future__ import annotations

import pytest

from dicom_ai.dimse import scp
from dicom_ai.dimse.status import Status
from dicom_ai.errors import InputError, OutOfSpaceError, StorageError
from dicom_ai.store.header import parse_header
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (OutOfSpaceError("full"), 0xA700),
        (StorageError("disk error"), 0xA700),
        (scp._UnsupportedSOPClass("private"), 0x0122),
        (scp._SOPClassMismatch("CT in MR context"), 0xA900),
        (InputError("does not parse"), 0xC210),
        (RuntimeError("bug"), 0x0110),
    ],
)
def test_status_for_each_failure(error: Exception, status: int) -> None:
    assert scp._status_for(error) == Status(status)


def test_parse_header_reads_uids_and_refuses_what_lacks_them(tmp_path: object) -> None:
    from io import BytesIO

    ds = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=8, columns=8)))
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    header = parse_header(buffer.getvalue())
    assert header.series_instance_uid == ds.SeriesInstanceUID and header.modality == "CT"
    del ds.SeriesInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        parse_header(buffer.getvalue())
    with pytest.raises(InputError):
        parse_header(b"\x00" * 128 + b"DICM" + b"garbage" * 10)

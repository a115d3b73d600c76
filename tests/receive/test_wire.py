"""The hand-encoded command response and file meta are byte for byte what pydicom writes."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from dicom_ai.dimse.wire import UnencodableValueError, command_response, part10_header


def _pydicom_implicit(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", ""])
@pytest.mark.parametrize(("field", "status"), [(0x8001, 0x0000), (0x8030, 0xA700)])
def test_command_response_matches_pydicom(sop_instance: str, field: int, status: int) -> None:
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = field
    command.MessageIDBeingRespondedTo = 65535
    command.CommandDataSetType = 0x0101
    command.Status = status
    if sop_instance:
        command.AffectedSOPInstanceUID = sop_instance
    body = _pydicom_implicit(command)
    group = Dataset()
    group.CommandGroupLength = len(body)
    expected = _pydicom_implicit(group) + body
    assert command_response(field, 65535, CTImageStorage, sop_instance, status) == expected


@pytest.mark.parametrize("calling_ae", ["CT_SCANNER", "ODD_AE", ""])
@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, JPEGLSLossless])
def test_part10_header_matches_pydicom(calling_ae: str, transfer_syntax: str) -> None:
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.3811.3.0.4"
    meta.ImplementationVersionName = "PYNETDICOM_304"
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    ours = part10_header(
        CTImageStorage,
        sop_instance,
        transfer_syntax,
        "1.2.826.0.1.3680043.9.3811.3.0.4",
        "PYNETDICOM_304",
        calling_ae,
    )
    assert ours == buffer.getvalue()
    read = dcmread(DicomBytesIO(ours + b""), force=True)
    assert read.file_meta.MediaStorageSOPInstanceUID == sop_instance


@pytest.mark.parametrize("bad", ["", "1." * 40, "1.2.\u00e9"])
def test_part10_header_refuses_what_is_not_a_uid(bad: str) -> None:
    with pytest.raises(UnencodableValueError):
        part10_header(CTImageStorage, bad, ExplicitVRLittleEndian, "1.2", "X", "AE")

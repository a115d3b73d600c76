"""STOW-RS to a real origin server: Orthanc with its DICOMweb plugin, on loopback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread

from dicom_ai.dicomweb import stow_files
from dicom_ai.errors import DeliveryError
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import Orthanc

SOP_INSTANCE_UID = "00080018"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", dicomweb=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def three_slices(tmp_path: Path) -> list[Path]:
    # 3 x 512 KiB of pixels: over dicomweb-client's 1 MB chunking threshold.
    return write_phantom_ct(tmp_path / "ct", PhantomSpec(slices=3))


def uids(paths: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def test_stored_instances_are_found_by_qido(orthanc: Orthanc, three_slices: list[Path]) -> None:
    results = stow_files(orthanc.dicomweb_url, three_slices)
    assert [r.path for r in results] == three_slices
    assert [r.status for r in results] == [0, 0, 0]

    study = str(dcmread(three_slices[0], stop_before_pixels=True).StudyInstanceUID)
    found = DICOMwebClient(orthanc.dicomweb_url).search_for_instances(
        search_filters={"StudyInstanceUID": study}
    )
    assert sorted(i[SOP_INSTANCE_UID]["Value"][0] for i in found) == sorted(uids(three_slices))
    assert len(orthanc.rest("GET", "/instances")) == 3

    # A retried delivery sends the same instances again: still a success, no duplicates.
    assert all(r.ok for r in stow_files(orthanc.dicomweb_url, three_slices[:2]))
    assert len(orthanc.rest("GET", "/instances")) == 3


def test_stopped_orthanc_raises_delivery_error(orthanc: Orthanc, three_slices: list[Path]) -> None:
    url = orthanc.dicomweb_url
    assert stow_files(url, three_slices[:1])[0].ok
    orthanc.stop()
    with pytest.raises(DeliveryError, match=re.escape(url)):
        stow_files(url, three_slices[1:], timeout=5)

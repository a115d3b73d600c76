"""STOW-RS to a real origin server: Orthanc with its DICOMweb plugin, on loopback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread

from dicom_ai.dicomweb import stow_files
from dicom_ai.errors import DeliveryError
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_until
from tests.results_check import check_phantom_results

pytestmark = [pytest.mark.dcmtk, pytest.mark.orthanc, pytest.mark.dciodvfy, pytest.mark.slow]

SOP_INSTANCE_UID = "00080018"
MODALITY = "00080060"


def _ct_to(path: Path, destination: str) -> Path:
    path.write_text(
        "rules:\n  - name: ct\n    match: {Modality: {equals: CT}}\n"
        f"    model: ct-body\n    destinations: [{destination}]\n"
    )
    return path


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


def test_node_delivers_results_by_stow_rs(orthanc: Orthanc, tmp_path: Path) -> None:
    """storescu -> node -> ct-body -> STOW-RS to Orthanc; QIDO-RS then lists SEG and SR."""
    spec = PhantomSpec(slices=12, rows=128, columns=128, pixel_spacing_mm=3.0)
    series = write_phantom_ct(tmp_path / "small", spec)
    config = node_config(
        tmp_path / "node",
        free_port(),  # the C-STORE PACS is not used
        destinations={"web": {"url": orthanc.dicomweb_url}},
        rules=_ct_to(tmp_path / "rules.yaml", "web"),
    )
    node = NodeProcess(tmp_path / "node", config).start()
    client = DICOMwebClient(orthanc.dicomweb_url)

    def result_series() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = client.search_for_series(spec.study_instance_uid)
        return [s for s in found if s[MODALITY]["Value"][0] in ("SEG", "SR")]

    try:
        sent = storescu(node.port, series)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(result_series()) == 2, 120, "SEG and SR by STOW-RS", 0.5)
        # Orthanc lists them a moment before the node records the delivery.
        wait_until(
            lambda: node.index_rows("SELECT state FROM deliveries") == [("delivered",)],
            30,
            "the delivery to be recorded",
        )
        rows = node.index_rows("SELECT destination, state FROM deliveries")
    finally:
        node.stop()
    assert rows == [("web", "delivered")]
    stored = tmp_path / "stored"
    stored.mkdir()
    for item in orthanc.rest("GET", "/instances"):
        if orthanc.rest("GET", f"/instances/{item}/simplified-tags").get("Modality") in (
            "SEG",
            "SR",
        ):
            (stored / f"{item}.dcm").write_bytes(orthanc.rest("GET", f"/instances/{item}/file"))
    check_phantom_results(sorted(stored.iterdir()), series, spec)

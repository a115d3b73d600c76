"""The built-in mr-brain model (deepbet) on a real T1 written as DICOM, and the NIfTI->DICOM
test utility it is fed through.

The T1 is ITK's KmeansTest_T1UCharRaw (128x128x62, 2x2x3 mm, coronal slices) from Debian's
insighttoolkit5-examples, with ITK's own skull strip as the reference brain.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch

from dicom_ai.errors import ModelError
from dicom_ai.inference.builtin import mr_brain
from dicom_ai.inference.builtin.mr_brain import MRBrainModel, deepbet_weights
from dicom_ai.inference.findings import AlgorithmFamily, SegmentLabel, TaskKind
from dicom_ai.inference.model import Model, load_model
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.routing import SenderContext, load_rules
from tests.nifti_dicom import MRSeriesSpec, loaded_affine, write_nifti_as_mr_series
from tests.peers import REPO

ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
T1 = ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz"
SKULL_STRIP = ITK_DATA / "KmeansTest_T1RawSkullStrip.nii.gz"
MIN_DICE = 0.95


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def volume_mask(label_map: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.bool_]:
    """Per-frame planes ``(slices, rows, columns)`` -> the NIfTI's ``(i, j, k)`` layout."""
    return np.asarray(label_map.transpose(2, 1, 0) > 0)


def deepbet_reference(image: nib.Nifti1Image) -> tuple[npt.NDArray[np.bool_], float] | None:
    """deepbet's own code path on the NIfTI (mask, seconds); None without its dependencies."""
    try:
        from deepbet import BrainExtraction
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its torch.jit.load
        extraction = BrainExtraction(no_gpu=True)
    started = time.perf_counter()
    _, mask, _ = extraction.run(image)
    return np.asanyarray(mask.dataobj) > 0, time.perf_counter() - started


@pytest.fixture(scope="module")
def t1() -> nib.Nifti1Image:
    if not T1.is_file():
        pytest.fail(f"{T1} missing: apt-get install insighttoolkit5-examples")
    image = nib.load(T1)
    assert isinstance(image, nib.Nifti1Image)
    return image


@pytest.fixture(scope="module")
def reference() -> npt.NDArray[np.bool_]:
    return np.asarray(nib.load(SKULL_STRIP).dataobj) > 0


@pytest.fixture(scope="module")
def t1_series(t1: nib.Nifti1Image, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_nifti_as_mr_series(t1, tmp_path_factory.mktemp("t1"), MRSeriesSpec())


@pytest.fixture(scope="module")
def t1_volume(t1_series: list[Path]) -> SeriesVolume:
    return load_series(t1_series)


@pytest.fixture(scope="module")
def model() -> MRBrainModel:
    return MRBrainModel(device="cpu")


# --- the NIfTI -> DICOM utility ---------------------------------------------------------


def test_series_loads_back_with_the_nifti_affine_and_voxels(
    t1: nib.Nifti1Image, t1_series: list[Path], t1_volume: SeriesVolume
) -> None:
    assert len(t1_series) == t1.shape[2]
    np.testing.assert_allclose(np.asarray(t1_volume.image.affine), t1.affine, atol=1e-4)
    # (1, columns, rows, slices) is the NIfTI's (i, j, k)
    np.testing.assert_array_equal(t1_volume.image.as_tensor()[0].numpy(), np.asarray(t1.dataobj))
    first = pydicom.dcmread(t1_series[0], stop_before_pixels=True)
    assert first.SOPClassUID == pydicom.uid.MRImageStorage
    assert (first.Rows, first.Columns) == (t1.shape[1], t1.shape[0])
    assert [float(v) for v in first.PixelSpacing] == [2.0, 2.0]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 3.0
    # L, S, A axes: rows run right-to-left (+x in LPS), columns feet-to-head (+z)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 0, 1]
    assert "RescaleSlope" not in first and first.PixelRepresentation == 0


def _rotation(degrees: float, axis: int) -> npt.NDArray[np.float64]:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation


@pytest.mark.parametrize("handed", ["right", "left"])
def test_oblique_float_volume_round_trips(tmp_path: Path, handed: str) -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(300.0, 80.0, size=(20, 16, 9)).astype(np.float32)
    affine = np.eye(4)
    axes = _rotation(17.0, 0) @ _rotation(-25.0, 2) @ np.diag([0.9, 1.1, 2.5])
    if handed == "left":
        axes[:, 0] *= -1  # FSL's radiological convention flips x
    affine[:3, :3] = axes
    affine[:3, 3] = [-40.0, 12.5, 7.25]
    image = nib.Nifti1Image(data, affine)
    volume = load_series(write_nifti_as_mr_series(image, tmp_path))
    expected_affine = loaded_affine(affine, data.shape[2])
    np.testing.assert_allclose(np.asarray(volume.image.affine), expected_affine, atol=1e-4)
    expected = data if handed == "right" else data[:, :, ::-1]
    step = (data.max() - data.min()) / 65535
    np.testing.assert_allclose(volume.image.as_tensor()[0].numpy(), expected, atol=step)


def test_sheared_affine_is_refused(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 1] = 0.3
    image = nib.Nifti1Image(np.zeros((4, 4, 3), dtype=np.int16), affine)
    with pytest.raises(ValueError, match="sheared"):
        write_nifti_as_mr_series(image, tmp_path)


def test_default_rules_route_the_t1_series_to_mr_brain(t1_series: list[Path]) -> None:
    rules = load_rules(REPO / "rules" / "default.yaml")
    sender = SenderContext("SCANNER", "DICOM_AI", "127.0.0.1")
    header = pydicom.dcmread(t1_series[0], stop_before_pixels=True)
    assert [d.model for d in rules.evaluate(header, sender).decisions] == ["mr-brain"]
    # Named only by its sequence: an inversion-prepared 3-D gradient echo is still T1.
    header.SeriesDescription = "sag 1mm iso"
    assert [d.model for d in rules.evaluate(header, sender).decisions] == ["mr-brain"]
    # Not T1 (a 2-D spin echo T2), not the head, a localizer: not routed to mr-brain.
    for change in (
        {"SeriesDescription": "T2 TSE tra", "ScanningSequence": ["SE"], "SequenceName": "*tse2d1"},
        {"BodyPartExamined": "KNEE", "StudyDescription": "MR Knee"},
        {"SeriesDescription": "T1 localizer"},
    ):
        changed = pydicom.dcmread(t1_series[0], stop_before_pixels=True)
        for keyword, value in change.items():
            setattr(changed, keyword, value)
        assert "mr-brain" not in [d.model for d in rules.evaluate(changed, sender).decisions]


# --- the model ----------------------------------------------------------------------------


def test_model_identity_and_registration(model: MRBrainModel) -> None:
    version = metadata.version("deepbet")
    assert model.algorithm.name == "deepbet"
    assert model.algorithm.version == version == "1.0.2"
    assert model.algorithm.family is AlgorithmFamily.ARTIFICIAL_INTELLIGENCE
    assert "T1" in model.algorithm.intended_use
    assert model.labels == (SegmentLabel(1, "brain"),)
    assert (model.model_id, model.spatial_dims, model.task) == (
        "mr-brain",
        3,
        TaskKind.SEGMENTATION,
    )
    assert isinstance(model, Model)
    loaded = load_model("mr-brain", None, "cpu")
    assert isinstance(loaded, MRBrainModel) and loaded.device == torch.device("cpu")


def test_brain_extraction_matches_the_skull_strip_and_deepbet(
    model: MRBrainModel,
    t1: nib.Nifti1Image,
    t1_volume: SeriesVolume,
    reference: npt.NDArray[np.bool_],
) -> None:
    model(t1_volume)  # TorchScript optimises on its first runs; time a warm one
    started = time.perf_counter()
    findings = model(t1_volume)
    seconds = time.perf_counter() - started
    assert findings.label_map.shape == (62, 128, 128)  # (slices, rows, columns)
    assert findings.source_sop_instance_uids == t1_volume.sop_instance_uids
    assert findings.present_labels() == model.labels
    assert set(np.unique(findings.label_map).tolist()) == {0, 1}
    mask = volume_mask(findings.label_map)
    ours = dice(mask, reference)
    print(f"\nmr-brain on the DICOM series: Dice {ours:.4f} vs skull strip, {seconds:.2f} s (CPU)")
    assert ours >= MIN_DICE

    direct = deepbet_reference(t1)
    if direct is None:
        print("deepbet's own code is not importable here; reference run skipped")
        return
    theirs, their_seconds = direct
    print(
        f"deepbet on the NIfTI: Dice {dice(theirs, reference):.4f} vs skull strip, "
        f"{their_seconds:.2f} s; {np.count_nonzero(theirs != mask)} voxels differ from mr-brain"
    )
    # Same networks, same preprocessing: the masks agree to (almost) the voxel.
    assert dice(theirs, mask) >= 0.999


def test_orientation_is_undone_for_an_axial_acquisition(
    model: MRBrainModel, t1: nib.Nifti1Image, tmp_path: Path
) -> None:
    """The same head written as axial slices (RAS) gives the same brain, slice for slice."""
    coronal = volume_mask(
        model(load_series(write_nifti_as_mr_series(t1, tmp_path / "cor"))).label_map
    )
    canonical = nib.as_closest_canonical(t1)
    axial_paths = write_nifti_as_mr_series(
        canonical, tmp_path / "ax", replace(MRSeriesSpec(), series_description="T1 axial")
    )
    axial = volume_mask(model(load_series(axial_paths)).label_map)
    # Bring the coronal result to RAS the way nibabel does; the grids are then identical.
    ornt = nib.orientations.io_orientation(t1.affine)
    np.testing.assert_array_equal(nib.orientations.apply_orientation(coronal, ornt), axial)


def test_missing_deepbet_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mr_brain.metadata, "distribution", not_installed)
    with pytest.raises(ModelError, match="deepbet"):
        MRBrainModel(device="cpu")


def test_altered_weights_are_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.distribution("deepbet")
    files = list(real.files or ())
    fake = SimpleNamespace(version=real.version, files=[])
    monkeypatch.setattr(mr_brain.metadata, "distribution", lambda name: fake)

    fake.files = [f for f in files if str(f) != "data/models/bbox_model.pt"]
    with pytest.raises(ModelError, match=r"no data/models/bbox_model\.pt"):
        deepbet_weights()

    model_pt = next(f for f in files if str(f) == "data/models/model.pt")
    tampered = type(model_pt)("data/models/model.pt")
    tampered.hash = type(model_pt.hash)("sha256=" + "A" * 43)
    tampered.dist = real
    fake.files = [tampered, *[f for f in files if f is not model_pt]]
    with pytest.raises(ModelError, match="does not match its wheel"):
        deepbet_weights()


def test_a_blank_series_is_a_model_error(model: MRBrainModel, t1_volume: SeriesVolume) -> None:
    blank = SeriesVolume(
        image=t1_volume.image.clone().fill_(100.0),
        sop_instance_uids=t1_volume.sop_instance_uids,
        headers=t1_volume.headers,
        paths=t1_volume.paths,
    )
    with pytest.raises(ModelError, match="constant"):
        model(blank)

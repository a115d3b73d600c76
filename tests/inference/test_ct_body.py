"""The built-in ct-body model on the phantom: where the lungs, bone and body are."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dicom_ai.errors import ModelError
from dicom_ai.inference.builtin.ct_body import CTBodyModel
from dicom_ai.inference.findings import AlgorithmFamily, SegmentLabel
from dicom_ai.inference.model import Model, load_model, resolve_device
from dicom_ai.inference.volume import load_series
from dicom_ai.synthetic import PhantomSpec, phantom_hu_volume, write_phantom_ct

SPEC = PhantomSpec(slices=60, rows=256, columns=256, pixel_spacing_mm=1.5625, seed=5)
SPACING = (SPEC.slice_thickness_mm, SPEC.pixel_spacing_mm, SPEC.pixel_spacing_mm)
BODY, LUNG, BONE = 1, 2, 3


@pytest.fixture(scope="module")
def hu() -> npt.NDArray[np.float32]:
    return phantom_hu_volume(SPEC).astype(np.float32)


@pytest.fixture(scope="module")
def labels(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    return CTBodyModel().segment(hu, SPACING)


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_lungs_where_the_phantom_has_lungs(
    hu: npt.NDArray[np.float32], labels: npt.NDArray[np.uint16]
) -> None:
    truth = (hu > -950) & (hu < -600)  # the phantom paints lungs at -850 (+ noise)
    lung = labels == LUNG
    assert _dice(lung, truth) > 0.95
    # both lungs, only in the upper part (the phantom starts them above t = 0.45)
    centre = SPEC.columns // 2
    assert lung[:, :, :centre].sum() > 0.4 * lung.sum() < lung[:, :, centre:].sum()
    first = int(np.argmax(lung.any(axis=(1, 2))))
    assert first / (SPEC.slices - 1) == pytest.approx(0.47, abs=0.05)
    assert not lung[: int(0.4 * SPEC.slices)].any()


def test_spine_is_bone(hu: npt.NDArray[np.float32], labels: npt.NDArray[np.uint16]) -> None:
    bone = labels == BONE
    assert _dice(bone, hu >= 200) > 0.98
    rows, cols = np.nonzero(bone.any(axis=0))
    # behind the centre (larger row index = posterior), on the midline
    assert rows.mean() == pytest.approx(SPEC.rows * (0.5 + 0.17), abs=2)
    assert cols.mean() == pytest.approx(SPEC.columns / 2, abs=2)
    assert bone.any(axis=(1, 2)).all()  # in every slice


def test_body_is_the_patient_without_air(
    hu: npt.NDArray[np.float32], labels: npt.NDArray[np.uint16]
) -> None:
    outside_air = hu == -1000  # only the air around the phantom is noise-free
    assert not labels[outside_air].any()
    tissue = hu > -500
    assert (labels[tissue] > 0).mean() > 0.999
    body = labels == BODY
    assert _dice(body, tissue & (hu < 200)) > 0.98
    assert set(np.unique(labels).tolist()) == {0, BODY, LUNG, BONE}


def test_enclosed_gas_and_outside_objects_are_not_lung_or_body(
    hu: npt.NDArray[np.float32],
) -> None:
    vol = hu.copy()
    # a bowel-gas pocket (-1000 HU, ~3 mL) in the abdomen, and a table under the patient
    vol[5:10, 120:130, 80:90] = -1000.0
    vol[:, 230:236, 20:236] = 300.0
    labels = CTBodyModel().segment(vol, SPACING)
    assert not (labels[5:10, 120:130, 80:90] == LUNG).any()
    assert (labels[5:10, 120:130, 80:90] == BODY).all()  # gas inside the patient is body
    assert not labels[:, 230:236, 20:236].any()


def test_findings_contract_through_dicom(tmp_path: Path) -> None:
    spec = PhantomSpec(slices=12, rows=128, columns=96, pixel_spacing_mm=3.0, seed=2)
    volume = load_series(write_phantom_ct(tmp_path, spec)[::-1])
    model = load_model("ct-body", None, "cpu")
    assert isinstance(model, Model)
    assert model.model_id == "ct-body"
    findings = model(volume)
    assert findings.label_map.shape == (12, 128, 96)
    assert findings.label_map.dtype == np.uint16
    assert findings.source_sop_instance_uids == volume.sop_instance_uids
    assert findings.labels == (
        SegmentLabel(1, "soft tissue"),
        SegmentLabel(2, "lung"),
        SegmentLabel(3, "bone"),
    )
    assert [label.name for label in findings.present_labels()] == ["soft tissue", "lung", "bone"]
    assert findings.algorithm.name == "dicom-ai CT body/lung/bone"
    assert findings.algorithm.family is AlgorithmFamily.CLASSICAL
    assert findings.algorithm.version
    # frame k is the mask of source instance k: the top slice has lungs, the bottom none
    hu = phantom_hu_volume(spec)
    numbers = [int(h.InstanceNumber) for h in volume.headers]
    for k, number in enumerate(numbers):
        has_lung = bool(((hu[number - 1] > -950) & (hu[number - 1] < -600)).any())
        assert bool((findings.label_map[k] == LUNG).any()) == has_lung


def test_fast_on_a_large_grid(hu: npt.NDArray[np.float32]) -> None:
    # 60 x 512 x 512 by repeating the phantom 2x2 in-plane: well under a second per 60 slices
    big = np.tile(hu, (1, 2, 2))
    model = CTBodyModel()
    start = time.perf_counter()
    labels = model.segment(big, (2.5, 0.78125, 0.78125))
    assert time.perf_counter() - start < 5.0
    assert (labels == LUNG).sum() > 0


def test_load_model_errors() -> None:
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model", None, "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu:7x")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")

"""Study jobs' input: several series of one study on the reference series' grid
(inference/study.py), and bundles that take them as channels or keys (inference/bundle.py).

The series are synthetic (tests/studies.py): one phantom in patient space seen by series of
different orientation, spacing and field of view, with bright cubes where a test expects
them. Tiny bundles written here (a 1x1x1 convolution that labels what is bright in each
input) check the channel order and the keys quickly; the zoo's brats (channels) and renal
CECT (keys) configs run unchanged with seeded random weights in the slow tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from monai.data.meta_tensor import MetaTensor
from pydicom import dcmread

from dicom_ai.errors import InputError, ModelError
from dicom_ai.inference.arena import PrefetchArena
from dicom_ai.inference.bundle import BundleModel
from dicom_ai.inference.findings import SegmentationFindings
from dicom_ai.inference.study import _overlaps, load_study
from dicom_ai.inference.volume import SeriesVolume, load_series
from dicom_ai.pipeline.worker import JobSpec, RoleInput, run_job
from tests.studies import AXIAL, CORONAL, OBLIQUE, SAGITTAL, Cube, SeriesSpec, write_study
from tests.zoo import make_zoo_bundle

# The reference: a 3-D T1c, sagittal, 1.5 mm; 45 (x) by 54 (y) by 60 (z) mm.
T1C = SeriesSpec(
    "t1c",
    "T1 post contrast",
    rows=40,
    columns=36,
    slices=30,
    pixel_spacing=(1.5, 1.5),
    slice_spacing=1.5,
    orientation=SAGITTAL,
    mr_acquisition_type="3D",
)
# A 2-D axial FLAIR, 5 mm slices, covering only z in -20..20 mm of the reference's -30..30.
FLAIR_CUBE = Cube((12.0, -8.0, 6.0), 10.0, 1500.0)
FLAIR = SeriesSpec(
    "flair",
    "FLAIR",
    rows=28,
    columns=30,
    slices=8,
    pixel_spacing=(2.2, 2.2),
    slice_spacing=5.0,
    tissue=300.0,
    cubes=(FLAIR_CUBE,),
)
T1C_CUBE = Cube((-10.0, 10.0, -10.0), 6.0, 1500.0)


def _lps(image: MetaTensor, voxels: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Patient coordinates (LPS) of voxel indices of ``image`` (RAS affine)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    ras = voxels @ affine[:3, :3].T + affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def _frames_lps(volume: SeriesVolume, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Patient coordinates of the True pixels of ``mask`` (slices, rows, columns) of
    ``volume``'s frames."""
    k, j, i = np.nonzero(mask)
    return _lps(volume.image, np.stack([i, j, k], axis=1))


def _study(tmp_path: Path, specs: list[SeriesSpec]) -> dict[str, list[Path]]:
    return write_study(tmp_path / "study", specs)


# -- load_study: resampling and refusals (no model) -----------------------------------------


def test_a_role_is_resampled_onto_the_reference_grid_in_patient_space(tmp_path: Path) -> None:
    paths = _study(tmp_path, [T1C, FLAIR])
    study = load_study([("t1c", paths["t1c"]), ("flair", paths["flair"])], "t1c")

    reference = study.reference.image
    assert study.roles == ("t1c", "flair") and study.missing == ()
    assert study.images[0][1] is reference  # the reference is not copied
    flair = study.images[1][1]
    assert isinstance(flair, MetaTensor) and flair.dtype == torch.float32
    assert flair.shape == reference.shape == (1, 36, 40, 30)
    assert torch.equal(torch.as_tensor(flair.affine), torch.as_tensor(reference.affine))
    assert len(study.other_headers) == FLAIR.slices
    assert {str(h.SeriesInstanceUID) for h in study.other_headers} == {
        str(dcmread(paths["flair"][0]).SeriesInstanceUID)
    }

    values = flair[0].numpy()
    voxels = np.argwhere(np.ones(values.shape, dtype=bool))
    where = _lps(reference, voxels).reshape(*values.shape, 3)
    # The cube (20 mm, from 5 mm slices): where the phantom put it, in patient space.
    bright = where[values > FLAIR_CUBE.value / 2]
    assert np.allclose(bright.mean(axis=0), FLAIR_CUBE.center, atol=[1.0, 1.0, 2.5])
    extent = bright.max(axis=0) - bright.min(axis=0)
    assert np.allclose(extent, 2 * FLAIR_CUBE.half_size_mm, atol=[2.0, 2.0, 6.0])
    # Tissue away from the cube keeps the FLAIR's value; beyond its slab (slice centres at
    # z = -17.5..17.5 mm, fading to nothing over the next half slice and more) nothing.
    away = (np.abs(where - FLAIR_CUBE.center) > 15).any(axis=-1) & (np.abs(where[..., 2]) < 15)
    assert np.allclose(values[away], FLAIR.tissue, atol=20)
    outside = np.abs(where[..., 2]) >= 22.5
    assert outside.sum() > 1000 and (values[outside] == 0).all()


def test_a_missing_optional_role_has_no_image(tmp_path: Path) -> None:
    paths = _study(tmp_path, [T1C])
    study = load_study([("flair", ()), ("t1c", paths["t1c"])], "t1c", "keys")
    assert study.images == (("flair", None), ("t1c", study.reference.image))
    assert study.missing == ("flair",) and study.others == {} and study.mode == "keys"
    with pytest.raises(InputError, match="reference role t1c has no series"):
        load_study([("t1c", ()), ("flair", paths["t1c"])], "t1c")
    with pytest.raises(InputError, match="unknown role input"):
        load_study([("t1c", paths["t1c"])], "t1c", "stacked")


def test_another_frame_of_reference_is_refused_naming_the_role(tmp_path: Path) -> None:
    elsewhere = SeriesSpec("flair", "FLAIR", frame_of_reference_uid="1.2.826.0.1.3680043.2.99")
    paths = _study(tmp_path, [T1C, elsewhere])
    with pytest.raises(InputError) as refused:
        load_study([("t1c", paths["t1c"]), ("flair", paths["flair"])], "t1c")
    message = str(refused.value)
    assert message.startswith("role flair: ") and "1.2.826.0.1.3680043.2.99" in message
    assert "reference role t1c" in message and "not combined" in message


def test_a_series_beside_the_reference_volume_is_refused(tmp_path: Path) -> None:
    beside = SeriesSpec("t2", "T2", orientation=CORONAL, center=(0.0, 0.0, 200.0))
    paths = _study(tmp_path, [T1C, beside])
    with pytest.raises(InputError, match=r"^role t2: .* does not overlap the reference role t1c"):
        load_study([("t1c", paths["t1c"]), ("t2", paths["t2"])], "t1c")


@pytest.mark.parametrize(("plane", "overlaps"), [(22.0, False), (18.0, True)])
def test_overlap_is_of_the_volumes_not_their_bounding_boxes(plane: float, overlaps: bool) -> None:
    """A thin slab at 45 degrees near the reference's corner: its bounding box overlaps the
    reference either way; the slab itself only when its plane x + y = c cuts the corner
    (the reference is [-0.5, 9.5] mm along each axis: x + y reaches 19 there)."""
    reference = MetaTensor(torch.zeros(1, 10, 10, 10), affine=torch.eye(4, dtype=torch.float64))
    along, across = np.array([1.0, -1.0, 0.0]) / np.sqrt(2), np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([along, np.array([0.0, 0.0, 1.0]), across], axis=1)
    centre = across * plane / np.sqrt(2)  # on the plane, voxel (10, 5, 0) there
    affine[:3, 3] = centre - affine[:3, :3] @ np.array([10.0, 5.0, 0.0])
    slab = MetaTensor(torch.zeros(1, 21, 11, 1), affine=torch.as_tensor(affine))
    assert _overlaps(slab, reference) is overlaps


# -- bundles on a study: tiny bundles (fast) ------------------------------------------------


def _tiny_study_bundle(directory: Path, *, keys: bool) -> Path:
    """A 1x1x1 convolution over two inputs: label 1 where the first is bright (> 1000),
    2 where the second is; channels (``image``: a list) or keys (``arterial``, ``venous``,
    and ``label``, ground truth the node never has)."""
    (directory / "configs").mkdir(parents=True)
    (directory / "models").mkdir()
    if keys:
        inputs = ["arterial", "venous"]
        preprocessing = [
            {"_target_": "LoadImaged", "keys": [*inputs, "label"]},
            {"_target_": "EnsureChannelFirstd", "keys": inputs},
            {"_target_": "Orientationd", "keys": inputs, "axcodes": "LPS"},
            {"_target_": "ConcatItemsd", "keys": inputs, "name": "image"},
        ]
        invert = {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "arterial",
            "nearest_interp": True,
        }
        postprocessing = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, invert]
    else:
        preprocessing = [{"_target_": "LoadImaged", "keys": "image"}]
        postprocessing = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    config = {
        "image_key": "image",
        "network_def": {
            "_target_": "torch.nn.Conv3d",
            "in_channels": 2,
            "out_channels": 3,
            "kernel_size": 1,
        },
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
    }
    metadata = {
        "name": "Tiny two-input",
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 2, "spatial_shape": ["n", "n", "n"]}},
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "channel_def": {"0": "background", "1": "first bright", "2": "second bright"},
                }
            },
        },
    }
    (directory / "configs" / "inference.json").write_text(json.dumps(config))
    (directory / "configs" / "metadata.json").write_text(json.dumps(metadata))
    weight = torch.zeros(3, 2, 1, 1, 1)
    weight[1, 0] = weight[2, 1] = 1.0
    state = {"weight": weight, "bias": torch.tensor([1000.0, 0.0, 0.0])}
    torch.save(state, directory / "models" / "model.pt")
    return directory


def _centre_of(findings: SegmentationFindings, volume: SeriesVolume, value: int) -> npt.NDArray:
    return _frames_lps(volume, findings.label_map == value).mean(axis=0)


def test_channels_are_the_roles_in_order_and_a_missing_one_is_zeros(tmp_path: Path) -> None:
    t1c = replace(T1C, cubes=(T1C_CUBE,))
    paths = _study(tmp_path, [t1c, FLAIR])
    model = BundleModel(_tiny_study_bundle(tmp_path / "tiny", keys=False), "cpu")

    study = load_study([("t1c", paths["t1c"]), ("flair", paths["flair"])], "t1c")
    findings = model(study)
    assert isinstance(findings, SegmentationFindings)
    reference = study.reference
    assert findings.label_map.shape == reference.frames.shape  # the reference's frames
    assert findings.source_sop_instance_uids == reference.sop_instance_uids
    # Channel 0 is the first role (the T1c's cube), channel 1 the FLAIR's, resampled.
    assert np.allclose(_centre_of(findings, reference, 1), T1C_CUBE.center, atol=1.0)
    assert np.allclose(_centre_of(findings, reference, 2), FLAIR_CUBE.center, atol=[1, 1, 2.5])

    without = load_study([("t1c", paths["t1c"]), ("flair", ())], "t1c")
    findings = model(without)
    assert isinstance(findings, SegmentationFindings)
    assert set(np.unique(findings.label_map)) == {0, 1}  # the FLAIR channel is all zeros
    assert np.allclose(_centre_of(findings, reference, 1), T1C_CUBE.center, atol=1.0)

    with pytest.raises(ModelError, match=r"takes 2 input channel\(s\); the study rule gives 1"):
        model(load_study([("t1c", paths["t1c"])], "t1c"))


def test_keys_are_the_role_names_and_keys_without_an_image_are_left_out(tmp_path: Path) -> None:
    arterial = SeriesSpec(
        "arterial", "arterial", modality="CT", tissue=40.0, cubes=(T1C_CUBE,), slices=20
    )
    venous_cube = Cube((8.0, -6.0, 4.0), 6.0, 1500.0)
    venous = SeriesSpec(
        "venous",
        "venous",
        modality="CT",
        rows=30,
        columns=34,
        slices=12,
        pixel_spacing=(2.2, 1.8),
        slice_spacing=3.0,
        orientation=OBLIQUE,
        center=(2.0, -3.0, 1.0),
        tissue=40.0,
        cubes=(venous_cube,),
    )
    paths = _study(tmp_path, [arterial, venous])
    model = BundleModel(_tiny_study_bundle(tmp_path / "tiny", keys=True), "cpu")
    study = load_study(
        [("arterial", paths["arterial"]), ("venous", paths["venous"])], "arterial", "keys"
    )
    findings = model(study)  # the loader's `label` has no image: left out
    assert isinstance(findings, SegmentationFindings)
    reference = study.reference
    assert findings.label_map.shape == reference.frames.shape
    # Orientationd(LPS) inverted through `arterial`, the reference role's key.
    assert np.allclose(_centre_of(findings, reference, 1), T1C_CUBE.center, atol=1.0)
    assert np.allclose(_centre_of(findings, reference, 2), venous_cube.center, atol=2.0)

    renamed = load_study(
        [("arterial", paths["arterial"]), ("portal", paths["venous"])], "arterial", "keys"
    )
    with pytest.raises(ModelError, match=r"role\(s\) portal are not keys its loader reads"):
        model(renamed)


def test_one_series_for_a_multi_series_bundle_is_refused_with_the_channels(
    tmp_path: Path,
) -> None:
    paths = _study(tmp_path, [T1C])
    model = BundleModel(_tiny_study_bundle(tmp_path / "tiny", keys=False), "cpu")
    with pytest.raises(ModelError) as refused:
        model(load_series(paths["t1c"]))
    reason = str(refused.value)
    assert re.search(r"takes 2 input channels \(several series of one study", reason), reason


def test_a_builtin_model_takes_one_series_not_a_study(tmp_path: Path) -> None:
    from dicom_ai.inference.builtin.ct_body import CTBodyModel

    paths = _study(tmp_path, [T1C])
    with pytest.raises(ModelError, match="ct-body takes one series"):
        CTBodyModel()(load_study([("t1c", paths["t1c"])], "t1c"))


def test_labels_replace_the_metadata_names(tmp_path: Path) -> None:
    bundle = _tiny_study_bundle(tmp_path / "tiny", keys=False)
    model = BundleModel(bundle, "cpu", labels=[(2, "FLAIR bright"), (1, "T1c bright")])
    assert [(label.value, label.name) for label in model.labels] == [
        (1, "T1c bright"),
        (2, "FLAIR bright"),
    ]
    with pytest.raises(ModelError, match="start at 1"):
        BundleModel(bundle, "cpu", labels=[(0, "background"), (1, "x")])


def test_a_study_job_gives_a_seg_on_the_reference_and_an_sr_naming_every_series(
    tmp_path: Path,
) -> None:
    t1c = replace(T1C, cubes=(T1C_CUBE,))
    paths = _study(tmp_path, [t1c, FLAIR])
    series = {role: str(dcmread(p[0]).SeriesInstanceUID) for role, p in paths.items()}
    results = tmp_path / "spool" / "results" / "7"
    spec = JobSpec(
        job_id=7,
        series_instance_uid=series["t1c"],
        model_id="tiny",
        bundle=_tiny_study_bundle(tmp_path / "tiny", keys=False),
        device="cpu",
        timeout_seconds=60,
        instance_paths=tuple(paths["t1c"]),
        results_dir=results,
        device_serial_number="node-1",
        labels=((1, "T1c bright"), (2, "FLAIR bright")),
        roles=(
            RoleInput("t1c", series["t1c"], tuple(paths["t1c"])),
            RoleInput("flair", series["flair"], tuple(paths["flair"])),
        ),
        reference_role="t1c",
        role_input="channels",
        result_key="study-and-rule",
    )
    # Both series prefetched, as the worker's arena holds them when the job comes.
    arena = PrefetchArena(64 << 20)
    arena.prefetch([*paths["flair"], *paths["t1c"]])
    files = run_job(spec, arena)
    assert sorted(p.name for p in files) == ["seg.dcm", "sr.dcm"]
    seg, sr = dcmread(results / "seg.dcm"), dcmread(results / "sr.dcm")
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series["t1c"]]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["T1c bright", "FLAIR bright"]
    evidence = {
        s.SeriesInstanceUID: len(s.ReferencedSOPSequence)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
    }
    assert evidence[series["t1c"]] == T1C.slices and evidence[series["flair"]] == FLAIR.slices
    # The same study and rule give the same results, whichever series the roles got.
    from dicom_ai.results import result_uids

    uids = result_uids("study-and-rule", "tiny", "0.1.0")
    assert seg.SOPInstanceUID == uids.seg_sop_instance_uid
    assert sr.SOPInstanceUID == uids.sr_sop_instance_uid


# -- the zoo's multi-series bundles, configs unchanged (slow) -------------------------------

BRATS_LABELS = ((1, "Tumor core"), (2, "Whole tumor"), (4, "Enhancing tumor"))


@pytest.mark.slow
def test_brats_segments_four_series_of_different_grids_on_the_reference(tmp_path: Path) -> None:
    """One forward pass (brats' window is 240 x 240 x 160 whatever the input: ~25 s on two
    CPU threads): the four sequences as channels, in the metadata's order."""
    specs = [
        T1C,
        SeriesSpec("t1", "T1", rows=36, columns=36, slices=20, pixel_spacing=(1.8, 1.8),
                   slice_spacing=3.0, orientation=AXIAL, tissue=350.0),
        SeriesSpec("t2", "T2", rows=34, columns=38, slices=14, pixel_spacing=(1.7, 1.6),
                   slice_spacing=4.0, orientation=CORONAL, tissue=500.0),
        FLAIR,
    ]  # fmt: skip
    paths = _study(tmp_path, specs)
    bundle = make_zoo_bundle("brats_mri_segmentation", tmp_path / "bundles")
    model = BundleModel(bundle, "cpu", labels=BRATS_LABELS)
    study = load_study([(s.role, paths[s.role]) for s in specs], "t1c")
    inputs: list[torch.Tensor] = []
    model.network.register_forward_hook(lambda _, args, out: inputs.append(args[0].clone()))
    findings = model(study)
    # The network saw the four roles in order: NormalizeIntensityd(nonzero) and the window's
    # padding keep each channel's zeros where the role's image on the reference grid has them.
    (window,) = inputs
    assert window.shape[:2] == (1, 4)
    for channel, (_, image) in enumerate(study.images):
        assert image is not None
        assert int(window[0, channel].ne(0).sum()) == int(image.ne(0).sum())
    assert isinstance(findings, SegmentationFindings)
    assert findings.label_map.shape == study.reference.frames.shape == (30, 40, 36)
    assert findings.source_sop_instance_uids == study.reference.sop_instance_uids
    # The values brats' postprocessing writes, named by the labels override (its metadata
    # names channels 0..2: 4 would be dropped as unnamed, 0 is the background).
    assert set(np.unique(findings.label_map)) <= {0, 1, 2, 4}
    assert 4 in findings.label_map
    assert [(label.value, label.name) for label in findings.labels] == list(BRATS_LABELS)


@pytest.mark.slow
def test_renal_cect_takes_the_phases_as_keys_without_its_ground_truth(tmp_path: Path) -> None:
    """The config's LoadImaged reads artery, vein, excret and `label`, which inference never
    has; its Invertd inverts through `artery`. ~6 s: a 64 mm field of view is one 96^3
    window at its 0.8 mm."""
    phase = SeriesSpec("", "", modality="CT", tissue=40.0, background=-1000.0)
    specs = [
        replace(phase, role="artery", series_description="arterial", slices=16,
                slice_spacing=4.0, cubes=(Cube((5.0, -5.0, 0.0), 8.0, 300.0),)),
        replace(phase, role="vein", series_description="venous", rows=30, columns=34,
                slices=20, pixel_spacing=(2.2, 1.8), slice_spacing=3.0, center=(2.0, -1.0, 3.0)),
        replace(phase, role="excret", series_description="delayed", rows=28, columns=30,
                slices=14, slice_spacing=4.0, orientation=CORONAL),
    ]  # fmt: skip
    paths = _study(tmp_path, specs)
    bundle = make_zoo_bundle("renalStructures_CECT_segmentation", tmp_path / "bundles")
    model = BundleModel(bundle, "cpu")
    study = load_study([(s.role, paths[s.role]) for s in specs], "artery", "keys")
    inputs: list[torch.Tensor] = []
    model.network.register_forward_hook(lambda _, args, out: inputs.append(args[0].clone()))
    findings = model(study)
    assert [tuple(window.shape[1:]) for window in inputs] == [(3, 96, 96, 96)]
    assert isinstance(findings, SegmentationFindings)
    assert findings.label_map.shape == study.reference.frames.shape == (16, 32, 32)
    assert set(np.unique(findings.label_map)) <= {0, 1, 2, 3, 4, 5}
    assert [label.name for label in findings.labels] == [
        "artery",
        "vein",
        "ureter",
        "neoplasm",
        "parenchyma",
    ]

"""The zoo helpers themselves (tests/zoo.py): weights where each config loads them, DiNTS'
architecture file as a download ships it, inputs of the modality each bundle's metadata asks
for. No inference here (tests/node/test_zoo_end_to_end.py runs the bundles in the node)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydicom import dcmread

from tests.bundles import shared_bundle
from tests.zoo import (
    MULTI_SERIES_BUNDLES,
    TORCHVISION_BUNDLES,
    ZOO,
    _parser,
    make_zoo_bundle,
    needs_torchvision,
    weights_path,
    zoo_input,
    zoo_series,
)

# Built with this interpreter and small enough to write in a unit test (vista3d's weights
# are 850 MB; the node test makes it).
IN_PROCESS = (
    "spleen_ct_segmentation",
    "pancreas_ct_dints_segmentation",
    "pediatric_abdominal_ct_segmentation",
    "brats_mri_segmentation",
)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_weights_load_strictly_where_the_config_reads_them(tmp_path: Path, name: str) -> None:
    bundle = make_zoo_bundle(name, tmp_path)
    parser = _parser(bundle)
    path = weights_path(bundle, parser)
    assert path.is_file() and path.is_relative_to(bundle / "models")
    state = torch.load(path, map_location="cpu", weights_only=True)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(state, strict=True)  # a bare state dict, as the zoo ships it
    # Seeded: a second bundle gets the same weights.
    again = torch.load(weights_path(make_zoo_bundle(name, tmp_path / "again")), weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_dints_architecture_file_is_numpy_arrays_topologyinstance_accepts(tmp_path: Path) -> None:
    import numpy as np
    from monai.networks.nets import TopologyInstance

    bundle = make_zoo_bundle("multi_organ_segmentation", tmp_path)
    saved = torch.load(bundle / "models" / "search_code_18590.pt", weights_only=False)
    assert set(saved) == {"node_a", "arch_code_a", "arch_code_c"}
    assert all(isinstance(v, np.ndarray) for v in saved.values())
    assert saved["node_a"].shape == (13, 4) and saved["arch_code_a"].shape == (12, 10)
    space = TopologyInstance(
        channel_mul=1,
        num_blocks=12,
        num_depths=4,
        use_downsample=True,
        arch_code=[saved["arch_code_a"], saved["arch_code_c"]],
        device="cpu",
    )
    assert int(space.arch_code_a.sum()) == 24  # two active nodes, one path into each


def test_wholebody_weights_follow_the_modelname_expression(tmp_path: Path) -> None:
    bundle = make_zoo_bundle("wholeBody_ct_segmentation", tmp_path)
    # displayable_configs#highres is true in the shipped config: model.pt, not the
    # low-resolution file a download also ships.
    assert weights_path(bundle) == bundle.resolve() / "models" / "model.pt"
    assert (bundle / "models" / "model.pt").is_file()
    assert not (bundle / "models" / "model_lowres.pt").exists()


@pytest.mark.parametrize("name", TORCHVISION_BUNDLES)
def test_torchvision_bundles_are_refused_clearly_without_an_environment(
    tmp_path: Path, name: str
) -> None:
    assert needs_torchvision(shared_bundle(name))
    with pytest.raises(RuntimeError, match="torchvision"):
        make_zoo_bundle(name, tmp_path)


def test_only_the_torchvision_bundles_need_torchvision() -> None:
    assert {n for n in ZOO if needs_torchvision(shared_bundle(n))} == set(TORCHVISION_BUNDLES)
    assert {n for n in ZOO if zoo_input(shared_bundle(n)).channels > 1} == set(
        MULTI_SERIES_BUNDLES
    ) | {"breast_density_classification"}


@pytest.mark.parametrize(
    ("name", "modality", "sop_class", "count", "size"),
    [
        ("spleen_ct_segmentation", "CT", "1.2.840.10008.5.1.4.1.1.2", 24, (48, 48)),
        ("brats_mri_segmentation", "MR", "1.2.840.10008.5.1.4.1.1.4", 24, (48, 48)),
        ("valve_landmarks", "MR", "1.2.840.10008.5.1.4.1.1.4", 4, (256, 256)),
        ("breast_density_classification", "MG", "1.2.840.10008.5.1.4.1.1.1.2", 1, (320, 256)),
    ],
)
def test_inputs_follow_the_metadata(
    tmp_path: Path, name: str, modality: str, sop_class: str, count: int, size: tuple[int, int]
) -> None:
    paths = zoo_series(shared_bundle(name), tmp_path, series_description=f"zoo {name}")
    datasets = [dcmread(p) for p in paths]
    assert len(datasets) == count
    assert {ds.Modality for ds in datasets} == {modality}
    assert {ds.SOPClassUID for ds in datasets} == {sop_class}
    assert {ds.SeriesInstanceUID for ds in datasets} == {datasets[0].SeriesInstanceUID}
    assert {(ds.Rows, ds.Columns) for ds in datasets} == {size}
    if name == "valve_landmarks":  # one plane, successive temporal positions
        assert {tuple(ds.ImagePositionPatient) for ds in datasets} == {
            tuple(datasets[0].ImagePositionPatient)
        }
        assert [ds.TemporalPositionIdentifier for ds in datasets] == [1, 2, 3, 4]
    for ds in datasets:
        assert ds.pixel_array.shape == size

"""MONAI model-zoo bundles for tests: the shared configs, unchanged, plus weights we make.

The zoo's weights cannot be downloaded here, and random weights are useless downstream
(wholeBody's 105 random channels give speckle of ~100 labels, a huge SEG). So the weights
are *constructed*, not trained: deterministic, instant, no seed involved. Each network is
wired into a small intensity classifier for the phantom of :mod:`dicom_ai.synthetic`,
built from the network's own layers (convolutions, norms, activations); the configs'
preprocessing, sliding-window inferer, postprocessing and ``Invertd`` all run as shipped.

- :func:`make_spleen_bundle`: the 3D UNet labels ``spleen`` (1) where the locally averaged
  HU is within a few HU of 50 (the phantom's spleen; liver 60, soft tissue 40, kidneys 30).
  Averaging happens before the band test (noise), the band score is averaged again after it,
  which removes the thin 50-HU rim where the liver (60) meets soft tissue (40).
- :func:`make_wholebody_bundle`: the SegResNet labels intensity bands with three
  TotalSegmentator ids: lung parenchyma -> 13 ``lung_upper_lobe_left``, soft tissue ->
  5 ``liver``, bone -> 22 ``vertebrae_L1`` (:data:`WHOLEBODY_PHANTOM_LABELS`). The names
  are arbitrary picks from the bundle's ``channel_def``: the network sees intensities,
  not anatomy, so on the phantom the "liver" is all soft tissue and both lungs are one
  lobe label. Partial-volume voxels at the skin (air/fat edge, lung-band HU) are kept out
  of the lung by a gradient penalty (see :func:`_wholebody_state`).

Use from a test::

    from tests.bundles import make_spleen_bundle, make_wholebody_bundle

    bundle = make_wholebody_bundle(tmp_path)          # -> tmp_path / "wholeBody_ct_segmentation"
    model = BundleModel(bundle, "cpu")

or import the session fixtures ``spleen_bundle`` / ``wholebody_bundle`` into a test module.
The shared configs are read from ``$DICOM_AI_MONAI_BUNDLES`` or ``shared/monai-bundles``
beside the checkout (where CI puts it).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle.config_parser import ConfigParser

__all__ = [
    "SPLEEN",
    "SPLEEN_PHANTOM_LABELS",
    "WHOLEBODY",
    "WHOLEBODY_PHANTOM_LABELS",
    "make_spleen_bundle",
    "make_wholebody_bundle",
    "shared_bundle",
    "spleen_bundle",
    "spleen_state_dict",
    "wholebody_bundle",
    "wholebody_state_dict",
]

SPLEEN = "spleen_ct_segmentation"
WHOLEBODY = "wholeBody_ct_segmentation"
SPLEEN_PHANTOM_LABELS = {1: "spleen"}
WHOLEBODY_PHANTOM_LABELS = {5: "liver", 13: "lung_upper_lobe_left", 22: "vertebrae_L1"}


def shared_bundle(name: str) -> Path:
    """The shared (config-only) bundle directory ``name``; fails the test when absent."""
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "monai-bundles"
    root = Path(os.environ.get("DICOM_AI_MONAI_BUNDLES", str(default)))
    bundle = root / name
    configs = bundle / "configs"
    if not any((configs / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml")):
        pytest.fail(f"shared MONAI bundle configs not found at {bundle}")
    return bundle


def make_spleen_bundle(directory: Path) -> Path:
    """Copy the spleen bundle's configs into ``directory`` and write ``models/model.pt``."""
    return _make_bundle(directory, SPLEEN, spleen_state_dict(), "model.pt")


def make_wholebody_bundle(directory: Path) -> Path:
    """Copy the wholeBody bundle's configs into ``directory`` and write its weights file
    (``models/model.pt``; the name the config's ``modelname`` expression picks)."""
    return _make_bundle(directory, WHOLEBODY, wholebody_state_dict(), "model.pt")


@pytest.fixture(scope="session")
def spleen_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_spleen_bundle(tmp_path_factory.mktemp("spleen-bundle"))


@pytest.fixture(scope="session")
def wholebody_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wholebody_bundle(tmp_path_factory.mktemp("wholebody-bundle"))


def _make_bundle(directory: Path, name: str, state: dict[str, torch.Tensor], file: str) -> Path:
    target = Path(directory) / name
    shutil.copytree(shared_bundle(name), target, dirs_exist_ok=True)
    (target / "models").mkdir(exist_ok=True)
    torch.save(state, target / "models" / file)
    return target


def _network(name: str) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(shared_bundle(name) / "configs" / "inference.json")
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, torch.nn.Module)
    return network


def _zeros(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: torch.zeros_like(v) for k, v in network.state_dict().items()}
    for key in state:  # batch norm: unit variance, so a zero weight gives exactly its bias
        if key.endswith("running_var"):
            state[key].fill_(1.0)
    return state


def _centre(kernel: torch.Tensor, value: float) -> None:
    kernel[1, 1, 1] = value


_BOX = torch.full((3, 3, 3), 1.0 / 27.0)
_TENT = torch.tensor([0.5, 1.0, 0.5])
# Transposed-convolution kernel that upsamples by 2 with linear interpolation.
_TENT3 = _TENT[:, None, None] * _TENT[None, :, None] * _TENT[None, None, :]


@functools.cache
def _spleen_state() -> dict[str, torch.Tensor]:
    # The spleen preprocessing gives x = clip((HU + 57) / 221, 0, 1).
    hu_per_x, hu_offset, spleen_hu, half_band = 221.0, -57.0, 50.0, 2.0
    s = _zeros(_network(SPLEEN))
    identity_bn = {"weight": 1.0, "running_var": 1.0 - 1e-5}  # eps: (v - 0) / sqrt(1) * 1 + 0

    def bn(prefix: str, channels: range) -> None:
        for c in channels:
            s[f"{prefix}.weight"][c] = identity_bn["weight"]
            s[f"{prefix}.running_var"][c] = identity_bn["running_var"]

    # Down block 1 (stride 2), unit0: v = HU - 50 at the centre voxel, linear (PReLU slope 1).
    # No neighbours here, so the window's zero padding (-57 HU) cannot leak in.
    _centre(s["model.0.conv.unit0.conv.weight"][0, 0], hu_per_x)
    s["model.0.conv.unit0.conv.bias"][0] = hu_offset - spleen_hu
    bn("model.0.conv.unit0.adn.N", range(1))
    s["model.0.conv.unit0.adn.A.weight"].fill_(1.0)
    # unit1: mean of 3x3x3 (half resolution: 9 mm) -> s; ReLU(+s), ReLU(-s) so |s| follows.
    # Zero padding means v = 0, i.e. 50 HU: neutral for the spleen at window borders.
    s["model.0.conv.unit1.conv.weight"][0, 0] = _BOX
    s["model.0.conv.unit1.conv.weight"][1, 0] = -_BOX
    bn("model.0.conv.unit1.adn.N", range(2))
    s["model.0.conv.unit1.adn.A.weight"].fill_(0.0)
    # Deeper levels stay zero: the skip concatenation passes [|s|+, |s|-, 0, ...] up.
    # Up block 1: transposed conv upsamples |s| = ReLU(s) + ReLU(-s) linearly, kept linear.
    s["model.2.0.conv.weight"][0, 0] = _TENT3
    s["model.2.0.conv.weight"][1, 0] = _TENT3
    bn("model.2.0.adn.N", range(2))
    s["model.2.0.adn.A.weight"].fill_(1.0)
    # Last residual unit (conv + identity): logit0 = 0, logit1 = band - mean3x3x3(|s|).
    final = s["model.2.1.conv.unit0.conv.weight"]
    _centre(final[0, 0], -1.0)
    final[1, 0] = -_BOX
    s["model.2.1.conv.unit0.conv.bias"][1] = half_band
    return s


def spleen_state_dict() -> dict[str, torch.Tensor]:
    """Constructed spleen UNet weights (a fresh copy each call)."""
    return {k: v.clone() for k, v in _spleen_state().items()}


# wholeBody: ScaleIntensityd maps the volume's [min, max] HU to [-1, 1]; on the phantom
# that is air (-1000) to the noisy cortical-bone maximum (727..739 measured).
_WB_HU_MIN, _WB_HU_MAX = -1000.0, 732.0
_K = 100.0  # constant carried next to each intensity feature (see below)
_KG = 1.0e4  # the same for gradient features, which reach a few hundred HU per voxel
_WB_SCALE = 0.1  # logits per HU
_WB_OTHER = -1000.0  # logit of every label the construction does not produce
_LUNG, _LIVER, _VERTEBRA = 13, 5, 22


def _difference(axis: int) -> torch.Tensor:
    """3x3x3 kernel of the central difference along ``axis``."""
    kernel = torch.zeros(3, 3, 3)
    low, high = [1, 1, 1], [1, 1, 1]
    low[axis], high[axis] = 0, 2
    kernel[tuple(low)], kernel[tuple(high)] = -0.5, 0.5
    return kernel


@functools.cache
def _wholebody_state() -> dict[str, torch.Tensor]:
    """SegResNet as a per-voxel intensity classifier with a partial-volume penalty.

    GroupNorm (8 groups of 4 channels) normalises over the whole window, which would make
    any intensity test depend on what the window holds. Each group is therefore filled as
    ``[f, K, -K, -f]``: its mean is exactly 0 and its variance ~K^2/2 whatever the window
    holds, so GroupNorm becomes a fixed affine map of ``f`` and the ReLU after it gives
    ramps ``ReLU(a * f + b)``. Only level 0 is used; deeper levels are zero.

    - ``convInit``: groups 0-3 carry the intensity ``x`` (centre tap: no padding effects).
    - ``down_layers.0.1``: adds the constants ``K, -K`` to every group.
    - ``up_layers.2.0`` (last decoder block): ``u = ReLU(HU + 850)`` (0 for lung and air),
      its central differences along the three axes, and ``p = sum |du|`` written into
      group 4. Zero padding at window borders means ``u = 0``: lung-neutral, so lungs are
      not cut at window or volume edges.
    - ``conv_final``: ramps of ``x`` make triangles (lung at -850 HU, soft tissue at 75 HU)
      and a rising bone score; the lung score loses ``p / 2`` so partial-volume voxels at
      the skin (air/fat edges with lung-like HU) are not lung.
    """
    s = _zeros(_network(WHOLEBODY))
    x_per_hu = 2.0 / (_WB_HU_MAX - _WB_HU_MIN)

    def x_at(hu: float) -> float:
        return -1.0 + (hu - _WB_HU_MIN) * x_per_hu

    sigma, sigma_g = _K / math.sqrt(2.0), _KG / math.sqrt(2.0)  # the groups' std
    init = s["convInit.conv.weight"]
    for group in range(4):
        _centre(init[4 * group, 0], 1.0)
        _centre(init[4 * group + 3, 0], -1.0)
    block = "down_layers.0.1"
    for group in range(8):
        c = 4 * group + 1
        s[f"{block}.norm1.bias"][c] = 1.0
        _centre(s[f"{block}.conv1.conv.weight"][c, c], 1.0)
        s[f"{block}.norm2.bias"][c] = 1.0
        _centre(s[f"{block}.conv2.conv.weight"][c, c], _K)
        _centre(s[f"{block}.conv2.conv.weight"][c + 1, c], -_K)

    up = "up_layers.2.0"
    lung_hu = -850.0
    # norm1: channel 12 (x of group 3) -> HU - lung_hu, ReLU -> u; channel 13 -> constant 1
    s[f"{up}.norm1.weight"][12] = sigma / x_per_hu
    s[f"{up}.norm1.bias"][12] = -x_at(lung_hu) / x_per_hu
    s[f"{up}.norm1.bias"][13] = 1.0
    conv1 = s[f"{up}.conv1.conv.weight"]
    conv2 = s[f"{up}.conv2.conv.weight"]
    for axis in range(3):  # groups 4, 5, 6 of conv1's output: [du, KG, -KG, -du]
        c = 16 + 4 * axis
        conv1[c, 12] = _difference(axis)
        conv1[c + 3, 12] = -_difference(axis)
        _centre(conv1[c + 1, 13], _KG)
        _centre(conv1[c + 2, 13], -_KG)
        for channel in (c, c + 3):  # norm2 -> +-du in HU per voxel; ReLU -> |du| in two parts
            s[f"{up}.norm2.weight"][channel] = sigma_g
            _centre(conv2[16, channel], 1.0)  # p into group 4 of the stream, -p beside it
            _centre(conv2[19, channel], -1.0)

    gamma, beta = s["conv_final.0.weight"], s["conv_final.0.bias"]

    def ramp(channel: int, sign: float, hu_at_zero: float) -> None:
        # the channel carries sign * x; its ReLU output is ReLU(sign * (HU - hu_at_zero))
        gamma[channel] = sigma / x_per_hu
        beta[channel] = -sign * x_at(hu_at_zero) / x_per_hu

    lung_half = 75.0
    tissue_hu, tissue_half = 75.0, 100.0
    bone_hu = 150.0
    ramp(0, 1.0, lung_hu)
    ramp(3, -1.0, lung_hu)
    ramp(4, 1.0, tissue_hu)
    ramp(7, -1.0, tissue_hu)
    ramp(8, 1.0, bone_hu)
    gamma[16] = sigma  # p, already in HU per voxel

    weight = s["conv_final.2.conv.weight"][:, :, 0, 0, 0]
    bias = s["conv_final.2.conv.bias"]
    bias.fill_(_WB_OTHER * _WB_SCALE)
    bias[0] = 0.0  # background
    # lung: triangle around -850 HU, minus half the summed |gradient| of u
    bias[_LUNG] = _WB_SCALE * lung_half
    weight[_LUNG, [0, 3]] = -_WB_SCALE
    weight[_LUNG, 16] = -0.5 * _WB_SCALE
    # soft tissue: triangle over -25..175 HU
    bias[_LIVER] = _WB_SCALE * tissue_half
    weight[_LIVER, [4, 7]] = -_WB_SCALE
    # bone: rises above 150 HU, takes over from tissue at ~165 HU
    bias[_VERTEBRA] = -_WB_SCALE * 5.0
    weight[_VERTEBRA, 8] = _WB_SCALE
    return s


def wholebody_state_dict() -> dict[str, torch.Tensor]:
    """Constructed wholeBody SegResNet weights (a fresh copy each call)."""
    return {k: v.clone() for k, v in _wholebody_state().items()}

"""Attribution maps: which part of its input a classifier or detector based its answer on.

:class:`Explainer` computes one with MONAI (``monai.visualize``) on the preprocessed input
the network saw, for one target class:

- ``gradcam`` / ``gradcampp``: :class:`~monai.visualize.GradCAM` /
  :class:`~monai.visualize.GradCAMpp` on one layer (the model config's ``explain_layer``, or
  :func:`default_target_layer`); one forward and one backward pass;
- ``occlusion``: :class:`~monai.visualize.OcclusionSensitivity`, how much the target's logit
  drops where the input is occluded; one forward pass per mask position, so the mask is a
  fixed fraction of each axis (:data:`OCCLUSION_MASK`), whatever the input size.

The network's output becomes one logit per class (:class:`ClassLogits`): a classifier's as
it is; a RetinaNet's (MONAI's ``RetinaNet``, dict or list output) the highest
classification logit over its anchors and pyramid levels. A detector is explained around
one box (``center``): in a crop of :attr:`Explainer.roi_size` voxels about it, so the
backward pass fits in memory on a whole CT; the map is zero elsewhere.

Maps are returned on the preprocessed grid, non-negative (evidence for the class, none
against), not yet normalised: :class:`~dicom_ai.inference.bundle.BundleModel` brings them
back onto the source grid through the inverse of its preprocessing, then scales them to
0..1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal, cast, get_args

import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.croppad.array import DivisiblePad
from monai.visualize.class_activation_maps import GradCAM, GradCAMpp
from monai.visualize.occlusion_sensitivity import OcclusionSensitivity
from torch import nn

__all__ = [
    "METHODS",
    "OCCLUSION_MASK",
    "ClassLogits",
    "Explainer",
    "Method",
    "default_target_layer",
]

Method = Literal["gradcam", "gradcampp", "occlusion"]
METHODS: Final = cast(tuple[str, ...], get_args(Method))

# Occlusion mask as a fraction of each axis, and the overlap of its positions:
# (1 - fraction) / (fraction * (1 - overlap)) + 1 positions an axis, one forward pass each
# (2-D: 15 x 15, 3-D: 5 x 5 x 5).
OCCLUSION_MASK: Final = {2: (1 / 8, 0.5), 3: (1 / 4, 0.25)}
# A detector's crop about its box, in preprocessed voxels (3-D; 2-D takes the first two).
DETECTION_ROI: Final = (128, 128, 64)
_CONV_NAMES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "ConvTranspose3d")
_WRAPPED = "network"  # the attribute ClassLogits holds the network under


class ClassLogits(nn.Module):
    """``network`` with its output as ``(batch, classes)`` logits, what MONAI's CAM and
    occlusion classes score: a classifier's output flattened, a RetinaNet's highest
    classification logit per class over anchors and pyramid levels."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.network(x)
        if isinstance(output, torch.Tensor):
            return output.reshape(output.shape[0], -1)
        return _detection_logits(self.network, output)


def _detection_logits(network: nn.Module, output: Any) -> torch.Tensor:
    classes = int(getattr(network, "num_classes", 1))
    if isinstance(output, Mapping):
        maps = output[getattr(network, "cls_key", "classification")]
    elif isinstance(output, Sequence) and not isinstance(output, str):
        maps = output[: len(output) // 2]  # use_list_output: classification maps first
    else:
        raise TypeError(f"cannot read class logits from a {type(output).__name__} output")
    # Each level is (B, anchors * classes, *spatial), anchor-major (MONAI's _reshape_maps).
    per_level = [m.reshape(m.shape[0], -1, classes, *m.shape[2:]) for m in maps]
    return torch.stack([m.transpose(1, 2).flatten(2).amax(2) for m in per_level]).amax(0)


def default_target_layer(network: nn.Module) -> str:
    """The layer GradCAM reads when the config names none: the network's last convolution.

    For a RetinaNet the last convolution of its feature extractor outside the feature
    pyramid: every pyramid level, so every anchor, depends on it. The heads are shared by
    the levels (a hook sees only the last level's call) and the box regression head does
    not feed the class score.
    """
    extractor = getattr(network, "feature_extractor", None)
    if isinstance(extractor, nn.Module) and hasattr(network, "classification_head"):
        pyramid = {
            f"{name}."
            for name, module in extractor.named_modules()
            if type(module).__name__ == "FeaturePyramidNetwork"
        }
        names = [
            f"feature_extractor.{name}"
            for name, module in extractor.named_modules()
            if _is_conv(module) and not any(name.startswith(p) for p in pyramid)
        ]
    else:
        names = [name for name, module in network.named_modules() if _is_conv(module)]
    if not names:
        raise ValueError("the network has no convolution for GradCAM; name explain_layer")
    return names[-1]


def _is_conv(module: nn.Module) -> bool:
    # torch's convolutions, and TorchScript's copies of them (same original name).
    original = getattr(module, "original_name", "")
    return isinstance(module, nn.modules.conv._ConvNd) or original in _CONV_NAMES


class Explainer:
    """Attribution maps of one method for one network's inputs (see the module docstring).

    Args:
        method: ``gradcam``, ``gradcampp`` or ``occlusion``.
        layer: the module GradCAM reads, a dotted name in the network (``None``: the
            :func:`default_target_layer`); unused by occlusion.
        occlusion_mask: mask size as a fraction of each axis and overlap of its positions,
            per spatial dimensions (default :data:`OCCLUSION_MASK`).
        occlusion_batch: occluded images per forward pass.
        roi_size: a detector's crop about its box, in preprocessed voxels.
    """

    def __init__(
        self,
        method: str,
        layer: str | None = None,
        *,
        occlusion_mask: Mapping[int, tuple[float, float]] = OCCLUSION_MASK,
        occlusion_batch: int = 8,
        roi_size: Sequence[int] = DETECTION_ROI,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown attribution method {method!r} (use {', '.join(METHODS)})")
        self.method = cast(Method, method)
        self.layer = layer
        self.occlusion_mask = dict(occlusion_mask)
        self.occlusion_batch = occlusion_batch
        self.roi_size = tuple(roi_size)

    def target_layer(self, network: nn.Module) -> str:
        """The layer GradCAM reads in ``network``; a configured one must exist."""
        if self.layer is None:
            return default_target_layer(network)
        if self.layer not in dict(network.named_modules()):
            raise ValueError(f"explain_layer {self.layer!r} is not a module of the network")
        return self.layer

    def __call__(
        self,
        network: nn.Module,
        image: torch.Tensor,
        target: int,
        center: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """The map for class ``target`` of ``network`` on ``image`` (the preprocessed input,
        channel first, no batch), ``(1, *spatial)`` float32 on the CPU, >= 0.

        ``center``: a detector's box centre in voxels of ``image``; the map covers the
        :attr:`roi_size` crop about it (the whole image when smaller) and is zero elsewhere.
        """
        device = next(network.parameters(), torch.empty(0)).device
        # Plain tensors: MetaTensor's bookkeeping on every operation of many passes is slow.
        plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        x = plain.detach().float().to(device).unsqueeze(0)
        spatial = tuple(x.shape[2:])
        crop = _crop(spatial, self.roi_size[: len(spatial)], center)
        region = x[(slice(None), slice(None), *crop)]
        # A detector pads its input to a multiple of its strides (size_divisible): so here.
        divisible = getattr(network, "size_divisible", 1)
        # At the end only: the map is cut back from the start.
        padded = torch.as_tensor(
            DivisiblePad(k=divisible, mode="constant", method="end")(region[0])
        )
        padded = padded.as_tensor() if isinstance(padded, MetaTensor) else padded
        padded = padded.unsqueeze(0)
        scores = ClassLogits(network)
        if self.method == "occlusion":
            values = self._occlusion(scores, padded, target)
        else:
            values = self._cam(scores, padded, target, self.target_layer(network))
        values = values[(slice(None), *(slice(0, n) for n in region.shape[2:]))]
        result = torch.zeros((1, *spatial), dtype=torch.float32)
        result[(slice(None), *crop)] = values.float().cpu()
        return result.clamp_(min=0.0).nan_to_num_(0.0)

    def _cam(self, scores: ClassLogits, x: torch.Tensor, target: int, layer: str) -> torch.Tensor:
        kind = GradCAMpp if self.method == "gradcampp" else GradCAM
        with _hooks_removed_after(scores), torch.enable_grad():
            # Parameters stay frozen: the input's gradient is what builds the graph.
            x = x.clone().requires_grad_(True)
            cam = kind(nn_module=scores, target_layers=f"{_WRAPPED}.{layer}", postprocessing=_same)
            values = cam(x, class_idx=target)
        return cast(torch.Tensor, values)[0].detach()

    def _occlusion(self, scores: ClassLogits, x: torch.Tensor, target: int) -> torch.Tensor:
        spatial = x.shape[2:]
        fraction, overlap = self.occlusion_mask[len(spatial)]
        mask = [max(1, min(n, math.ceil(n * fraction))) for n in spatial]
        # Logits, not probabilities: a saturated softmax hides what a region adds.
        occlusion = OcclusionSensitivity(
            scores,
            mask_size=mask,
            n_batch=self.occlusion_batch,
            verbose=False,
            overlap=overlap,
            activate=False,
        )
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI 1.6 indexes with lists, which torch 2.13 warns about on every window.
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            baseline = scores(x)[0, target]
            occluded, _ = occlusion(x)
        # What occluding each place costs the target's logit.
        drop: torch.Tensor = baseline - occluded[0, target : target + 1]
        return drop.detach()


def _same(x: torch.Tensor) -> torch.Tensor:
    """No postprocessing: MONAI's default normaliser inverts the map (max -> 0)."""
    return x


def _crop(
    spatial: tuple[int, ...], roi: Sequence[int], center: Sequence[float] | None
) -> tuple[slice, ...]:
    """Slices of ``spatial`` for the ``roi`` about ``center`` (inside the image), or all."""
    if center is None:
        return tuple(slice(0, n) for n in spatial)
    slices = []
    for n, size, c in zip(spatial, roi, center, strict=True):
        size = min(n, size)
        start = min(max(0, round(c - size / 2)), n - size)
        slices.append(slice(start, start + size))
    return tuple(slices)


@contextmanager
def _hooks_removed_after(module: nn.Module) -> Iterator[None]:
    """MONAI's ModelWithHooks registers hooks it never removes (and turns ``inplace`` off
    on its layer): left, every later inference of the model would keep an activation alive.
    Whatever it adds to ``module`` is taken off again."""
    modules = list(module.modules())
    forward = [set(m._forward_hooks) for m in modules]
    backward = [set(m._backward_hooks) for m in modules]
    inplace = [m.__dict__.get("inplace") for m in modules]
    full = [m._is_full_backward_hook for m in modules]
    # A full backward hook's output is a view: an in-place activation after the hooked layer
    # (VGG-style ReLU(inplace=True)) would modify it. Out of place while the map is made.
    for m in modules:
        if m.__dict__.get("inplace") is True:
            m.__dict__["inplace"] = False
    try:
        yield
    finally:
        for m, fw, bw, was, kind in zip(modules, forward, backward, inplace, full, strict=True):
            for key in set(m._forward_hooks) - fw:
                del m._forward_hooks[key]
            for key in set(m._backward_hooks) - bw:
                del m._backward_hooks[key]
            m._is_full_backward_hook = kind
            if was is not None:
                m.__dict__["inplace"] = was

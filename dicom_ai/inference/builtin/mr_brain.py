"""Built-in ``mr-brain`` model: brain extraction (skull stripping) of T1-weighted MR.

The networks are deepbet's (Fisch et al., 2024; https://github.com/wwu-mmll/deepbet, MIT):
two TorchScript 3-D U-Nets shipped in the ``deepbet`` wheel under ``data/models/``. They are
loaded from the installed distribution, checked against the wheel's RECORD hashes, and run
here with MONAI transforms; deepbet's own code (and its dependencies cc3d, fill_voids,
pandas, customtkinter) is never imported.

deepbet's algorithm, step by step (``deepbet/bet.py``, version 1.0.2):

1. the volume is reoriented to RAS (``Orientation``; deepbet: ``as_closest_canonical``);
2. a 128³ nearest-exact copy gives the intensity window (0.5 % and 99.5 % quantiles) and,
   through the box network, a coarse brain mask; its largest component's extent, widened
   by 10 % on each side, is the brain's bounding box on the full grid;
3. the box is resampled to 256³ (nearest-exact), segmented by the main network, the
   probability resampled back into the box, thresholded at 0.5; the largest connected
   component is kept and its holes are filled.

The mask is taken back to the series grid by inverting the orientation, so it lines up
with :meth:`SeriesVolume.frames_from_volume`.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from base64 import urlsafe_b64encode
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy.typing as npt
import torch
from monai.data.meta_tensor import MetaTensor
from monai.inferers.inferer import SimpleInferer
from monai.transforms.croppad.array import SpatialCrop
from monai.transforms.post.array import FillHoles, KeepLargestConnectedComponent
from monai.transforms.spatial.array import Orientation, Resize

from dicom_ai.errors import ModelError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
    TaskKind,
)
from dicom_ai.inference.model import (
    ModelInput,
    limit_torch_threads,
    require_volume,
    resolve_device,
)

__all__ = ["MR_BRAIN_LABELS", "MRBrainModel", "deepbet_weights"]

logger = logging.getLogger(__name__)

MODEL_ID = "mr-brain"
DISTRIBUTION = "deepbet"
BRAIN = 1
MR_BRAIN_LABELS = (SegmentLabel(BRAIN, "brain"),)

# The grids the networks were trained on (deepbet's run_model defaults).
_SMALL_SHAPE = (128, 128, 128)
_SHAPE = (256, 256, 256)
_LOW_QUANTILE, _HIGH_QUANTILE = 0.005, 0.995
# A plane of the coarse mask counts towards the bounding box when its mean exceeds this.
_BBOX_PROFILE_THRESHOLD = 0.02


def deepbet_weights() -> tuple[str, Path, Path]:
    """deepbet's version and the paths of its main and box networks, from the installed
    wheel; :class:`ModelError` when the package or a file is missing or altered."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ModelError(
            "model mr-brain needs the deepbet package for its network weights "
            "(pip install deepbet==1.0.2)"
        ) from exc
    entries = {str(f).replace("\\", "/"): f for f in dist.files or ()}
    paths = []
    for name in ("data/models/model.pt", "data/models/bbox_model.pt"):
        entry = entries.get(name)
        if entry is None:
            raise ModelError(f"deepbet {dist.version}: its wheel lists no {name}")
        path = Path(str(entry.locate()))
        if not path.is_file():
            raise ModelError(f"deepbet {dist.version}: {name} is missing at {path}")
        if entry.hash is not None and entry.hash.mode == "sha256":
            # A truncated or replaced file would load as a different (or broken) network.
            with path.open("rb") as weights:
                digest = urlsafe_b64encode(hashlib.file_digest(weights, "sha256").digest())
            if digest.rstrip(b"=").decode() != entry.hash.value:
                raise ModelError(f"deepbet {dist.version}: {path} does not match its wheel")
        paths.append(path)
    return dist.version, paths[0], paths[1]


def _load_network(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # Recent torch deprecates TorchScript for torch.export; deepbet ships TorchScript.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load. is deprecated")
            # torch.jit.load is untyped; the files are TorchScript archives (ScriptModules).
            network = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location=device
            )
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelError(f"cannot load deepbet network {path.name}: {exc}") from exc
    return cast(torch.jit.ScriptModule, network.eval())


def normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's input scaling: window to [0, 1], standardise, then ImageNet-like mean/std."""
    x = ((x - low) / (high - low)).clamp(0, 1)
    x = (x - x.mean()) / x.std()
    return 0.226 * x + 0.449


def _plain(x: torch.Tensor | npt.NDArray[Any]) -> torch.Tensor:
    # MONAI array transforms hand back MetaTensors; the networks and bookkeeping want tensors.
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class MRBrainModel:
    """deepbet brain extraction: ``MRBrainModel()(volume)`` -> :class:`SegmentationFindings`.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (``cuda:N``).
        threshold: probability above which a voxel is brain.
        bbox_margin: the box around the coarse mask is widened by this fraction of its size
            on each side.
        max_threads: cap for torch's CPU threads (default: the CPUs this process may use).
    """

    model_id = MODEL_ID
    labels: tuple[SegmentLabel, ...] = MR_BRAIN_LABELS
    task = TaskKind.SEGMENTATION
    spatial_dims = 3

    def __init__(
        self,
        *,
        device: str = "auto",
        threshold: float = 0.5,
        bbox_margin: float = 0.1,
        max_threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            limit_torch_threads(max_threads)
        self.threshold = threshold
        self.bbox_margin = bbox_margin
        version, model_path, bbox_path = deepbet_weights()
        self.algorithm = AlgorithmIdentification(
            name="deepbet",
            version=version,
            family=AlgorithmFamily.ARTIFICIAL_INTELLIGENCE,
            intended_use="Brain extraction (skull stripping) of T1-weighted MR of adults",
        )
        self._network = _load_network(model_path, self.device)
        self._bbox_network = _load_network(bbox_path, self.device)
        self._to_small = Resize(_SMALL_SHAPE, mode="nearest-exact")
        self._to_network = Resize(_SHAPE, mode="nearest-exact")
        # The networks see the whole (resampled) box at once, as they were trained.
        self._inferer = SimpleInferer()
        self._largest = KeepLargestConnectedComponent(connectivity=3)  # cc3d's 26-neighbours
        # fill_voids floods the background with 6-neighbours: diagonal leaks stay holes.
        self._fill = FillHoles(connectivity=1)
        logger.info("loaded mr-brain (deepbet %s) on %s", version, self.device)

    def __call__(self, source: ModelInput) -> SegmentationFindings:
        volume = require_volume(source, self.model_id)
        orientation = Orientation(axcodes="RAS", labels=None)
        with warnings.catch_warnings():
            # The image's meta says space=RAS, which is what labels=None reads.
            warnings.filterwarnings("ignore", message=r".*Orientation.__init__:labels")
            oriented = orientation(volume.image)
        if not isinstance(oriented, MetaTensor):  # MONAI keeps the type; the trace needs it
            raise ModelError("mr-brain: Orientation lost the image's metadata")
        mask = self.segment(oriented.as_tensor()[0])
        # The mask carries the orientation's trace, so inverting it restores the series grid.
        traced = MetaTensor(
            mask[None].to(torch.uint8),
            meta=dict(oriented.meta),
            applied_operations=list(oriented.applied_operations),
        )
        on_grid = orientation.inverse(traced)
        return SegmentationFindings(
            label_map=volume.frames_from_volume(on_grid),
            labels=self.labels,
            algorithm=self.algorithm,
            source_sop_instance_uids=volume.sop_instance_uids,
            source_frame_numbers=volume.frame_numbers,
        )

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Brain mask (bool, on the CPU) of a RAS-oriented ``(x, y, z)`` T1 volume."""
        x = torch.nan_to_num(_plain(image).to(self.device, torch.float32))
        small = _plain(self._to_small(x[None]))
        low = torch.quantile(small, _LOW_QUANTILE)
        high = torch.quantile(small, _HIGH_QUANTILE)
        if not bool(high > low):
            raise ModelError("mr-brain: the series has (almost) constant intensity")
        with torch.no_grad():
            coarse = self._infer(self._bbox_network, normalize(small, low, high))
        coarse_mask = _plain(self._largest((coarse > self.threshold)[None].cpu()))[0]
        box = self._bbox(coarse_mask, tuple(x.shape))

        crop = _plain(SpatialCrop(roi_slices=box)(x[None]))
        fine = _plain(self._to_network(crop))
        with torch.no_grad():
            prob = self._infer(self._network, normalize(fine, low, high))
        prob = _plain(Resize(tuple(crop.shape[1:]), mode="nearest-exact")(prob[None]))
        brain = (prob > self.threshold).cpu()
        brain = _plain(self._largest(brain))
        brain = _plain(self._fill(brain.to(torch.uint8))).bool()
        mask = torch.zeros(x.shape, dtype=torch.bool)
        mask[box] = brain[0]
        return mask

    def _infer(self, network: torch.jit.ScriptModule, image: torch.Tensor) -> torch.Tensor:
        """Brain probability (channel 1 of the two-class output) of a ``(1, x, y, z)`` image."""
        output = self._inferer(image[None], network)
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"mr-brain: the network returned {type(output).__name__}")
        return output[0, 1]

    def _bbox(self, coarse: torch.Tensor, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """deepbet's box: the planes where over 2 % of the coarse mask is brain, widened, on
        ``shape``."""
        fg = coarse.float()
        centres, sizes = [], []
        for dims in ((1, 2), (0, 2), (0, 1)):
            hits = torch.where(fg.mean(dims) > _BBOX_PROFILE_THRESHOLD)[0]
            if hits.numel() == 0:
                raise ModelError("mr-brain found no brain in the series (is it a head T1?)")
            first, last = int(hits.min()), int(hits.max()) + 1
            centres.append((first + last) / 2)
            sizes.append(last - first)
        # float32 tensor arithmetic and torch's rounding (half to even), as deepbet does it,
        # so the box is the same to the voxel.
        scale = torch.tensor(shape) / torch.tensor(tuple(coarse.shape))
        centre = (scale * torch.tensor(centres)).round()
        size = ((1 + 2 * self.bbox_margin * torch.ones(3)) * (scale * torch.tensor(sizes))).round()
        box = [
            slice(max(0, int(c - s / 2)), min(full, int(c + s / 2)))
            for c, s, full in zip(centre, size, shape, strict=True)
        ]
        return tuple(box)

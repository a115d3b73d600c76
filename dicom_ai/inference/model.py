"""What the pipeline calls a model, and how one is picked from the config.

A model (:class:`Model`) has ``model_id``, ``algorithm``, ``task`` (what it finds),
``spatial_dims`` (3: it takes the series as one volume; 2: each image on its own) and
``__call__(source) -> Findings``. The node ships
:class:`~dicom_ai.inference.builtin.ct_body.CTBodyModel` and ``mr-brain``
(:class:`~dicom_ai.inference.builtin.mr_brain.MRBrainModel`), and runs MONAI bundles
through :class:`~dicom_ai.inference.bundle.BundleModel`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from dicom_ai.errors import ModelError
from dicom_ai.inference.findings import AlgorithmIdentification, Findings, TaskKind
from dicom_ai.inference.planar import PlanarImage
from dicom_ai.inference.study import StudyInput
from dicom_ai.inference.volume import SeriesVolume

__all__ = [
    "BUILTIN_MODELS",
    "Model",
    "ModelInput",
    "cpu_budget",
    "limit_torch_threads",
    "load_model",
    "require_volume",
    "resolve_device",
]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("ct-body", "mr-brain")


ModelInput = SeriesVolume | tuple[PlanarImage, ...] | StudyInput
"""A 3-D model gets the series as one volume, a 2-D model its images; a multi-series
bundle the series of a study job, on one grid."""


@runtime_checkable
class Model(Protocol):
    """A loaded model: settings fixed at construction, one series per call."""

    @property
    def model_id(self) -> str: ...

    @property
    def algorithm(self) -> AlgorithmIdentification: ...

    @property
    def task(self) -> TaskKind: ...

    @property
    def spatial_dims(self) -> int: ...

    def __call__(self, source: ModelInput) -> Findings: ...


def load_model(
    model_id: str,
    bundle: Path | None,
    device: str = "auto",
    *,
    task: str | None = None,
    threshold: float = 0.5,
    config_files: Sequence[str] = (),
    prompts: Sequence[int] | None = None,
    labels: Sequence[tuple[int, str]] | None = None,
    explain: str = "off",
    explain_layer: str | None = None,
) -> Model:
    """The model for ``model_id``: a MONAI bundle when ``bundle`` is given, else a built-in.

    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (``cuda:N``); ``task``
    overrides what the bundle's metadata says it outputs; ``threshold`` is the probability
    from which a class or detection counts as found; ``labels`` (value, name) replace the
    bundle metadata's label names; ``explain`` (``off``, ``gradcam``, ``gradcampp``,
    ``occlusion``) adds an attribution map to a bundle classifier's or detector's findings,
    ``explain_layer`` names the module GradCAM reads.
    Raises :class:`ModelError` for an unknown built-in or a bundle that cannot be loaded.
    """
    # Imported here: bundle.py uses this module's helpers; the built-ins pull in scipy,
    # which a bundle's own environment (older numpy) may not run.
    from dicom_ai.inference.bundle import BundleModel

    if bundle is not None:
        return BundleModel(
            bundle,
            device,
            model_id=model_id,
            task=task,
            threshold=threshold,
            config_files=config_files,
            prompts=prompts,
            labels=labels,
            explain=explain,
            explain_layer=explain_layer,
        )
    if labels is not None:
        raise ModelError(f"{model_id}: `labels` names a bundle's labels; a built-in has its own")
    if explain != "off":
        logger.warning("%s: explain applies to bundle classifiers and detectors; ignored", model_id)
    resolve_device(device)  # a bad device string is a config error for built-ins too
    if model_id == "ct-body":
        from dicom_ai.inference.builtin.ct_body import CTBodyModel

        return CTBodyModel()
    if model_id == "mr-brain":
        from dicom_ai.inference.builtin.mr_brain import MRBrainModel

        return MRBrainModel(device=device)
    raise ModelError(
        f"unknown model {model_id!r}: no bundle given and no built-in of that name "
        f"(built-ins: {', '.join(BUILTIN_MODELS)})"
    )


def require_volume(source: ModelInput, model_id: str) -> SeriesVolume:
    """The volume a 3-D model needs; a 2-D input or a study is a routing mistake, said as
    such."""
    if isinstance(source, StudyInput):
        raise ModelError(
            f"{model_id} takes one series; a study job's several series are for a bundle "
            "that takes them (several input channels or keys)"
        )
    if not isinstance(source, SeriesVolume):
        raise ModelError(f"{model_id} is a 3-D model; it needs a series volume, not 2-D images")
    return source


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r} (use auto, cpu or cuda)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise ModelError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return resolved


def cpu_budget() -> int:
    """CPUs this process may use: affinity mask and cgroup quota, whichever is smaller."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    budget = max(1, count or 1)
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            budget = min(budget, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return budget


def limit_torch_threads(max_threads: int | None = None) -> int:
    """Cap torch's intra-op threads at the CPU budget (torch may count host cores in a
    container and oversubscribe); returns the thread count in force."""
    limit = min(cpu_budget(), max_threads) if max_threads else cpu_budget()
    if torch.get_num_threads() > limit:
        logger.debug("torch threads %d -> %d", torch.get_num_threads(), limit)
        torch.set_num_threads(limit)
    return torch.get_num_threads()

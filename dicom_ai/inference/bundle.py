"""Run a MONAI bundle (model-zoo layout) on a :class:`SeriesVolume`, config unchanged.

The layout is ``configs/inference.json``, ``configs/metadata.json`` and the weights under
``models/``. The config stays data: it is parsed with ``monai.bundle.ConfigParser`` and only
these ids are overridden in memory, never in the file:

- ``bundle_root`` -> the bundle directory;
- ``device`` and, where present, ``inferer#device`` / ``inferer#sw_device`` -> the device
  this node chose (the zoo's expressions pick ``cuda:0`` whenever one exists).

From the config the model uses ``network_def``, the weights named by
``checkpointloader#load_path`` (wholeBody's ``modelname`` picks the file) or
``models/model.pt``, ``preprocessing`` without its file loader (``LoadImage(d)``: the series
volume is fed in instead), ``inferer``, and ``postprocessing`` without file savers
(``SaveImage(d)``), keeping ``Invertd`` so the prediction comes back on the source grid
(whether the bundle inverts before or after ``AsDiscreted``). Label names come from
``metadata.json`` (``network_data_format.outputs.pred.channel_def``).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose
from monai.transforms.io.array import LoadImage, SaveImage
from monai.transforms.io.dictionary import LoadImaged, SaveImaged
from monai.transforms.post.dictionary import Invertd

from dicom_ai.errors import ModelError
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    SegmentationFindings,
    SegmentLabel,
)
from dicom_ai.inference.model import limit_torch_threads, resolve_device
from dicom_ai.inference.volume import SeriesVolume

__all__ = ["BundleModel", "read_bundle_labels"]

logger = logging.getLogger(__name__)

_LOADERS = (LoadImage, LoadImaged)
_SAVERS = (SaveImage, SaveImaged)
_PRED_KEY = "pred"
_QUIET = (
    "Detected deprecated name 'optional_packages_version'",  # metadata schema rename
    "NvImgCodecPydicomReader",  # LoadImaged's optional GPU decoder; the loader is dropped
    r".*Orientationd.__init__:labels",  # default labels change; our meta has space=RAS
)


class BundleModel:
    """A MONAI bundle as a :class:`~dicom_ai.inference.model.SegmentationModel`.

    Args:
        bundle_dir: the bundle's root (holds ``configs/`` and ``models/``).
        device: ``auto``, ``cpu`` or ``cuda`` (``cuda:N``).
        model_id: the name the node's config uses; defaults to the directory name.
        overrides: extra config ids to set before parsing (e.g.
            ``{"displayable_configs#highres": False}``); the file itself is never changed.
        max_threads: cap for torch's CPU threads (default: the CPUs this process may use).
    """

    def __init__(
        self,
        bundle_dir: Path,
        device: str = "auto",
        *,
        model_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        max_threads: int | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.model_id = model_id or self.bundle_dir.name
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            limit_torch_threads(max_threads)
        config_file = self.bundle_dir / "configs" / "inference.json"
        meta_file = self.bundle_dir / "configs" / "metadata.json"
        for required in (config_file, meta_file):
            if not required.is_file():
                raise ModelError(f"bundle {self.bundle_dir}: missing {required.name}")
        try:
            metadata = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"bundle {self.bundle_dir}: unreadable metadata.json: {exc}") from exc
        self.labels: tuple[SegmentLabel, ...] = read_bundle_labels(metadata)
        self.algorithm = AlgorithmIdentification(
            name=str(metadata.get("name") or self.bundle_dir.name),
            version=str(metadata.get("version") or "0"),
            family=AlgorithmFamily.ARTIFICIAL_INTELLIGENCE,
            intended_use=str(metadata.get("intended_use") or ""),
        )
        try:
            with warnings.catch_warnings():
                # Known, harmless noise from parsing zoo configs with MONAI 1.6.
                for message in _QUIET:
                    warnings.filterwarnings("ignore", message=message)
                self._setup(config_file, meta_file, overrides or {})
        except ModelError:
            raise
        except Exception as exc:  # config expressions can raise anything
            raise ModelError(f"bundle {self.bundle_dir}: cannot load: {exc}") from exc
        logger.info(
            "loaded bundle %s (%s %s) on %s",
            self.model_id,
            self.algorithm.name,
            self.algorithm.version,
            self.device,
        )

    def _setup(self, config_file: Path, meta_file: Path, overrides: Mapping[str, Any]) -> None:
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.read_meta(meta_file)
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = self.device
        for key in ("inferer#device", "inferer#sw_device"):
            if key in parser:
                parser[key] = self.device
        for key, value in overrides.items():
            parser[key] = value
        self.image_key = str(parser.get("image_key", "image"))

        network = cast(torch.nn.Module, parser.get_parsed_content("network_def"))
        weights = self._weights_path(parser)
        network.load_state_dict(_state_dict(weights, self.device))
        network.to(self.device).eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.network = network
        self.weights_path = weights

        self.inferer = parser.get_parsed_content("inferer")
        parsed_pre = cast(Compose, parser.get_parsed_content("preprocessing"))
        parsed_post = cast(Compose, parser.get_parsed_content("postprocessing"))
        # The same transform objects, minus file I/O: Invertd finds the applied operations by
        # transform id, and the bundle's own Invertd keeps pointing at ``parsed_pre``.
        self.preprocessing = Compose([t for t in _flat(parsed_pre) if not isinstance(t, _LOADERS)])
        post = [t for t in _flat(parsed_post) if not isinstance(t, _SAVERS)]
        if not any(isinstance(t, Invertd) for t in post):
            # A bundle that saves on its own grid: bring the prediction back ourselves.
            post.append(
                Invertd(
                    keys=_PRED_KEY,
                    transform=parsed_pre,
                    orig_keys=self.image_key,
                    nearest_interp=True,
                )
            )
        self.postprocessing = Compose(post)
        amp = bool(parser.get("evaluator#amp", True))
        self.amp = amp and self.device.type == "cuda"  # mixed precision only on CUDA

    def _weights_path(self, parser: ConfigParser) -> Path:
        if "checkpointloader#load_path" in parser:
            path = Path(str(parser.get_parsed_content("checkpointloader#load_path")))
        elif "modelname" in parser:
            path = self.bundle_dir / "models" / str(parser.get_parsed_content("modelname"))
        else:
            path = self.bundle_dir / "models" / "model.pt"
        if not path.is_file():
            raise ModelError(f"bundle {self.bundle_dir}: no weights at {path}")
        return path

    def __call__(self, volume: SeriesVolume) -> SegmentationFindings:
        try:
            pred = self.predict(volume)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"bundle {self.model_id} failed on the series: {exc}") from exc
        label_map = volume.frames_from_volume(pred)
        del pred
        known = {label.value for label in self.labels}
        present = np.flatnonzero(np.bincount(label_map.ravel()))
        unknown = [int(v) for v in present if v and v not in known]
        if unknown:
            logger.warning("bundle %s produced labels without names %s", self.model_id, unknown)
            label_map[np.isin(label_map, unknown)] = 0
        return SegmentationFindings(
            label_map=label_map,
            labels=self.labels,
            algorithm=self.algorithm,
            source_sop_instance_uids=volume.sop_instance_uids,
        )

    def predict(self, volume: SeriesVolume) -> torch.Tensor:
        """The bundle's label volume on the series grid, ``(1, columns, rows, slices)``."""
        # A copy: bundle transforms may write in place (NormalizeIntensity does), and the
        # caller's volume must survive for the next model.
        source = MetaTensor(
            volume.image.as_tensor().clone(),
            affine=volume.image.affine.clone(),
            meta={k: v for k, v in volume.image.meta.items() if k != "affine"},
        )
        with torch.no_grad():
            data = self.preprocessing({self.image_key: source})
            del source
            image = data[self.image_key]
            batch = image.unsqueeze(0).to(self.device)
            autocast = (
                torch.autocast(device_type="cuda", dtype=torch.float16)
                if self.amp
                else nullcontext()
            )
            with autocast:
                logits = self.inferer(batch, self.network)
            del batch
            pred = logits[0]
            if isinstance(pred, MetaTensor):
                pred = pred.as_tensor()
            data[_PRED_KEY] = pred.float()
            del logits, pred
            data = self.postprocessing(data)
            result = data[_PRED_KEY]
            if isinstance(result, MetaTensor):
                result = result.as_tensor()
            result = torch.as_tensor(result)
            if result.shape[0] > 1:  # not discrete yet: one channel per class
                result = torch.argmax(result, dim=0, keepdim=True)
        expected = tuple(volume.image.shape)
        if tuple(result.shape) != expected:
            raise ModelError(
                f"bundle {self.model_id} returned {tuple(result.shape)}, not the series grid "
                f"{expected}; does its postprocessing invert the preprocessing?"
            )
        return result.cpu()


def read_bundle_labels(metadata: Mapping[str, Any]) -> tuple[SegmentLabel, ...]:
    """Labels from ``network_data_format.outputs.pred.channel_def``, background dropped."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output: Any = outputs.get(_PRED_KEY) or next(iter(outputs.values()), {})
    channel_def = output.get("channel_def") if isinstance(output, Mapping) else None
    if not isinstance(channel_def, Mapping) or not channel_def:
        raise ModelError(
            "bundle metadata has no network_data_format.outputs.pred.channel_def: "
            "the node needs the label names"
        )
    labels = []
    for key, name in channel_def.items():
        try:
            value = int(key)
        except ValueError as exc:
            raise ModelError(f"channel_def key {key!r} is not a label value") from exc
        if value == 0 or str(name).strip().lower() == "background":
            continue
        labels.append(SegmentLabel(value, str(name)))
    return tuple(sorted(labels, key=lambda label: label.value))


def _flat(compose: Compose) -> list[Any]:
    """The transforms of ``compose`` with nested plain Composes inlined (MONAI's rules)."""
    flat = compose.flatten()  # type: ignore[no-untyped-call]
    return list(flat.transforms)


def _state_dict(path: Path, device: torch.device) -> Mapping[str, torch.Tensor]:
    """Weights as the zoo stores them: a bare state dict, or one under "model"/"state_dict"."""
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read weights {path}: {exc}") from exc
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping):
                return cast(Mapping[str, torch.Tensor], inner)
        return cast(Mapping[str, torch.Tensor], loaded)
    raise ModelError(f"weights {path} hold a {type(loaded).__name__}, not a state dict")

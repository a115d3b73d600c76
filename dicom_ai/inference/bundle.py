"""Run a MONAI bundle (model-zoo layout) on a series, config unchanged.

The layout is ``configs/`` (``inference.json`` or ``inference.yaml``, ``metadata.json``) and
the weights under ``models/``. The config stays data: it is parsed with
``monai.bundle.ConfigParser`` (several files merged in order, as MONAI's runner merges them,
when the model config names them) and only these ids are overridden in memory, never in
the file:

- ``bundle_root`` -> the bundle directory;
- ``device`` and, where present, ``inferer#device`` / ``inferer#sw_device`` -> the device
  this node chose; on a machine without CUDA, every CUDA device the config names
  (``torch.device('cuda')`` in an expression, a ``"cuda:0"`` value) -> that device too;
- a file loader's ``reader`` is dropped (the node feeds decoded images; see below), and
  ``pretrained: true`` in ``network_def`` is false (it would download backbone weights that
  the bundle's checkpoint replaces).

From the config the model uses ``network_def``; the weights where the config's
``CheckpointLoader`` reads them (``checkpointloader`` or one of ``handlers``), or the file
``modelname`` names, else ``models/model.pt`` or TorchScript ``models/model.ts``; a
state dict bare or under the loader's ``load_dict`` key. An architecture file the config
loads with ``torch.load`` may hold numpy arrays (DiNTS): allowed, nothing else is. What the
evaluator ``_requires_`` first (a detector's ``detector_ops``) is evaluated, as MONAI's
runner does. ``preprocessing`` runs with its file loader ``LoadImage(d)`` standing in for
the decoded series (:mod:`dicom_ai.inference.loader`: what the loader, with its own
arguments, would give for the series written as NIfTI), ``inferer``, and ``postprocessing``
without transforms that write files (``SaveImage(d)``, a bundle's own savers), keeping
``Invertd`` so the prediction comes back on the source grid. Label names come from
``metadata.json`` (``network_data_format.outputs.pred.channel_def`` or ``label_def``), or
from the model config's ``labels`` (value -> name), which replace them: brats' metadata
names its network's three channels 0..2 where its postprocessing writes the values 1, 2, 4.

A 3-D bundle whose input has several channels takes several series of one study (MR
sequences, contrast phases): one series is refused with a reason. It runs on a study job's
:class:`~dicom_ai.inference.study.StudyInput` (every role on the reference series' grid),
segmentation only: in ``channels`` mode its image key gets the images in role order (a
missing optional role as zeros), which its own ``LoadImage(d)`` stacks as channels; in
``keys`` mode its input dict gets each image under its role name (renal CECT's ``artery``,
``vein``, ``excret``), and loader keys without an image (ground truth such as ``label``) are
left out. The label map lies on the reference series' frames.

What the bundle outputs is read from ``outputs.pred`` too (or set in the node's model config):

- ``format: segmentation`` -> a label volume (above);
- ``type: probabilities``, ``format: classes/classification``, or a ``(1, classes)``
  ``spatial_shape`` -> one probability per ``channel_def`` class; postprocessing runs
  without ``AsDiscrete(d)`` and ``Invertd``. Without ``Activations(d)`` in the
  postprocessing the outputs are logits: sigmoid for one channel, softmax for several;
- ``type: object`` or ``format: box/boxes/bbox/dict`` -> detections: MONAI's detector
  output, a dict or a one-item list of dicts with boxes (N, 6 ``xyzxyz``, or 4 ``xyxy`` in
  2-D, in voxels of the preprocessed image), labels and scores under the detector's own
  keys (after its ops), else the config's ``box_key``/``label_key``/``pred_score_key``.
  Postprocessing is not run: the boxes are mapped to patient space through the
  preprocessed image's affine (2-D: to the source image's pixels);
- ``format: points`` (``type: tuples``) -> landmarks: the output's last axis is the
  landmark, the one before it the coordinate along the input image's columns then rows;
  names from the metadata's ``coordinate_meanings`` when given.

A promptable bundle (its inferer requires MONAI's ``point_coords``, ``point_labels`` and
``class_vector``, as VISTA-3D's) runs in automatic mode: ``label_prompt`` in the data (for
the bundle's own prompt transforms) and ``class_vector`` hold every class of its metadata,
or the model config's ``prompts``.

``inputs.image.spatial_shape`` with two entries makes a 2-D model: it gets each image on its
own (CR, DX, MG; MONOCHROME1 already inverted by the loader; a grey image repeated to the
input's ``num_channels`` as a picture saved as RGB would be), or, when the bundle's chain
refuses one image, the series' images stacked in time order (a cine; the bundle's inferer
slices it). 2-D segmentation gives a mask plane per image (a ``SliceInferer`` bundle takes the
volume instead), 2-D detection boxes in each image's pixel coordinates. Like MONAI's own
bundle runner, the bundle root is put on ``sys.path`` so configs can import its ``scripts``.

With ``explain`` (off by default) a classifier's findings carry an attribution map of the
most probable class per result, a 3-D detector's one of its highest-scoring box when it
is at or above the threshold (:mod:`dicom_ai.inference.explain`), brought back onto the
source grid through the inverse of the preprocessing as a segmentation is (``Invertd``,
with the transforms' own interpolation). A map that fails is logged and left out; the
findings stand.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from itertools import permutations
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import to_affine_nd
from monai.inferers.inferer import SliceInferer
from monai.transforms.compose import Compose
from monai.transforms.io.array import SaveImage
from monai.transforms.io.dictionary import SaveImaged
from monai.transforms.post.array import Activations, AsDiscrete
from monai.transforms.post.dictionary import Activationsd, AsDiscreted, Invertd

from dicom_ai.errors import InputError, ModelError
from dicom_ai.inference.explain import Explainer
from dicom_ai.inference.findings import (
    AlgorithmFamily,
    AlgorithmIdentification,
    AttributionMap,
    ClassificationFindings,
    ClassScore,
    Detection,
    DetectionFindings,
    Findings,
    ImageClassification,
    ImageDetection,
    ImageDetectionFindings,
    Landmark,
    LandmarkFindings,
    SegmentationFindings,
    SegmentLabel,
    TaskKind,
)
from dicom_ai.inference.loader import SeriesLoadImage, SeriesLoadImaged, series_loaders
from dicom_ai.inference.model import ModelInput, limit_torch_threads, resolve_device
from dicom_ai.inference.planar import PlanarImage, cine_series, with_channels
from dicom_ai.inference.study import StudyInput
from dicom_ai.inference.volume import SeriesVolume

__all__ = [
    "BundleModel",
    "bundle_config_files",
    "read_bundle_classes",
    "read_bundle_labels",
    "read_bundle_metadata",
    "read_bundle_task",
]

logger = logging.getLogger(__name__)

_SAVERS = (SaveImage, SaveImaged)
# Bundles' own savers (NpySaverd, ClassificationSaver, ...) write files too.
_SAVER_NAME = re.compile(r"Save(r|d|rd)?$|Saver")
_SERIES_LOADERS = (SeriesLoadImage, SeriesLoadImaged)
_LABEL_PROMPT = "label_prompt"  # MONAI's promptable (VISTA-3D) key for label prompts
_PROMPT_PARAMETERS = {"point_coords", "point_labels", "class_vector"}
# Classification keeps the probabilities: no argmax, and nothing to invert onto a grid.
_NOT_FOR_SCORES = (AsDiscrete, AsDiscreted, Invertd)
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_PRED_KEY = "pred"
_MAP_KEY = "attribution"  # the attribution map's key while it is inverted
_QUIET = (
    "Detected deprecated name 'optional_packages_version'",  # metadata schema rename
    "NvImgCodecPydicomReader",  # LoadImaged's optional GPU decoder; the loader is dropped
    r".*Orientationd.__init__:labels",  # default labels change; our meta has space=RAS
)


class BundleModel:
    """A MONAI bundle as a :class:`~dicom_ai.inference.model.Model`.

    Args:
        bundle_dir: the bundle's root (holds ``configs/`` and ``models/``).
        device: ``auto``, ``cpu`` or ``cuda`` (``cuda:N``).
        model_id: the name the node's config uses; defaults to the directory name.
        overrides: extra config ids to set before parsing (e.g.
            ``{"displayable_configs#highres": False}``); the file itself is never changed.
        max_threads: cap for torch's CPU threads (default: the CPUs this process may use).
        task: what the bundle outputs, overriding its metadata (see the module docstring).
        threshold: probability from which a class or a detection counts as found.
        config_files: config files under ``configs/`` merged in order, as MONAI's runner
            merges them (default: ``inference.json`` or ``inference.yaml``).
        prompts: a promptable bundle's label prompts (default: every class of its metadata).
        labels: (value, name) of each label, replacing the metadata's names (brats' names
            the network's channels, its postprocessing writes other label values).
        explain: ``off``, or the attribution map a classifier or detector adds to its
            findings (:mod:`dicom_ai.inference.explain`): ``gradcam``, ``gradcampp``,
            ``occlusion``.
        explain_layer: the network module GradCAM reads (default: its last convolution).
    """

    def __init__(
        self,
        bundle_dir: Path,
        device: str = "auto",
        *,
        model_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        max_threads: int | None = None,
        task: str | None = None,
        threshold: float = 0.5,
        config_files: Sequence[str] = (),
        prompts: Sequence[int] | None = None,
        labels: Sequence[tuple[int, str]] | None = None,
        explain: str = "off",
        explain_layer: str | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir).resolve()
        self.model_id = model_id or self.bundle_dir.name
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            limit_torch_threads(max_threads)
        files = bundle_config_files(self.bundle_dir, config_files)
        meta_file = _first_file(self.bundle_dir / "configs", "metadata")
        metadata = read_bundle_metadata(self.bundle_dir)
        self.task = TaskKind(task) if task else read_bundle_task(metadata)
        self.spatial_dims = _spatial_dims(metadata)
        self.threshold = threshold
        self._requested_prompts = prompts
        self._input_channels = _input_channels(metadata)
        # A 3-D network taking several channels: several series of a study (a 2-D one may
        # take a colour picture, or be run slice by slice on a volume).
        self._multi_series = self.spatial_dims == 3 and self._input_channels > 1
        self._landmark_names = _landmark_names(metadata)
        self.labels: tuple[SegmentLabel, ...] = (
            _given_labels(labels, self.task)
            if labels is not None
            else read_bundle_labels(metadata)
            if self.task is TaskKind.SEGMENTATION
            else read_bundle_classes(metadata, required=self.task is TaskKind.CLASSIFICATION)
        )
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
                self._setup(files, meta_file, overrides or {})
        except ModelError:
            raise
        except Exception as exc:  # config expressions can raise anything
            raise ModelError(f"bundle {self.bundle_dir}: cannot load: {exc}") from exc
        self.explainer = self._explainer(explain, explain_layer)
        logger.info(
            "loaded bundle %s (%s %s) on %s",
            self.model_id,
            self.algorithm.name,
            self.algorithm.version,
            self.device,
        )

    def _setup(
        self, config_files: Sequence[Path], meta_file: Path, overrides: Mapping[str, Any]
    ) -> None:
        # As MONAI's runner does: configs may import the bundle's scripts/. First on the path,
        # and no `scripts` of a bundle loaded before in this worker left in the module cache.
        root = str(self.bundle_dir)
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
        parser = ConfigParser()
        parser.read_config([str(f) for f in config_files])
        parser.read_meta(meta_file)
        parser["bundle_root"] = str(self.bundle_dir)
        if self.device.type != "cuda":
            _run_cuda_on(parser, self.device)
        _drop_file_readers(parser)
        _no_pretrained_download(parser)
        parser["device"] = self.device
        for key in ("inferer#device", "inferer#sw_device"):
            if key in parser:
                parser[key] = self.device
        for key, value in overrides.items():
            parser[key] = value
        self.image_key = str(parser.get("image_key", "image"))
        self._box_key = str(parser.get("box_key", "box"))
        self._label_key = str(parser.get("label_key", "label"))
        self._score_key = str(parser.get("pred_score_key", f"{self._label_key}_scores"))

        with _numpy_in_checkpoints():  # an architecture file the config loads (DiNTS)
            network = cast(torch.nn.Module, parser.get_parsed_content("network_def"))
        weights = self._weights_path(parser)
        if weights.suffix == ".ts":
            network = torch.jit.load(str(weights), map_location=self.device)  # type: ignore[no-untyped-call]
        else:
            network.load_state_dict(_state_dict(weights, self.device, _load_dict_keys(parser)))
        network.to(self.device).eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.network = network
        self.weights_path = weights

        self.inferer = parser.get_parsed_content("inferer")
        if self.spatial_dims == 2 and isinstance(self.inferer, SliceInferer):
            # A 2-D network that the bundle's inferer runs slice by slice: it takes the
            # series as one volume.
            self.spatial_dims = 3
        _run_requirements(parser)
        detector = getattr(self.inferer, "detector", None)
        # The detector's own output keys once its ops ran (MONAI's RetinaNetDetector).
        self._box_key = str(getattr(detector, "target_box_key", self._box_key))
        self._label_key = str(getattr(detector, "target_label_key", self._label_key))
        self._score_key = str(getattr(detector, "pred_score_key", self._score_key))
        self._prompted = _prompt_parameters(self.inferer, self.model_id)
        self.prompts = (
            tuple(self._requested_prompts)
            if self._requested_prompts is not None
            else tuple(label.value for label in self.labels)
        )
        parsed_pre = cast(Compose, parser.get_parsed_content("preprocessing"))
        parsed_post = cast(Compose, parser.get_parsed_content("postprocessing"))
        # The same transform objects but the loader, which reads the decoded series instead
        # of a file: Invertd finds the applied operations by transform id, and the bundle's
        # own Invertd keeps pointing at ``parsed_pre``.
        # Loader keys the node has no image for (ground truth, as renal CECT's `label`) are
        # left out: the bundle's file stays as it is.
        self.preprocessing = Compose(series_loaders(_flat(parsed_pre), leave_out_missing=True))
        self._array_input = any(isinstance(t, SeriesLoadImage) for t in _flat(self.preprocessing))
        post = [t for t in _flat(parsed_post) if not _writes_files(t)]
        _invert_what_ran(post, self.preprocessing)
        if self.task in (TaskKind.CLASSIFICATION, TaskKind.DETECTION):
            post = [t for t in post if not isinstance(t, _NOT_FOR_SCORES)]
        elif self.task is TaskKind.SEGMENTATION and not any(isinstance(t, Invertd) for t in post):
            # A bundle that saves on its own grid: bring the prediction back ourselves.
            post.append(
                Invertd(
                    keys=_PRED_KEY,
                    transform=parsed_pre,
                    orig_keys=self.image_key,
                    nearest_interp=True,
                )
            )
        # An evaluator that does not decollate hands its postprocessing the whole batch.
        self._decollate = parser.get("evaluator#decollate", True) is not False
        self._layout: str | None = None  # 2-D models: "image" or "stack", found on first use
        self.postprocessing = Compose(post)
        self._activated = any(isinstance(t, Activations | Activationsd) for t in post)
        amp = bool(parser.get("evaluator#amp", True))
        self.amp = amp and self.device.type == "cuda"  # mixed precision only on CUDA

    def _explainer(self, method: str, layer: str | None) -> Explainer | None:
        """The attribution maps asked for; a layer that is not the network's is a config
        error, said at load."""
        if method == "off":
            return None
        if self.task not in (TaskKind.CLASSIFICATION, TaskKind.DETECTION):
            logger.warning(
                "bundle %s: explain applies to classification and detection; a %s model "
                "gets no attribution map",
                self.model_id,
                self.task.value,
            )
            return None
        try:
            explainer = Explainer(method, layer)
            if method != "occlusion":
                explainer.target_layer(self.network)
        except ValueError as exc:
            raise ModelError(f"bundle {self.model_id}: {exc}") from exc
        return explainer

    def _weights_path(self, parser: ConfigParser) -> Path:
        """Where the config's checkpoint loader reads, else ``models/model.pt`` or the
        TorchScript ``models/model.ts``."""
        loader = _checkpoint_loader_id(parser)
        if loader is not None:
            named = [Path(str(parser.get_parsed_content(f"{loader}#load_path")))]
        elif "modelname" in parser:
            named = [self.bundle_dir / "models" / str(parser.get_parsed_content("modelname"))]
        else:
            named = []
        candidates = [*named, self.bundle_dir / "models" / "model.pt"]
        candidates.append(self.bundle_dir / "models" / "model.ts")
        for path in candidates:
            if path.is_file():
                return path
        raise ModelError(f"bundle {self.bundle_dir}: no weights at {candidates[0]}")

    def __call__(self, source: ModelInput) -> Findings:
        try:
            if isinstance(source, StudyInput):
                return self._segment_study(source)
            if isinstance(source, SeriesVolume) and self._multi_series:
                raise ModelError(
                    f"bundle {self.model_id} takes {self._input_channels} input channels "
                    "(several series of one study, such as MR sequences or contrast phases); "
                    "one series is not enough: a study rule with roles gives them"
                )
            if self.task is TaskKind.CLASSIFICATION:
                return self._classify(source)
            if self.task is TaskKind.LANDMARKS:
                return self._locate(source)
            if not isinstance(source, SeriesVolume):
                if self.task is TaskKind.SEGMENTATION and self.spatial_dims == 2:
                    return self._segment_images(source)
                if self.task is TaskKind.DETECTION and self.spatial_dims == 2:
                    return self._detect_images(source)
                raise ModelError(f"bundle {self.model_id} is a 3-D model; it needs a volume")
            if self.task is TaskKind.DETECTION:
                return self._detect(source)
            return self._segment(source)
        except (ModelError, InputError):
            raise
        except Exception as exc:
            what = "study" if isinstance(source, StudyInput) else "series"
            raise ModelError(
                f"bundle {self.model_id} failed on the {what}: {_reason(exc)}"
            ) from exc

    def _segment_study(self, study: StudyInput) -> SegmentationFindings:
        """The bundle on a study's series (on the reference grid): channels mode gives its
        image key the images in role order (a missing optional role as zeros), which its
        own loader stacks; keys mode gives each image under its role name. The labels lie
        on the reference series' frames."""
        if self.task is not TaskKind.SEGMENTATION or self.spatial_dims != 3:
            raise ModelError(
                f"bundle {self.model_id} is a {self.spatial_dims}-D {self.task.value} model; "
                "study jobs give 3-D segmentations only"
            )
        reference = study.reference
        pred = self._label_image(self._study_input(study), (1, *reference.image.shape[1:]))
        label_map = reference.frames_from_volume(pred)
        del pred
        return self._segmentation(label_map, reference.sop_instance_uids, reference.frame_numbers)

    def _study_input(self, study: StudyInput) -> Any:
        """What the bundle's loader gets for ``study`` (see :meth:`_segment_study`)."""
        if study.mode == "channels":
            if len(study.images) != self._input_channels:
                raise ModelError(
                    f"bundle {self.model_id} takes {self._input_channels} input channel(s); "
                    f"the study rule gives {len(study.images)} roles "
                    f"({', '.join(study.roles)})"
                )
            reference = study.reference.image
            return [
                image if image is not None else _zeros_like(reference, role)
                for role, image in study.images
            ]
        if self._array_input:
            raise ModelError(
                f"bundle {self.model_id} loads one image (LoadImage), not keys; its study "
                "rule must give the roles as channels"
            )
        keys = {
            str(k)
            for t in _flat(self.preprocessing)
            if isinstance(t, SeriesLoadImaged)
            for k in t.keys
        }
        unknown = [role for role in study.roles if role not in keys]
        if unknown:
            raise ModelError(
                f"bundle {self.model_id}: role(s) {', '.join(unknown)} are not keys its "
                f"loader reads ({', '.join(sorted(keys))})"
            )
        return {role: image for role, image in study.images if image is not None}

    def _segment(self, volume: SeriesVolume) -> SegmentationFindings:
        pred = self.predict(volume)
        label_map = volume.frames_from_volume(pred)
        del pred
        return self._segmentation(label_map, volume.sop_instance_uids, volume.frame_numbers)

    def _segment_images(self, images: Sequence[PlanarImage]) -> SegmentationFindings:
        """A 2-D segmentation network on each image: one mask plane per source image."""

        def labels(image: MetaTensor) -> npt.NDArray[np.float64]:
            pred = self._label_image(image, tuple(image.shape))
            return np.asarray(pred[0].numpy(), dtype=np.float64)  # (columns, rows)

        planes = [values.T for values, _ in self._planar(images, labels)]  # (rows, columns)
        label_map = np.ascontiguousarray(np.stack(planes)).astype(np.uint16)
        uids = tuple(image.sop_instance_uid for image in images)
        return self._segmentation(label_map, uids, None)

    def _segmentation(
        self,
        label_map: npt.NDArray[np.uint16],
        uids: tuple[str, ...],
        frame_numbers: tuple[int, ...] | None,
    ) -> SegmentationFindings:
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
            source_sop_instance_uids=uids,
            source_frame_numbers=frame_numbers,
        )

    def _classify(self, source: SeriesVolume | tuple[PlanarImage, ...]) -> ClassificationFindings:
        if self.spatial_dims == 2:
            if isinstance(source, SeriesVolume):
                raise ModelError(f"bundle {self.model_id} is a 2-D model; it needs 2-D images")
            outputs = self._planar(source, self._probabilities)
        else:
            if not isinstance(source, SeriesVolume):
                raise ModelError(f"bundle {self.model_id} is a 3-D model; it needs a volume")
            outputs = [(self._probabilities(source.image), source.sop_instance_uids)]
            frames: tuple[int, ...] | None = source.frame_numbers
        results = []
        for probabilities, uids in outputs:
            if len(probabilities) != len(self.labels):
                raise ModelError(
                    f"bundle {self.model_id} gave {len(probabilities)} scores for "
                    f"{len(self.labels)} classes in its channel_def"
                )
            scores = tuple(
                ClassScore(label.name, float(p))
                for label, p in zip(self.labels, probabilities, strict=True)
            )
            results.append(
                ImageClassification(scores, uids, frames if self.spatial_dims == 3 else None)
            )
        attributions = (
            self._explain_classes(self.explainer, source, outputs) if self.explainer else ()
        )
        return ClassificationFindings(
            tuple(results), self.algorithm, self.threshold, attributions=attributions
        )

    def _explain_classes(
        self,
        explainer: Explainer,
        source: SeriesVolume | tuple[PlanarImage, ...],
        outputs: Sequence[tuple[npt.NDArray[np.float64], tuple[str, ...]]],
    ) -> tuple[AttributionMap, ...]:
        """A map of the most probable class of each result: a 3-D model's series, each image
        of a 2-D model run image by image (a cine stacked into one input gets none)."""
        maps = []
        if isinstance(source, SeriesVolume):
            probabilities, uids = outputs[0]
            target = int(np.argmax(probabilities))
            values = self._source_map(explainer, source.image, target)
            if values is not None:
                frames = np.ascontiguousarray(values.transpose(2, 1, 0))  # (slices, rows, cols)
                name = self.labels[target].name
                maps.append(self._attribution(explainer, frames, uids, name, source.frame_numbers))
            return tuple(maps)
        if self._layout != "image":
            logger.info("bundle %s: no attribution map for a stacked (cine) input", self.model_id)
            return ()
        by_uid = {image.sop_instance_uid: image for image in source}
        for probabilities, uids in outputs:
            target = int(np.argmax(probabilities))
            values = self._source_map(explainer, self._channels(by_uid[uids[0]].image), target)
            if values is not None:
                plane = np.ascontiguousarray(values.T[np.newaxis])  # (1, rows, columns)
                name = self.labels[target].name
                maps.append(self._attribution(explainer, plane, uids, name, None))
        return tuple(maps)

    def _attribution(
        self,
        explainer: Explainer,
        values: npt.NDArray[np.float32],
        uids: tuple[str, ...],
        target: str,
        frame_numbers: tuple[int, ...] | None,
    ) -> AttributionMap:
        return AttributionMap(
            values=values,
            source_sop_instance_uids=uids,
            method=explainer.method,
            target=target,
            source_frame_numbers=frame_numbers,
        )

    def _source_map(
        self,
        explainer: Explainer,
        image: MetaTensor,
        target: int,
        *,
        data: Mapping[str, Any] | None = None,
        center: Sequence[float] | None = None,
    ) -> npt.NDArray[np.float32] | None:
        """The explainer's map of class ``target`` for ``image`` on the image's own grid
        (spatial axes as ``image``'s), scaled to 0..1; None, logged, when it cannot be made:
        the map is an extra, the findings go without it.

        ``data``: the bundle's preprocessing of ``image`` when at hand (a detector's), else it
        runs again (cheap beside the map); ``center``: a detector's box, in its voxels."""
        started = time.monotonic()
        try:
            prepared = data if data is not None else self._preprocess(image)
            preprocessed = prepared[self.image_key]
            values = explainer(self.network, preprocessed, target, center)
            inverted = self._to_source_grid(values, preprocessed)
        except Exception as exc:  # a network GradCAM cannot hook (TorchScript), memory...
            logger.warning(
                "bundle %s: no %s map: %s", self.model_id, explainer.method, _reason(exc)
            )
            return None
        array = np.asarray(inverted.detach().float().cpu().numpy()[0], dtype=np.float32)
        if array.shape != tuple(image.shape[1:]):
            logger.warning(
                "bundle %s: the %s map came back as %s, not the image grid %s",
                self.model_id,
                explainer.method,
                array.shape,
                tuple(image.shape[1:]),
            )
            return None
        np.clip(array, 0.0, None, out=array)
        peak = float(array.max()) if array.size else 0.0
        if peak > 0:
            array /= peak
        logger.info(
            "bundle %s: %s map in %.2f s",
            self.model_id,
            explainer.method,
            time.monotonic() - started,
        )
        return array

    def _to_source_grid(self, values: torch.Tensor, preprocessed: MetaTensor) -> torch.Tensor:
        """``values`` on the preprocessed grid -> the source grid: the inverse of the
        preprocessing's spatial transforms, as Invertd brings a segmentation back, with
        their own (not nearest) interpolation."""
        if self._array_input:
            pred = MetaTensor(
                values,
                meta=copy.deepcopy(preprocessed.meta),
                applied_operations=copy.deepcopy(preprocessed.applied_operations),
            )
            return cast(torch.Tensor, self.preprocessing.inverse(pred))  # type: ignore[no-untyped-call]
        invert = Invertd(
            keys=_MAP_KEY,
            transform=self.preprocessing,
            orig_keys=self.image_key,
            nearest_interp=False,
        )
        inverted = invert({_MAP_KEY: MetaTensor(values), self.image_key: preprocessed})
        return cast(torch.Tensor, inverted[_MAP_KEY])

    def _planar(
        self,
        images: Sequence[PlanarImage],
        run: Callable[[MetaTensor], npt.NDArray[np.float64]],
    ) -> list[tuple[npt.NDArray[np.float64], tuple[str, ...]]]:
        """Run a 2-D model on ``images``: each image on its own (``image`` layout), or the
        images stacked in time order as one input (``stack``: a cine, which the bundle's
        chain slices itself). The first layout the bundle's own chain accepts is kept.
        Returns the outputs per image with the image's SOP Instance UID."""
        layouts = [self._layout] if self._layout else ["image", "stack"]
        failure: Exception | None = None
        for layout in layouts:
            try:
                out: list[tuple[npt.NDArray[np.float64], tuple[str, ...]]]
                if layout == "image":
                    out = [(run(self._channels(i.image)), (i.sop_instance_uid,)) for i in images]
                else:
                    cine = cine_series(images)
                    stacked = run(cine.image)
                    per_image = stacked.reshape(len(cine.images), -1, *stacked.shape[1:])
                    if per_image.shape[1] == 1:
                        per_image = per_image[:, 0]
                    out = [
                        (values, (image.sop_instance_uid,))
                        for values, image in zip(per_image, cine.images, strict=True)
                    ]
            except ModelError:
                raise
            except Exception as exc:  # the chain refuses this layout (or the images are no
                failure = failure or exc  # cine: InputError): try the next, report the first
                continue
            self._layout = layout
            return out
        reason = _reason(failure) if failure else "no images"
        raise ModelError(f"bundle {self.model_id} failed on the images: {reason}")

    def _channels(self, image: MetaTensor) -> MetaTensor:
        """A grey image for a colour network: its channels equal, as the picture saved as
        RGB (the file the bundle's loader reads) would give."""
        if self._input_channels > 1 and image.shape[0] == 1:
            return with_channels(image, self._input_channels)
        return image

    def _locate(self, source: SeriesVolume | tuple[PlanarImage, ...]) -> LandmarkFindings:
        """Points per image: the output's last axis is the landmark, the one before it the
        coordinate along the network input's axes (the image's columns, then rows); mapped
        to patient space through each image's own geometry."""
        if isinstance(source, SeriesVolume):
            raise ModelError(f"bundle {self.model_id} locates points on 2-D images")

        def points(image: MetaTensor) -> npt.NDArray[np.float64]:
            data = self._run_network(image)
            data = self.postprocessing(data)
            return np.asarray(torch.as_tensor(data[_PRED_KEY]).detach().double().cpu().numpy())

        by_uid = {image.sop_instance_uid: image for image in source}
        landmarks = []
        for values, (uid,) in self._planar(source, points):
            coordinates = values.reshape(-1, values.shape[-1])[:2]  # (axis, landmark)
            header = by_uid[uid].header
            for index, (column, row) in enumerate(coordinates.T):
                landmarks.append(
                    Landmark(
                        name=self._landmark_names.get(index, f"landmark {index + 1}"),
                        position=image_point_to_patient(header, float(column), float(row)),
                        source_sop_instance_uid=uid,
                    )
                )
        frame_of_reference = str(source[0].header.get("FrameOfReferenceUID", "")) if source else ""
        if not frame_of_reference:
            raise InputError("the images have no Frame of Reference UID: points need one")
        return LandmarkFindings(
            landmarks=tuple(landmarks),
            algorithm=self.algorithm,
            source_sop_instance_uids=tuple(image.sop_instance_uid for image in source),
            frame_of_reference_uid=frame_of_reference,
        )

    def _probabilities(self, image: MetaTensor) -> npt.NDArray[np.float64]:
        data = self._run_network(image)
        data = self.postprocessing(data)
        pred = torch.as_tensor(data[_PRED_KEY]).detach().float().cpu().flatten()
        if not self._activated:
            # Logits. Multi-label (sigmoid) bundles say so with Activations(d) in their
            # postprocessing, as zoo bundles do; without one, one channel is a binary
            # sigmoid head and several are mutually exclusive classes.
            pred = torch.sigmoid(pred) if pred.numel() == 1 else torch.softmax(pred, dim=0)
        if pred.numel() and (pred.min() < 0 or pred.max() > 1 or not torch.isfinite(pred).all()):
            raise ModelError(
                f"bundle {self.model_id}: its postprocessing gives values outside 0..1 "
                f"({pred.min():.3g}..{pred.max():.3g}), not probabilities"
            )
        return np.asarray(pred.numpy(), dtype=np.float64)

    def _boxes(
        self, image: MetaTensor, dims: int
    ) -> tuple[dict[str, Any], torch.Tensor, list[int], list[float]]:
        """The detector's output for ``image``: (data, boxes (N, 2 * dims) in voxels of the
        preprocessed image, labels, scores), under the detector's keys."""
        data = self._run_network(image, keep_raw=True)
        raw = data[_PRED_KEY]
        if isinstance(raw, list | tuple):
            raw = raw[0]
        if not isinstance(raw, Mapping) or self._box_key not in raw:
            raise ModelError(
                f"bundle {self.model_id}: a detector must return a dict with "
                f"{self._box_key!r}, {self._label_key!r} and {self._score_key!r}"
            )
        boxes = torch.as_tensor(raw[self._box_key]).detach().double().cpu().reshape(-1, 2 * dims)
        count = boxes.shape[0]
        labels = torch.as_tensor(raw.get(self._label_key, torch.zeros(count))).cpu().flatten()
        scores = torch.as_tensor(raw.get(self._score_key, torch.ones(count))).cpu().flatten()
        return data, boxes, [int(v) for v in labels.tolist()], [float(v) for v in scores.tolist()]

    def _detect_images(self, images: Sequence[PlanarImage]) -> ImageDetectionFindings:
        """A 2-D detector on each image; boxes back in the image's own pixel coordinates
        (through the preprocessed image's affine and the inverse of the source's)."""
        names = {label.value: label.name for label in self.labels}
        detections = []
        for image in images:
            data, boxes, labels, scores = self._boxes(self._channels(image.image), 2)
            # 2-D affines (the loader gives the NIfTI's 4x4 one, the source is 3x3).
            to_space = to_affine_nd(2, np.asarray(data[self.image_key].affine, dtype=np.float64))
            from_space = np.linalg.inv(to_affine_nd(2, np.asarray(image.image.affine, np.float64)))
            to_source = (from_space @ to_space)[:2]  # (column, row) of the source image
            for box, label, score in zip(boxes.numpy(), labels, scores, strict=True):
                if score < self.threshold:
                    continue
                corners = to_source @ np.array([[box[0], box[2]], [box[1], box[3]], [1.0, 1.0]])
                low, high = corners.min(axis=1), corners.max(axis=1)
                if (high <= low).any():
                    logger.warning("bundle %s: empty box %s dropped", self.model_id, box.tolist())
                    continue
                detections.append(
                    ImageDetection(
                        names.get(label, "finding"),
                        score,
                        image.sop_instance_uid,
                        np.concatenate([low, high]),
                    )
                )
        return ImageDetectionFindings(
            detections=tuple(sorted(detections, key=lambda d: -d.score)),
            algorithm=self.algorithm,
            source_sop_instance_uids=tuple(image.sop_instance_uid for image in images),
        )

    def _detect(self, volume: SeriesVolume) -> DetectionFindings:
        data, boxes, labels, scores = self._boxes(volume.image, 3)
        names = {label.value: label.name for label in self.labels}
        attributions: tuple[AttributionMap, ...] = ()
        if self.explainer is not None and scores and max(scores) >= self.threshold:
            # The highest-scoring box, when it is a finding: a map beside a report that
            # says nothing was found would read as a finding.
            top = int(np.argmax(scores))
            center = ((boxes[top, :3] + boxes[top, 3:]) / 2).tolist()
            explainer = self.explainer
            values = self._source_map(
                explainer, volume.image, labels[top], data=data, center=center
            )
            if values is not None:
                frames = np.ascontiguousarray(values.transpose(2, 1, 0))
                attributions = (
                    self._attribution(
                        explainer,
                        frames,
                        volume.sop_instance_uids,
                        names.get(labels[top], "finding"),
                        volume.frame_numbers,
                    ),
                )
        affine = np.asarray(torch.as_tensor(data[self.image_key].affine), dtype=np.float64)
        # The series' row, column and slice directions in LPS.
        source_axes = (_LPS_FROM_RAS @ np.asarray(volume.image.affine, dtype=np.float64)[:3, :3]).T
        detections = []
        for box, label, score in zip(boxes.numpy(), labels, scores, strict=True):
            if score < self.threshold:
                continue
            low, high = box[:3], box[3:]
            if (high <= low).any():
                logger.warning("bundle %s: empty box %s dropped", self.model_id, box.tolist())
                continue
            # MONAI's box convention (AffineBoxToWorldCoordinated): corners go through the
            # image affine as they are, voxel i's centre at coordinate i.
            center = _LPS_FROM_RAS @ (affine[:3, :3] @ ((low + high) / 2) + affine[:3, 3])
            edges = (_LPS_FROM_RAS @ affine[:3, :3] @ np.diag(high - low)).T
            edges = edges[_along_source_axes(edges, source_axes)]
            detections.append(
                Detection(names.get(int(label), "finding"), float(score), center, edges)
            )
        return DetectionFindings(
            detections=tuple(sorted(detections, key=lambda d: -d.score)),
            algorithm=self.algorithm,
            source_sop_instance_uids=volume.sop_instance_uids,
            frame_of_reference_uid=str(volume.headers[0].get("FrameOfReferenceUID", "")),
            source_frame_numbers=volume.frame_numbers,
            attributions=attributions,
        )

    def _preprocess(self, image: MetaTensor | list[MetaTensor] | dict[str, Any]) -> dict[str, Any]:
        """The bundle's preprocessing of ``image`` (its loader reads the image, never
        writing it), with the prompts of a promptable bundle. A list of images is several
        channels; a dict holds the images under the bundle's own input keys."""
        if self._array_input:
            return {self.image_key: self.preprocessing(image)}
        extra = {_LABEL_PROMPT: list(self.prompts)} if self._prompted else {}
        data = image if isinstance(image, dict) else {self.image_key: image}
        return dict(self.preprocessing({**data, **extra}))

    def _infer(self, data: dict[str, Any]) -> Any:
        """The bundle's inferer on the preprocessed image as a batch of one; a promptable
        one gets the label prompts as class vector (after the bundle's own prompt
        transforms, duplicates dropped) and no points."""
        batch = data[self.image_key].unsqueeze(0).to(self.device)
        if not self._prompted:
            return self.inferer(batch, self.network)
        prompt = data.get(_LABEL_PROMPT)
        ids = list(dict.fromkeys(int(v) for v in torch.as_tensor(prompt).flatten().tolist()))
        if not ids:
            raise ModelError(f"bundle {self.model_id}: no label prompts to run")
        classes = torch.tensor(ids, device=self.device).unsqueeze(-1)
        data[_LABEL_PROMPT] = classes
        return self.inferer(
            batch, self.network, point_coords=None, point_labels=None, class_vector=classes
        )

    def network_forward(self, batch: torch.Tensor) -> Any:
        """The network alone on ``batch`` (a check's forward pass); a promptable network
        gets its first label prompt as class vector, as its inferer would pass it."""
        if self._prompted:
            classes = torch.tensor([[self.prompts[0]]], device=self.device)
            return self.network(batch, class_vector=classes)
        return self.network(batch)

    def _run_network(self, image: MetaTensor, *, keep_raw: bool = False) -> dict[str, Any]:
        """Preprocess ``image``, run the inferer; ``pred`` is the network's output for the
        one batch item (the batch when the bundle's evaluator does not decollate; raw when
        ``keep_raw``: a detector's dicts)."""
        with torch.no_grad():
            data = self._preprocess(image)
            output = self._infer(data)
        if keep_raw:
            data[_PRED_KEY] = output
            return data
        pred = output if not self._decollate else output[0]
        data[_PRED_KEY] = MetaTensor(pred) if isinstance(pred, torch.Tensor) else pred
        return data

    def predict(self, volume: SeriesVolume) -> torch.Tensor:
        """The bundle's label volume on the series grid, ``(1, columns, rows, slices)``."""
        return self._label_image(volume.image, tuple(volume.image.shape))

    def _label_image(
        self, image: MetaTensor | list[MetaTensor] | dict[str, Any], expected: tuple[int, ...]
    ) -> torch.Tensor:
        """The bundle's labels for ``image`` (or a study's images, see :meth:`_preprocess`),
        on its grid (``expected``: its shape)."""
        with torch.no_grad():
            data = self._preprocess(image)
            autocast = (
                torch.autocast(device_type="cuda", dtype=torch.float16)
                if self.amp
                else nullcontext()
            )
            with autocast:
                logits = self._infer(data)
            # A MetaTensor as MONAI's evaluators hand it on: Invertd after a transform that
            # returns plain tensors (VistaPostTransformd) needs one.
            pred = logits[0]
            data[_PRED_KEY] = (pred if isinstance(pred, MetaTensor) else MetaTensor(pred)).float()
            del logits, pred
            data = self.postprocessing(data)
            result = data[_PRED_KEY]
            if isinstance(result, MetaTensor):
                result = result.as_tensor()
            result = torch.as_tensor(result)
            if result.shape[0] > 1:  # not discrete yet: one channel per class
                result = torch.argmax(result, dim=0, keepdim=True)
        if tuple(result.shape) != expected:
            raise ModelError(
                f"bundle {self.model_id} returned {tuple(result.shape)}, not the image grid "
                f"{expected}; does its postprocessing invert the preprocessing?"
            )
        return result.cpu()


def _given_labels(labels: Sequence[tuple[int, str]], task: TaskKind) -> tuple[SegmentLabel, ...]:
    """The model config's labels, in value order; a segmentation's 0 is the background."""
    given = sorted((int(value), str(name)) for value, name in labels)
    if task is TaskKind.SEGMENTATION and any(value <= 0 for value, _ in given):
        raise ModelError("labels: a segmentation's label values start at 1 (0 is background)")
    if len({value for value, _ in given}) != len(given):
        raise ModelError("labels: a label value is given twice")
    return tuple(SegmentLabel(value, name) for value, name in given)


def _zeros_like(image: MetaTensor, role: str) -> MetaTensor:
    """A missing optional role's channel: no signal, on the reference grid."""
    meta = {**image.meta, "filename_or_obj": f"{role} (no series)"}
    return MetaTensor(torch.zeros_like(image.as_tensor()), meta=meta)  # the meta's affine


def read_bundle_labels(metadata: Mapping[str, Any]) -> tuple[SegmentLabel, ...]:
    """Labels from ``network_data_format.outputs.pred.channel_def`` (or ``label_def``),
    background dropped."""
    channel_def = _channel_def(metadata)
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


def _along_source_axes(
    edges: npt.NDArray[np.float64], source_axes: npt.NDArray[np.float64]
) -> list[int]:
    """The order of the box's edges that best follows the series' row, column and slice
    directions (preprocessing may have permuted and flipped the axes)."""
    unit = edges / np.linalg.norm(edges, axis=1, keepdims=True)
    axes = source_axes / np.linalg.norm(source_axes, axis=1, keepdims=True)
    alignment = np.abs(axes @ unit.T)  # [source axis, edge]
    best = max(permutations(range(3)), key=lambda p: sum(alignment[a, p[a]] for a in range(3)))
    return list(best)


def read_bundle_task(metadata: Mapping[str, Any]) -> TaskKind:
    """Segmentation, classification or detection, from ``outputs.pred`` type and format
    (neither given: segmentation)."""
    output = _pred_output(metadata)
    kind = str(output.get("type", "")).strip().lower()
    form = str(output.get("format", "")).strip().lower()
    if not kind and not form:
        return TaskKind.SEGMENTATION  # what bundles meant before the node knew other kinds
    if form in ("points", "point", "landmarks") or kind in ("tuples", "points"):
        return TaskKind.LANDMARKS
    shape = output.get("spatial_shape")
    if isinstance(shape, list) and len(shape) <= 2 and shape[:1] in ([1], [1.0]):
        return TaskKind.CLASSIFICATION  # a (1, classes) vector per image, not an image
    if form == "segmentation" or (kind == "image" and form in ("", "labels", "label")):
        return TaskKind.SEGMENTATION
    if kind in ("probabilities", "probability") or form in ("classes", "classification"):
        return TaskKind.CLASSIFICATION
    if kind in ("object", "box", "boxes") or form in ("box", "boxes", "bbox", "dict"):
        return TaskKind.DETECTION
    raise ModelError(
        f"bundle metadata outputs.pred (type {kind!r}, format {form!r}) names no task the "
        "node knows; set `task:` (segmentation, classification, detection, landmarks) in the "
        "model config"
    )


def read_bundle_classes(metadata: Mapping[str, Any], *, required: bool) -> tuple[SegmentLabel, ...]:
    """Every ``channel_def`` entry in channel order (a classifier's class 0 is a class too)."""
    channel_def = _channel_def(metadata)
    if not isinstance(channel_def, Mapping) or not channel_def:
        if required:
            raise ModelError(
                "bundle metadata has no network_data_format.outputs.pred.channel_def: "
                "the node needs the class names"
            )
        return ()
    try:
        classes = [SegmentLabel(int(key), str(name)) for key, name in channel_def.items()]
    except ValueError as exc:
        raise ModelError(f"channel_def has a key that is not a channel number: {exc}") from exc
    return tuple(sorted(classes, key=lambda label: label.value))


def _invert_what_ran(post: Sequence[Any], preprocessing: Compose) -> None:
    """Point each ``Invertd`` of the preprocessing at the transforms that ran. A bundle may
    hand Invertd a deep copy (vista3d: ``$copy.deepcopy(@preprocessing)``), whose transforms
    MONAI would not recognise as the ones applied (it matches them by object id; a copy only
    passes in a worker started by ``spawn`` as the default method)."""
    ran = [type(t) for t in _flat(preprocessing) if not isinstance(t, _SERIES_LOADERS)]
    for transform in post:
        if not isinstance(transform, Invertd) or not isinstance(transform.transform, Compose):
            continue
        kinds = [type(t) for t in _flat(transform.transform)]
        if [k for k in kinds if not _LOADER_TARGETS.search(k.__name__)] == ran:
            transform.transform = preprocessing


def _run_requirements(parser: ConfigParser) -> None:
    """What the bundle's evaluator requires to run first (``_requires_``: e.g. a detector's
    ``detector_ops``, which set its output keys, box selection and sliding window), as
    MONAI's runner evaluates it before the evaluator."""
    requires = parser.get("evaluator#_requires_")
    for item in requires if isinstance(requires, list) else [requires]:
        if isinstance(item, str) and item.startswith("@"):
            parser.get_parsed_content(item[1:])


def _writes_files(transform: Any) -> bool:
    return isinstance(transform, _SAVERS) or bool(_SAVER_NAME.search(type(transform).__name__))


def _prompt_parameters(inferer: Any, model_id: str) -> bool:
    """Whether the inferer is promptable: it requires MONAI's prompt arguments (points,
    point labels, class vector) besides the inputs and the network. Any other required
    argument is one the node cannot give."""
    try:
        parameters = list(inspect.signature(inferer.__call__).parameters.values())
    except (TypeError, ValueError):
        return False
    required = {
        p.name
        for p in parameters[2:]
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    unknown = required - _PROMPT_PARAMETERS
    if unknown:
        raise ModelError(
            f"bundle {model_id}: its inferer needs {', '.join(sorted(unknown))}, "
            "which the node cannot give"
        )
    return "class_vector" in required


def _input_channels(metadata: Mapping[str, Any]) -> int:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    first: Any = next(iter(inputs.values()), {}) if isinstance(inputs, Mapping) else {}
    try:
        return int(first.get("num_channels", 1)) if isinstance(first, Mapping) else 1
    except (TypeError, ValueError):
        return 1


def _landmark_names(metadata: Mapping[str, Any]) -> dict[int, str]:
    """Landmark names by output index: the metadata's ``coordinate_meanings`` (as zoo
    landmark bundles write them), if any."""
    meanings = metadata.get("coordinate_meanings")
    if not isinstance(meanings, Mapping):
        return {}
    names = {}
    for key, name in meanings.items():
        try:
            names[int(key)] = str(name)
        except ValueError:
            continue
    return names


def image_point_to_patient(header: Any, column: float, row: float) -> npt.NDArray[np.float64]:
    """Patient coordinates (LPS, mm) of the point at (column, row) pixel indices of an image
    with Image Position / Orientation (Patient) and Pixel Spacing."""
    try:
        position = np.asarray([float(v) for v in header.ImagePositionPatient], dtype=np.float64)
        orientation = np.asarray(
            [float(v) for v in header.ImageOrientationPatient], dtype=np.float64
        )
        spacing = [float(v) for v in header.PixelSpacing]  # row spacing, column spacing
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"the image has no usable patient geometry for points: {exc}") from exc
    along_row, along_column = orientation[:3], orientation[3:]
    return position + column * spacing[1] * along_row + row * spacing[0] * along_column


def _channel_def(metadata: Mapping[str, Any]) -> Any:
    output = _pred_output(metadata)
    return output.get("channel_def") or output.get("label_def")


def _pred_output(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output: Any = outputs.get(_PRED_KEY) or next(iter(outputs.values()), {})
    return output if isinstance(output, Mapping) else {}


def _spatial_dims(metadata: Mapping[str, Any]) -> int:
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    first: Any = next(iter(inputs.values()), {}) if isinstance(inputs, Mapping) else {}
    shape = first.get("spatial_shape") if isinstance(first, Mapping) else None
    return 2 if isinstance(shape, list) and len(shape) == 2 else 3


def _flat(compose: Compose) -> list[Any]:
    """The transforms of ``compose`` with nested plain Composes inlined (MONAI's rules)."""
    flat = compose.flatten()  # type: ignore[no-untyped-call]
    return list(flat.transforms)


def _state_dict(
    path: Path, device: torch.device, keys: Sequence[str] = ()
) -> Mapping[str, torch.Tensor]:
    """Weights as the zoo stores them: a bare state dict, or one under the checkpoint
    loader's ``load_dict`` key, "model" or "state_dict"."""
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read weights {path}: {exc}") from exc
    if isinstance(loaded, Mapping):
        for key in (*keys, "model", "state_dict"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping):
                return cast(Mapping[str, torch.Tensor], inner)
        return cast(Mapping[str, torch.Tensor], loaded)
    raise ModelError(f"weights {path} hold a {type(loaded).__name__}, not a state dict")


_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def _first_file(directory: Path, stem: str) -> Path:
    for suffix in _CONFIG_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise ModelError(f"bundle {directory.parent}: missing configs/{stem}.json (or .yaml)")


def bundle_config_files(bundle_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """The config files to merge: ``names`` under ``configs/`` in order, or the bundle's
    ``inference.json`` / ``inference.yaml``."""
    configs = Path(bundle_dir) / "configs"
    if not names:
        return [_first_file(configs, "inference")]
    files = [configs / name for name in names]
    for path in files:
        if not path.is_file():
            raise ModelError(f"bundle {bundle_dir}: missing configs/{path.name}")
    return files


def read_bundle_metadata(bundle_dir: Path) -> dict[str, Any]:
    """``configs/metadata.json`` (or YAML) as a dict."""
    path = _first_file(Path(bundle_dir) / "configs", "metadata")
    try:
        metadata = ConfigParser.load_config_file(path)
    except Exception as exc:  # json, yaml and OS errors alike
        raise ModelError(f"bundle {bundle_dir}: unreadable {path.name}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelError(f"bundle {bundle_dir}: {path.name} is not a mapping")
    return metadata


# A CUDA device named in a config expression or value: the zoo writes ``torch.device('cuda')``
# (DiNTS' architecture file and search space) and ``"cuda:0"``.
_CUDA_EXPRESSION = re.compile(r"""torch\.device\(\s*(['"])cuda(:\d+)?\1\s*\)""")
_CUDA_VALUE = re.compile(r"cuda(:\d+)?")


def _run_cuda_on(parser: ConfigParser, device: torch.device) -> None:
    """Point every CUDA device the config names at ``device``, in memory: a config that asks
    for CUDA runs on a machine without one. Expressions that choose CUDA only when it is
    available stay as they are."""
    replacement = f"torch.device('{device}')"
    for id_, value in list(_walk(parser.get(), "")):
        if not isinstance(value, str):
            continue
        if value.startswith("$") and _CUDA_EXPRESSION.search(value):
            parser[id_] = _CUDA_EXPRESSION.sub(replacement, value)
        elif _CUDA_VALUE.fullmatch(value):
            parser[id_] = str(device)


_LOADER_TARGETS = re.compile(r"(^|\.)LoadImaged?$")


def _drop_file_readers(parser: ConfigParser) -> None:
    """The node feeds decoded series, so a file loader's ``reader`` (ITK, NIfTI, ...) is
    never used; dropped in memory so a reader package the node lacks does not stop it."""
    for id_, value in list(_walk(parser.get(), "")):
        if (
            isinstance(value, Mapping)
            and _LOADER_TARGETS.search(str(value.get("_target_", "")))
            and "reader" in value
        ):
            parser[id_] = {k: v for k, v in value.items() if k != "reader"}


def _reason(exc: BaseException) -> str:
    """The error under MONAI's wrappers ("applying transform <...>"), which name only the
    transform that failed, as "TransformName: error"."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__
    wrappers = [e for e in seen if str(e).startswith("applying transform")]
    if not wrappers:
        return str(exc) or type(exc).__name__
    root = next((e for e in reversed(seen) if e not in wrappers and str(e)), exc)
    where = re.search(r"([\w.]+) object at", str(wrappers[-1]))
    name = where.group(1) if where else ""
    return f"{name.rsplit('.', 1)[-1]}: {root}" if name else str(root)


def _no_pretrained_download(parser: ConfigParser) -> None:
    """``pretrained: true`` in the network definition would download ImageNet weights at
    construction (torchvision backbones); the bundle's own checkpoint replaces them anyway,
    and the node never downloads at run time."""
    for id_, value in list(_walk(parser.get("network_def"), "network_def")):
        if isinstance(value, Mapping) and value.get("pretrained") is True:
            parser[f"{id_}#pretrained"] = False


def _walk(value: Any, id_: str) -> Iterator[tuple[str, Any]]:
    """Every (config id, raw value) under ``value``, parents before children."""
    yield id_, value
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        yield from _walk(item, f"{id_}#{key}" if id_ else str(key))


@contextmanager
def _numpy_in_checkpoints() -> Iterator[None]:
    """Let ``torch.load``'s safe (weights-only) unpickler read numpy arrays, as a DiNTS
    architecture file holds them; no other globals are allowed."""
    core: Any = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1 (bundle envs)
    reconstruct = core.multiarray._reconstruct
    # Files written under numpy 1 name numpy.core, under numpy 2 numpy._core.
    allowed: list[Any] = [np.ndarray, np.dtype, reconstruct]
    allowed += [(reconstruct, f"numpy.{m}.multiarray._reconstruct") for m in ("core", "_core")]
    allowed += [type(np.dtype(t)) for t in (np.float32, np.float64, np.int32, np.int64, np.bool_)]
    with torch.serialization.safe_globals(allowed):
        yield


def _checkpoint_loader_id(parser: ConfigParser) -> str | None:
    """The config id of the bundle's ``CheckpointLoader``: ``checkpointloader`` or one of
    the ``handlers``, as MONAI's evaluator would run it."""
    if "checkpointloader#load_path" in parser:
        return "checkpointloader"
    handlers = parser.get("handlers")
    if isinstance(handlers, list):
        for index, handler in enumerate(handlers):
            target = str(handler.get("_target_", "")) if isinstance(handler, Mapping) else ""
            disabled = handler.get("_disabled_") if isinstance(handler, Mapping) else None
            if target.endswith("CheckpointLoader") and "load_path" in handler:
                if disabled is True or (
                    isinstance(disabled, str) and disabled.strip().lower() == "true"
                ):
                    continue
                return f"handlers#{index}"
    return None


def _load_dict_keys(parser: ConfigParser) -> tuple[str, ...]:
    """The keys of the checkpoint loader's ``load_dict`` (a checkpoint saved by MONAI's
    CheckpointSaver holds the weights under them)."""
    loader = _checkpoint_loader_id(parser)
    load_dict = parser.get(f"{loader}#load_dict") if loader else None
    return tuple(str(k) for k in load_dict) if isinstance(load_dict, Mapping) else ()

"""The MONAI model zoo's radiology bundles as a download leaves them, with seeded weights.

The shared bundles (``shared/monai-bundles``) carry configs and scripts but no weights.
:func:`make_zoo_bundle` copies one, configs untouched, and adds only what a download adds:
the weights file the config loads (``torch.manual_seed(0)`` then ``network_def`` as the
config builds it, saved as the bare state dict the zoo ships) and, for DiNTS bundles, the
architecture file (``arch_ckpt_path``). Bundles whose network does not build with this
interpreter's MONAI/torch get ``python=``: the weights are then written by that interpreter.

The synthetic inputs follow each bundle's ``metadata.json`` (modality, channels, spatial
shape): a small CT volume, an MR volume, an MR cine long-axis series for 2-D MR models, a
mammogram for 2-D mammography models. :func:`zoo_series` picks one and writes it as DICOM.

This module imports only the standard library at the top: the weight writer
(:func:`write_weights`) runs unchanged under another interpreter through
``runpy.run_path``, which needs nothing of this checkout but torch, MONAI and numpy there.

Use from a test::

    from tests.zoo import make_zoo_bundle, zoo_series

    bundle = make_zoo_bundle("spleen_ct_segmentation", tmp_path)
    paths = zoo_series(bundle, tmp_path / "input", series_description="zoo spleen")
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MULTI_SERIES_BUNDLES",
    "TORCHVISION_BUNDLES",
    "ZOO",
    "ZooInput",
    "make_zoo_bundle",
    "needs_torchvision",
    "torchvision_loads",
    "weights_path",
    "write_weights",
    "zoo_input",
    "zoo_series",
]

# The thirteen radiology bundles of shared/monai-bundles (README.md there).
ZOO = (
    "spleen_ct_segmentation",
    "wholeBody_ct_segmentation",
    "multi_organ_segmentation",
    "pancreas_ct_dints_segmentation",
    "pediatric_abdominal_ct_segmentation",
    "renalStructures_UNEST_segmentation",
    "renalStructures_CECT_segmentation",
    "swin_unetr_btcv_segmentation",
    "vista3d",
    "brats_mri_segmentation",
    "lung_nodule_ct_detection",
    "breast_density_classification",
    "valve_landmarks",
)
# Read from the bundles by needs_torchvision / channel count; named here for parametrize.
TORCHVISION_BUNDLES = ("breast_density_classification", "lung_nodule_ct_detection")
MULTI_SERIES_BUNDLES = ("brats_mri_segmentation", "renalStructures_CECT_segmentation")

_REPO = Path(__file__).resolve().parent.parent
_SEED = 0


def config_file(bundle: Path) -> Path:
    """The bundle's inference config: ``configs/inference.json`` or ``.yaml``."""
    for suffix in ("json", "yaml", "yml"):
        path = Path(bundle) / "configs" / f"inference.{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{bundle}: no configs/inference.json or inference.yaml")


def metadata(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(bundle) / "configs" / "metadata.json").read_text())
    return data


def needs_torchvision(bundle: Path) -> bool:
    """Whether the bundle's network is torchvision's (its config or scripts use it), or
    MONAI's detection networks, which import torchvision."""
    texts = [config_file(bundle).read_text()]
    texts += [p.read_text(errors="replace") for p in (Path(bundle) / "scripts").rglob("*.py")]
    words = ("torchvision", "TorchVisionFCModel", "RetinaNet")
    return any(word in text for text in texts for word in words)


def make_zoo_bundle(name: str, directory: Path, *, python: str | None = None) -> Path:
    """Copy the shared bundle ``name`` into ``directory / name`` and write its weights
    (and DiNTS' architecture file), seeded; ``python`` writes them under that interpreter.

    Raises RuntimeError when the network cannot be built here (torchvision bundles without
    ``python``), naming why.
    """
    from tests.bundles import shared_bundle  # pytest and torch: this interpreter only

    target = Path(directory) / name
    shutil.copytree(shared_bundle(name), target, dirs_exist_ok=True)
    if python is None:
        if needs_torchvision(target) and not torchvision_loads():
            raise RuntimeError(
                f"{name}: its network needs torchvision, which does not load with this "
                f"interpreter ({sys.executable}); pass python= an environment where it does"
            )
        write_weights(target)
        return target
    completed = subprocess.run(
        [
            python,
            "-c",
            "import runpy, sys; runpy.run_path(sys.argv[1])['write_weights'](sys.argv[2])",
            __file__,
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{name}: writing weights with {python} failed:\n{completed.stdout}{completed.stderr}"
        )
    return target


def torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or built for another torch
        return False
    return True


# -- the weight writer: torch, MONAI, numpy, stdlib only (runs under other interpreters) ----


def _parser(bundle: Path) -> Any:
    """The bundle's inference config as MONAI's runner parses it, bundle root set, on CPU."""
    from monai.bundle import ConfigParser

    root = str(Path(bundle).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)  # the configs import scripts.*, as MONAI's runner allows
    for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[module]  # another bundle's scripts package, imported before
    parser = ConfigParser()
    parser.read_config(str(config_file(bundle)))
    parser.read_meta(str(Path(bundle) / "configs" / "metadata.json"))
    parser["bundle_root"] = root
    # Writing weights needs no GPU: ids that name cuda are pointed at the CPU in memory.
    parser["device"] = "$torch.device('cpu')"
    if "arch_ckpt" in parser:
        parser["arch_ckpt"] = "$torch.load(@arch_ckpt_path, map_location='cpu', weights_only=False)"
    if "dints_space#device" in parser:
        parser["dints_space#device"] = "$torch.device('cpu')"
    if "network_def#pretrained" in parser:
        parser["network_def#pretrained"] = False  # no ImageNet download in tests
    return parser


def weights_path(bundle: Path, parser: Any = None) -> Path:
    """Where the config loads its weights from: ``checkpointloader#load_path``, else the
    ``load_path`` of a ``CheckpointLoader`` among ``handlers``, else ``models/model.pt``."""
    parser = parser if parser is not None else _parser(bundle)
    if "checkpointloader#load_path" in parser:
        return Path(str(parser.get_parsed_content("checkpointloader#load_path")))
    for section in ("handlers", "validate#handlers", "evaluator#val_handlers"):
        if section not in parser:
            continue
        handlers = parser[section]
        if not isinstance(handlers, list):
            continue
        for index, handler in enumerate(handlers):
            target = str(handler.get("_target_", "")) if isinstance(handler, dict) else ""
            if target.split(".")[-1] == "CheckpointLoader" and "load_path" in handler:
                return Path(str(parser.get_parsed_content(f"{section}#{index}#load_path")))
    return Path(bundle) / "models" / "model.pt"


def _write_architecture(bundle: Path, parser: Any) -> None:
    """DiNTS' searched architecture as a download ships it: ``torch.save`` of a dict of
    numpy arrays ``node_a``, ``arch_code_a``, ``arch_code_c``, seeded, of the config's shape.

    The two finest resolutions are active (the coarser ones stay off, as a searched
    topology often leaves them, which keeps a CPU window short); in each block each active
    node takes one incoming path from an active node, and each path a random cell operation.
    """
    import numpy as np
    import torch

    path = Path(str(parser.get_parsed_content("arch_ckpt_path")))
    space = parser.get("dints_space")
    blocks, depths = int(space["num_blocks"]), int(space["num_depths"])
    # MONAI's TopologyConstruction: path i runs from node starts[i] to node ends[i].
    count = 3 * depths - 2
    starts = [(i + 1) // 3 - 1 + (i + 1) % 3 for i in range(count)]
    ends = [m for m in range(depths) for _ in range(3)][1:-1]
    active = {0, 1}
    rng = np.random.default_rng(_SEED)
    arch_code_a = np.zeros((blocks, count), dtype=np.float32)
    for block in range(blocks):
        for node in sorted(active):
            paths = [i for i in range(count) if ends[i] == node and starts[i] in active]
            arch_code_a[block, rng.choice(paths)] = 1
    node_a = np.zeros((blocks + 1, depths), dtype=np.float64)
    node_a[:, sorted(active)] = 1
    architecture = {
        "node_a": node_a,
        "arch_code_a": arch_code_a,
        "arch_code_c": rng.integers(0, 5, size=(blocks, count)).astype(np.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(architecture, path)


def write_weights(bundle: str | Path) -> Path:
    """Seeded random weights of ``network_def`` at the path the config loads them from
    (a bare state dict: what CheckpointLoader's single ``model`` key loads, as shipped)."""
    import torch

    bundle = Path(bundle)
    parser = _parser(bundle)
    if "arch_ckpt_path" in parser:
        _write_architecture(bundle, parser)
    torch.manual_seed(_SEED)
    network = parser.get_parsed_content("network_def")
    path = weights_path(bundle, parser)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


# -- synthetic inputs, per the bundle's metadata ----------------------------------------------


@dataclass(frozen=True)
class ZooInput:
    """What a bundle's first input asks for, read from its metadata."""

    modality: str  # DICOM Modality: CT, MR, MG
    channels: int
    spatial_dims: int


_MODALITIES = {"ct": "CT", "mr": "MR", "mri": "MR", "mammogram": "MG", "mammography": "MG"}


def zoo_input(bundle: Path) -> ZooInput:
    inputs = metadata(bundle)["network_data_format"]["inputs"]
    image = inputs.get("image") or next(iter(inputs.values()))
    modality = _MODALITIES.get(str(image.get("modality", "CT")).lower(), "CT")
    return ZooInput(
        modality=modality,
        channels=int(image.get("num_channels", 1)),
        spatial_dims=len(image.get("spatial_shape", [0, 0, 0])),
    )


def zoo_series(
    bundle: Path, directory: Path, *, series_description: str, seed: int = 1
) -> list[Path]:
    """A small synthetic series the bundle can take (one series: a multi-channel bundle
    gets one channel's worth), written as DICOM files into ``directory``."""
    wanted = zoo_input(bundle)
    if wanted.modality == "MG":
        return [mammogram(directory, series_description=series_description, seed=seed)]
    if wanted.modality == "MR" and wanted.spatial_dims == 2:
        return mr_cine(directory, series_description=series_description, seed=seed)
    if wanted.modality == "MR":
        return mr_volume(directory, series_description=series_description, seed=seed)
    return small_ct(directory, series_description=series_description, seed=seed)


def small_ct(directory: Path, *, series_description: str, seed: int = 1) -> list[Path]:
    """48 x 48 x 24 phantom CT, 2 mm pixels, 3 mm slices: 96 x 96 x 72 mm, so one sliding
    window (96^3 at the zoo's 1-1.5 mm) covers it."""
    from dicom_ai.synthetic import PhantomSpec, write_phantom_ct

    spec = PhantomSpec(
        slices=24,
        rows=48,
        columns=48,
        pixel_spacing_mm=2.0,
        slice_thickness_mm=3.0,
        series_description=series_description,
        seed=seed,
    )
    return write_phantom_ct(Path(directory), spec)


def _base(modality: str, sop_class: str, series_description: str, seed: int) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["zoo study", modality, str(seed)])
    ds.SeriesInstanceUID = generate_uid(
        entropy_srcs=["zoo series", modality, series_description, str(seed)]
    )
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["zoo frame", modality, str(seed)])
    ds.Modality = modality
    ds.PatientName = "ZOO^SYNTHETIC"
    ds.PatientID = "ZOO-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "100000"
    ds.AccessionNumber = "ACC-ZOO"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.Manufacturer = "dicom-ai test"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _save(ds: Any, directory: Path, number: int) -> Path:
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = generate_uid(
        entropy_srcs=[str(ds.SeriesInstanceUID), "instance", str(number)]
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{number:04d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def _mr_header(ds: Any) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "SS"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTrainLength = 1
    ds.RepetitionTime = 3.0
    ds.EchoTime = 1.5
    ds.MagneticFieldStrength = 1.5
    ds.PatientPosition = "HFS"


def mr_cine(
    directory: Path,
    *,
    series_description: str,
    seed: int = 1,
    size: int = 256,
    phases: int = 4,
) -> list[Path]:
    """An MR cine long-axis series: one oblique plane, ``phases`` temporal positions of
    ``size`` x ``size`` images (a bright ventricle that beats)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ds = _base("MR", MR_IMAGE_STORAGE, series_description, seed)
    _mr_header(ds)
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [1.4, 1.4]
    ds.SliceThickness = 8.0
    # A four-chamber-like oblique plane (rows and columns orthonormal).
    ds.ImageOrientationPatient = [0.8, -0.6, 0.0, 0.36, 0.48, -0.8]
    ds.ImagePositionPatient = [-150.0, 20.0, 120.0]
    ds.SliceLocation = 0.0
    ds.NumberOfTemporalPositions = phases
    ds.CardiacNumberOfImages = phases
    y, x = np.mgrid[0:size, 0:size]
    paths = []
    for phase in range(phases):
        radius = size * (0.22 - 0.03 * np.sin(np.pi * phase / phases))
        image = np.full((size, size), 80.0)
        image[(y - size / 2) ** 2 + (x - size / 2) ** 2 < radius**2] = 900.0
        image += rng.normal(0, 15, image.shape)
        ds.TemporalPositionIdentifier = phase + 1
        ds.TriggerTime = 40.0 * phase
        ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
        paths.append(_save(ds, Path(directory), phase + 1))
    return paths


def mr_volume(directory: Path, *, series_description: str, seed: int = 1) -> list[Path]:
    """A small axial MR volume (48 x 48 x 24 at 3 mm) with a bright ellipsoid."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ds = _base("MR", MR_IMAGE_STORAGE, series_description, seed)
    _mr_header(ds)
    ds.MRAcquisitionType = "3D"
    size, slices, spacing = 48, 24, 3.0
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = spacing
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    z, y, x = np.mgrid[0:slices, 0:size, 0:size]
    head = ((x - 24) / 20) ** 2 + ((y - 24) / 22) ** 2 + ((z - 12) / 11) ** 2 < 1
    lesion = ((x - 30) / 5) ** 2 + ((y - 20) / 5) ** 2 + ((z - 12) / 3) ** 2 < 1
    volume = np.where(head, 500.0, 10.0) + np.where(lesion, 700.0, 0.0)
    volume += rng.normal(0, 10, volume.shape)
    paths = []
    for k in range(slices):
        ds.ImagePositionPatient = [-72.0, -72.0, -36.0 + k * spacing]
        ds.SliceLocation = -36.0 + k * spacing
        ds.PixelData = np.clip(volume[k], 0, 4095).astype(np.uint16).tobytes()
        paths.append(_save(ds, Path(directory), k + 1))
    return paths


def mammogram(directory: Path, *, series_description: str, seed: int = 1) -> Path:
    """One Digital Mammography X-Ray Image - For Presentation (MONOCHROME2, 320 x 256)."""
    import numpy as np

    rows, columns = 320, 256
    rng = np.random.default_rng(seed)
    ds = _base("MG", MG_FOR_PRESENTATION, series_description, seed)
    del ds.FrameOfReferenceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = rows, columns
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelSpacing = [0.5, 0.5]
    ds.BodyPartExamined = "BREAST"
    ds.Laterality = "L"
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.PatientOrientation = ["A", "R"]
    ds.DetectorType = "DIRECT"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.BreastImplantPresent = "NO"
    ds.OrganExposed = "BREAST"
    y, x = np.mgrid[0:rows, 0:columns]
    breast = ((x / (0.8 * columns)) ** 2 + ((y - rows / 2) / (0.45 * rows)) ** 2) < 1
    image = np.where(breast, 1800.0, 100.0)
    image += np.where(breast, rng.normal(0, 200, image.shape), rng.normal(0, 5, image.shape))
    ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
    return _save(ds, Path(directory), 1)

"""One job: load -> infer -> encode, in a worker process.

Models run in spawned worker processes, never in the node's process or an association
thread: a model that crashes kills only its worker, and one that hangs past its timeout is
killed. Either way the job fails with a reason and a fresh worker takes the slot.

A job may name another interpreter (`JobSpec.python`: a bundle's prepared environment, see
`inference/environment.py`); its worker is spawned with that interpreter, and an idle
worker on another interpreter is replaced for it.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import importlib
import json
import logging
import multiprocessing
import multiprocessing.spawn
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from pydicom.dataset import Dataset

    from dicom_ai.inference.arena import PrefetchArena
    from dicom_ai.inference.findings import (
        ClassificationFindings,
        DetectionFindings,
        Findings,
        ImageDetectionFindings,
        LandmarkFindings,
        SegmentationFindings,
    )
    from dicom_ai.inference.model import Model
    from dicom_ai.inference.planar import PlanarImage
    from dicom_ai.results import DeviceIdentity, ResultUIDs

__all__ = ["JobOutcome", "JobSpec", "Prefetch", "RoleInput", "WorkerPool", "run_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoleInput:
    """One role of a study job: the series chosen for it, or none (an optional role that
    did not come; ``series_instance_uid`` None and no paths)."""

    role: str
    series_instance_uid: str | None
    instance_paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs; plain data so it pickles into a spawned process.

    A study job (a rule with roles, see routing/rules.py) has ``roles`` in the rule's
    order; ``series_instance_uid`` and ``instance_paths`` are then the reference role's,
    and ``result_key`` is what its result UIDs derive from (the study, not a series).
    """

    job_id: int
    series_instance_uid: str
    model_id: str
    bundle: Path | None
    device: str
    timeout_seconds: float
    instance_paths: tuple[Path, ...]
    results_dir: Path
    device_serial_number: str
    min_free_bytes: int = 0
    task: str | None = None  # None: the model (bundle metadata) says
    threshold: float = 0.5
    preview: bool = False  # a Secondary Capture preview of a segmentation too
    # The interpreter the job's worker runs (a bundle's prepared environment); None: the
    # node's own.
    python: Path | None = None
    config_files: tuple[str, ...] = ()  # a bundle's configs to merge; () = its inference config
    prompts: tuple[int, ...] | None = None  # a promptable bundle's label prompts; None = all
    # The model config's label names (value, name), over the bundle metadata's; None: its.
    labels: tuple[tuple[int, str], ...] | None = None
    roles: tuple[RoleInput, ...] = ()  # a study job's roles; (): a series job
    reference_role: str | None = None  # the role whose grid the others are resampled onto
    # "channels": the roles' images stacked as channels in role order; "keys": each role's
    # image under its role name as a key of the bundle's input dict.
    role_input: str = "channels"
    result_key: str | None = None  # what result UIDs derive from; None: the series UID
    card: bool = False  # a result card too (results/card.py)
    card_pdf: bool = False  # and the same card as an Encapsulated PDF
    card_disclaimer: str = ""
    # Classification and detection: an attribution map (ModelConfig.explain); "off": none.
    explain: str = "off"
    explain_layer: str | None = None


@dataclass(frozen=True)
class Prefetch:
    """Instances of a series still arriving: read and decode them before its job comes, so
    the job does not start with a second of reading. Answered with nothing. (``models``:
    what its rules run, for a cluster's replicas of them.)"""

    series_instance_uid: str
    instance_paths: tuple[Path, ...]
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    ok: bool
    files: tuple[Path, ...] = ()
    reason: str = ""
    seconds: float = 0.0
    # The worker died under the job (crash, kill): worth another attempt, unlike an error
    # the model raised or a timeout, which would only repeat.
    retry: bool = False
    # Seconds per stage: load (model, when not warm, and series), infer, encode (and write).
    stages: tuple[tuple[str, float], ...] = ()
    # The Ray cluster node that ran it, "<node id> (<address>)"; "": this machine.
    ran_on: str = ""


class LoadedModels:
    """The models one worker process has loaded: a job for the same model and settings
    reuses it instead of loading the weights again. The ``keep`` most recently used stay
    loaded (the pool mirrors this in `_Slot.models` to send jobs where their model is)."""

    def __init__(self, keep: int = 2) -> None:
        self._models: dict[tuple[object, ...], Model] = {}
        self._keep = keep

    def __call__(self, spec: JobSpec) -> Model:
        from dicom_ai.inference.model import load_model

        key = (
            spec.model_id,
            spec.bundle,
            spec.device,
            spec.task,
            spec.threshold,
            spec.config_files,
            spec.prompts,
            spec.labels,
            spec.explain,
            spec.explain_layer,
        )
        if key not in self._models:
            self._models[key] = load_model(
                spec.model_id,
                spec.bundle,
                spec.device,
                task=spec.task,
                threshold=spec.threshold,
                config_files=spec.config_files,
                prompts=spec.prompts,
                labels=spec.labels,
                explain=spec.explain,
                explain_layer=spec.explain_layer,
            )
            self._evict()
            _freeze_long_lived()
        self._models[key] = self._models.pop(key)  # the most recently used last
        return self._models[key]

    def _evict(self) -> None:
        if len(self._models) <= self._keep:
            return
        while len(self._models) > self._keep:
            del self._models[next(iter(self._models))]
        # Frozen objects are out of the collector's reach: a model held in reference cycles
        # would stay in memory. The collection after the load (_freeze_long_lived) frees it.
        gc.unfreeze()


# A worker's prefetch arena: three 300-slice 512x512 CT series as float32. Address space
# until written (prefetch, warming).
_ARENA_BYTES = 1 << 30


def _freeze_long_lived() -> None:
    """Take what exists now (imported modules, loaded models: kept for the worker's life)
    out of the cyclic garbage collector's view. Otherwise every full collection walks
    torch's and MONAI's objects again, and prefetch spends most of its time there."""
    gc.collect()
    gc.freeze()


def new_arena() -> PrefetchArena:
    """The worker's arena, made for its first message. The loaders (torch, MONAI) are
    imported with it: for a first prefetch, while the series still arrives rather than when
    its job starts. Never in the node's main process."""
    importlib.import_module("dicom_ai.inference.volume")
    from dicom_ai.inference.arena import PrefetchArena

    return PrefetchArena(_ARENA_BYTES)


def run_job(
    spec: JobSpec,
    arena: PrefetchArena | None = None,
    models: LoadedModels | None = None,
    stages: dict[str, float] | None = None,
) -> tuple[Path, ...]:
    """Load the series, run the model, write its results durably; returns their paths.

    Segmentation gives a SEG and its SR (and, with ``preview``, Secondary Capture images);
    classification and detection give an SR. The loaders take what was prefetched into
    ``arena`` (the worker's); it is released for the next series after the job. ``models``:
    the worker's loaded models (None: load the model for this job alone). ``stages`` is
    filled with the seconds of each stage.
    """
    models = LoadedModels() if models is None else models
    stages = {} if stages is None else stages
    if arena is None:
        return _run_job(spec, None, models, stages)
    # Other series' prefetch: not coming here (a study job's are every role's).
    arena.keep_only([*spec.instance_paths, *(p for r in spec.roles for p in r.instance_paths)])
    try:
        return _run_job(spec, arena, models, stages)
    finally:
        arena.release()  # the job's volume may lie in the arena


def _run_job(
    spec: JobSpec, arena: PrefetchArena | None, models: LoadedModels, stages: dict[str, float]
) -> tuple[Path, ...]:
    # Imported here so the node's main process never loads torch or MONAI.

    from dicom_ai.errors import InputError, ModelError
    from dicom_ai.inference.findings import (
        ClassificationFindings,
        DetectionFindings,
        SegmentationFindings,
        TaskKind,
    )
    from dicom_ai.inference.planar import load_planar_images
    from dicom_ai.inference.study import StudyInput, load_study
    from dicom_ai.inference.volume import load_series
    from dicom_ai.results import DeviceIdentity, result_uids
    from dicom_ai.results.encoding import file_bytes
    from dicom_ai.store.spool import Spool

    model_started = time.monotonic()
    model = models(spec)
    started = time.monotonic()
    other_sources: list[Dataset] = []  # a study job's other series, for the SR's evidence
    if spec.roles and (model.task is not TaskKind.SEGMENTATION or model.spatial_dims != 3):
        raise ModelError(
            f"{spec.model_id} gives {model.spatial_dims}-D {model.task.value}; study jobs "
            "give 3-D segmentations only"
        )
    images: tuple[PlanarImage, ...] = ()
    if model.spatial_dims == 2:
        images = load_planar_images(spec.instance_paths, arena)
        loaded = time.monotonic()
        findings = model(images)
        headers = [image.header for image in images]
        frames = None
    else:
        study: StudyInput | None = None
        if spec.roles:
            if spec.reference_role is None:
                raise InputError("a study job without a reference role")
            study = load_study(
                [(role.role, role.instance_paths) for role in spec.roles],
                spec.reference_role,
                spec.role_input,
                arena,
            )
            volume = study.reference
            other_sources = study.other_headers
        else:
            volume = load_series(spec.instance_paths, arena)
        if model.task is TaskKind.SEGMENTATION and volume.frame_numbers is not None:
            instances = len(set(volume.sop_instance_uids))
            if instances > 1:
                # Said before inference: a SEG derives from one multi-frame source at most.
                raise InputError(
                    f"the series has {instances} multi-frame instances; a SEG can reference "
                    "the frames of one only"
                )
        loaded = time.monotonic()
        findings = model(volume if study is None else study)
        headers = list(volume.headers)
        frames = volume.frames
    inferred = time.monotonic()
    # A study job's results derive from the study and rule (result_key): a rerun with
    # another series for a role supersedes them.
    uids = result_uids(
        spec.result_key or spec.series_instance_uid, spec.model_id, findings.algorithm.version
    )
    device = DeviceIdentity.for_node(spec.device_serial_number)
    if isinstance(findings, SegmentationFindings):
        results = _segmentation_results(
            headers, frames, findings, uids, device, spec.preview, other_sources
        )
    else:
        results = [("sr.dcm", _report(headers, findings, uids, device))]
        if isinstance(findings, ClassificationFindings | DetectionFindings):
            # 2-D images: their display values, as the model read them (rows, columns).
            planes = {image.sop_instance_uid: image.image[0].numpy().T for image in images}
            results += _attributions(headers, frames, planes, findings, uids, device)
    if spec.card:
        paths = [image.path for image in images]
        results += _card(headers, frames, paths, findings, uids, device, spec)
    spool = Spool(spec.results_dir.parent.parent, spec.min_free_bytes)
    files = []
    for name, dataset in results:
        path = spec.results_dir / name
        spool.write_atomic(path, file_bytes(dataset))  # a view: a 25 MB SEG is not copied
        files.append(path)
    stages.update(
        load=loaded - model_started, infer=inferred - loaded, encode=time.monotonic() - inferred
    )
    log.info(
        "job %d: %s (%s) on series %s%s: %d result object(s), load %.2f s, infer %.2f s, "
        "encode and write %.2f s",
        spec.job_id,
        spec.model_id,
        model.task.value,
        spec.series_instance_uid,
        f" and {len(other_sources)} instance(s) of other roles" if spec.roles else "",
        len(files),
        loaded - started,
        inferred - loaded,
        time.monotonic() - inferred,
    )
    return tuple(files)


def _segmentation_results(
    headers: list[Dataset],
    frames: npt.NDArray[np.float32] | None,
    findings: SegmentationFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    preview: bool,
    other_sources: Sequence[Dataset] = (),
) -> list[tuple[str, Dataset]]:
    """SEG, SR (and previews) on the source series ``headers``; ``other_sources``: a study
    job's other series, which the SR names as evidence too."""
    from dicom_ai.errors import EncodingError
    from dicom_ai.results import build_seg, build_sr, link_related_series
    from dicom_ai.results.preview import build_preview

    seg = build_seg(headers, findings, uids, device)
    sr = build_sr(headers, seg, findings, uids, device, other_sources=other_sources)
    link_related_series(seg, sr)
    results: list[tuple[str, Dataset]] = [("seg.dcm", seg), ("sr.dcm", sr)]
    if preview and frames is not None:
        try:
            images = build_preview(frames, headers, findings, uids, device)
        except EncodingError as exc:
            # The preview is a picture of the results, not a result: SEG and SR still go.
            series = headers[0].get("SeriesInstanceUID", "?")
            log.warning("preview of series %s not made: %s", series, exc)
            return results
        results += [(f"preview-{k:04d}.dcm", image) for k, image in enumerate(images, start=1)]
    return results


def _attributions(
    headers: list[Dataset],
    frames: npt.NDArray[np.float32] | None,
    planes: dict[str, npt.NDArray[np.float32]],
    findings: ClassificationFindings | DetectionFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
) -> list[tuple[str, Dataset]]:
    """Each attribution map as a Parametric Map and a colour preview (most viewers show no
    Parametric Map). Either may be left out, with a log line: a projection image has no
    patient geometry for a Parametric Map; the report still goes."""
    import numpy as np

    from dicom_ai.errors import EncodingError
    from dicom_ai.results.attribution import build_attribution_preview, build_parametric_map

    results: list[tuple[str, Dataset]] = []
    previews = 0
    for k, attribution in enumerate(findings.attributions, start=1):
        try:
            results.append(
                (
                    f"attribution-{k:04d}.dcm",
                    build_parametric_map(
                        headers,
                        attribution,
                        uids,
                        device,
                        algorithm=findings.algorithm,
                        instance_number=k,
                    ),
                )
            )
        except EncodingError as exc:
            log.info("attribution map %d as a Parametric Map not made: %s", k, exc)
        except Exception as exc:  # a picture of the results, not a result: the report goes
            log.warning("attribution map %d not made: %s", k, exc)
            log.debug("attribution map %d:\n%s", k, traceback.format_exc())
        try:
            if frames is None:  # a 2-D model's images
                pixels = np.stack([planes[uid] for uid in attribution.source_sop_instance_uids])
            images = build_attribution_preview(
                frames if frames is not None else pixels,
                headers,
                attribution,
                uids,
                device,
                algorithm=findings.algorithm,
                display_values=frames is None,
                first_instance_number=previews + 1,
            )
        except Exception as exc:  # as above
            log.warning("attribution preview %d not made: %s", k, exc)
            log.debug("attribution preview %d:\n%s", k, traceback.format_exc())
            continue
        for image in images:
            previews += 1
            results.append((f"attribution-preview-{previews:04d}.dcm", image))
    return results


def _card(
    headers: list[Dataset],
    frames: npt.NDArray[np.float32] | None,
    paths: list[Path],
    findings: Findings,
    uids: ResultUIDs,
    device: DeviceIdentity,
    spec: JobSpec,
) -> list[tuple[str, Dataset]]:
    """The result card (and its PDF); none, with a warning, when it cannot be drawn: it is
    a summary of the results, not a result, and SEG and SR still go (so any failure here
    is caught). ``paths``: a 2-D job's images, whose headers were read without pixels."""
    try:
        # In the try: a bundle's own environment may lack what the card draws with.
        import pydicom

        from dicom_ai.results.card import build_card, build_card_pdf

        if frames is None and paths:
            # The key image's pixels, from its file.
            headers = [pydicom.dcmread(path) for path in paths]
        card = build_card(headers, frames, findings, uids, device, disclaimer=spec.card_disclaimer)
        cards: list[tuple[str, Dataset]] = [("card.dcm", card)]
        if spec.card_pdf:
            cards.append(("card-pdf.dcm", build_card_pdf(card)))
    except Exception as exc:
        log.warning("job %d: result card not made: %s", spec.job_id, exc)
        log.debug("result card of job %d:\n%s", spec.job_id, traceback.format_exc())
        return []
    return cards


def _report(
    headers: list[Dataset],
    findings: ClassificationFindings
    | DetectionFindings
    | ImageDetectionFindings
    | LandmarkFindings,
    uids: ResultUIDs,
    device: DeviceIdentity,
) -> Dataset:
    from dicom_ai.inference.findings import (
        ClassificationFindings,
        ImageDetectionFindings,
        LandmarkFindings,
    )
    from dicom_ai.results import (
        build_classification_sr,
        build_detection_sr,
        build_image_detection_sr,
        build_landmark_sr,
    )

    if isinstance(findings, ClassificationFindings):
        return build_classification_sr(headers, findings, uids, device)
    if isinstance(findings, LandmarkFindings):
        return build_landmark_sr(headers, findings, uids, device)
    if isinstance(findings, ImageDetectionFindings):
        return build_image_detection_sr(headers, findings, uids, device)
    return build_detection_sr(headers, findings, uids, device)


def _worker_main(
    conn: Connection, log_level: int, parent_pid: int, warm_bytes: int, warm_models: int = 2
) -> None:
    from dicom_ai.lifecycle import die_with_parent

    die_with_parent(parent_pid)
    # A spawned process starts with no logging config; mirror the node's level.
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    # highdicom narrates every module it copies at INFO: thousands of lines per job.
    logging.getLogger("highdicom").setLevel(max(log_level, logging.WARNING))
    inbox: deque[JobSpec | Prefetch | None] = deque()
    arena: PrefetchArena | None = None  # made for the first message: see new_arena
    models = LoadedModels(warm_models)
    while True:
        try:
            spec = _next_message(conn, inbox, arena, warm_bytes)
        except EOFError:
            return
        if spec is None:
            return
        if isinstance(spec, Prefetch):
            if arena is None:
                arena = new_arena()
            _prefetch(spec, conn, inbox, arena)
            continue
        started = time.monotonic()
        try:
            if arena is None:  # in the try: a loader that cannot be imported fails the job
                arena = new_arena()
            stages: dict[str, float] = {}
            files = run_job(spec, arena, models, stages)
            outcome = JobOutcome(
                spec.job_id,
                True,
                files,
                seconds=time.monotonic() - started,
                stages=tuple(stages.items()),
            )
        except Exception as exc:
            log.debug("job %d failed:\n%s", spec.job_id, traceback.format_exc())
            reason = f"{type(exc).__name__}: {exc}"
            outcome = JobOutcome(
                spec.job_id, False, reason=reason, seconds=time.monotonic() - started
            )
        # Prefetches of this series sent while it ran came too late: decoding them now
        # would only compete with the delivery of its results.
        _drop_prefetches(conn, inbox, spec.series_instance_uid)
        try:
            conn.send(outcome)
        except (BrokenPipeError, EOFError, OSError):
            return  # the node is gone; its successor runs the job again


def _next_message(
    conn: Connection,
    inbox: deque[JobSpec | Prefetch | None],
    arena: PrefetchArena | None = None,
    warm_bytes: int = 0,
) -> JobSpec | Prefetch | None:
    """The next thing to do: a job (or the stop) before any prefetch, so a job never waits
    behind decoding of other series."""
    if not inbox:
        _warm_while_idle(conn, arena, warm_bytes)
        inbox.append(conn.recv())
    while conn.poll():
        inbox.append(conn.recv())
    for message in inbox:
        if not isinstance(message, Prefetch):
            inbox.remove(message)
            if message is not None:  # the job reads its files itself: no prefetch is ahead
                _drop_prefetches(conn, inbox, message.series_instance_uid)
            return message
    return inbox.popleft()


def _warm_while_idle(conn: Connection, arena: PrefetchArena | None, warm_bytes: int) -> None:
    """Until a message comes, touch the first ``warm_bytes`` of the arena step by step
    (ahead of the planes prefetched so far), so that the next large series finds its
    memory resident. Only once there is an arena, made for a first message: an idle worker
    that was never sent anything stays small."""
    if arena is None or not warm_bytes:
        return
    while not conn.poll() and arena.warm(warm_bytes):
        pass


def _drop_prefetches(
    conn: Connection, inbox: deque[JobSpec | Prefetch | None], series_uid: str
) -> None:
    with contextlib.suppress(EOFError, OSError):  # the node is gone: the next recv says so
        while conn.poll():
            inbox.append(conn.recv())
    stale = [m for m in inbox if isinstance(m, Prefetch) and m.series_instance_uid == series_uid]
    for message in stale:
        inbox.remove(message)


def _prefetch(
    request: Prefetch,
    conn: Connection,
    inbox: deque[JobSpec | Prefetch | None],
    arena: PrefetchArena,
) -> None:
    """Decode instance by instance into ``arena``; as soon as a message waits, put the rest
    back and go."""
    if gc.get_freeze_count() == 0:  # torch and MONAI just imported
        _freeze_long_lived()
    started = time.monotonic()
    added = 0
    paths = request.instance_paths
    try:
        arena.read_ahead(paths)
        for done, path in enumerate(paths):
            if conn.poll():
                inbox.appendleft(replace(request, instance_paths=paths[done:]))
                break
            added += arena.prefetch([path])
    except Exception:  # best effort: the job reads whatever is not cached
        log.debug("prefetch of series %s failed", request.series_instance_uid, exc_info=True)
    log.debug(
        "prefetched %d instance(s) of series %s in %.2f s",
        added,
        request.series_instance_uid,
        time.monotonic() - started,
    )


def drain(wake: socket.socket) -> None:
    """Read and drop the bytes that woke a pool's ``poll`` (the wake socket)."""
    with contextlib.suppress(OSError):  # BlockingIOError: nothing more
        while wake.recv(4096):
            pass


def _died(process: BaseProcess) -> str:
    """Why a worker died, as far as its exit code tells: a signal (a crash) or a status."""
    code = process.exitcode
    if code is None:
        return "the worker process died"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"the worker process died (killed by signal {name})"
    return f"the worker process died (exit code {code})"


@dataclass
class _Slot:
    process: BaseProcess
    conn: Connection
    job: JobSpec | None = None
    deadline: float = 0.0
    prefetched_series: str | None = None  # what this worker has decoded ahead
    python: Path | None = None  # the interpreter it runs; None: the node's
    models: list[str] = field(default_factory=list)  # loaded, least recently used first


class _Keep(enum.Enum):
    SAME = "the interpreter the worker ran"


# multiprocessing's spawn settings are process-wide: one worker start at a time changes them.
_SPAWN_LOCK = threading.Lock()


def _interpreter_path(python: Path) -> list[str]:
    """The sys.path ``python`` starts with (its site-packages first, and whatever its .pth
    files add after them)."""
    done = subprocess.run(
        [str(python), "-c", "import json, sys; print(json.dumps(sys.path))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [entry for entry in json.loads(done.stdout.strip().splitlines()[-1]) if entry]


@contextlib.contextmanager
def _spawning_with(python: Path, sys_path: list[str]) -> Iterator[None]:
    """Processes started in this block run ``python`` and start with ``sys_path`` before the
    node's own. Spawn hands the child the parent's sys.path before it imports anything
    (the node's ``__main__`` among them, which imports numpy): the environment's
    site-packages must be first in it, or the child would import the node's numpy and
    MONAI."""
    spawn = multiprocessing.spawn
    executable = spawn.get_executable()
    preparation = spawn.get_preparation_data

    def prepared(name: str) -> dict[str, object]:
        data: dict[str, object] = preparation(name)
        parent = [str(p) for p in data.get("sys_path", sys.path)]  # type: ignore[attr-defined]
        data["sys_path"] = sys_path + [p for p in parent if p not in sys_path]
        return data

    with _SPAWN_LOCK:
        spawn.set_executable(str(python))
        spawn.get_preparation_data = prepared
        try:
            yield
        finally:
            # get_executable() may give bytes (set_executable stores fsencoded paths).
            spawn.set_executable(os.fsdecode(executable))
            spawn.get_preparation_data = preparation


# An idle worker exits as soon as it reads the stop message; one that does not is busy
# prefetching (nothing it holds is kept), and waiting longer would only hold the stop.
_STOP_GRACE_SECONDS = 0.5


class WorkerPool:
    """``size`` spawned workers; jobs go to idle ones; ``poll`` reports finished jobs."""

    def __init__(
        self,
        size: int,
        log_level: int = logging.INFO,
        warm_bytes: int = 0,
        warm_models: int = 2,
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._log_level = log_level
        self._warm_bytes = warm_bytes
        self._warm_models = warm_models
        self._paths: dict[Path, list[str]] = {}  # each other interpreter's sys.path
        self._slots = [self._new_slot() for _ in range(size)]

    def _new_slot(self, python: Path | None = None) -> _Slot:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child, self._log_level, os.getpid(), self._warm_bytes, self._warm_models),
            name="dicom-ai-worker",
            daemon=True,
        )
        if python is None:
            process.start()
        else:
            if python not in self._paths:
                try:
                    self._paths[python] = _interpreter_path(python)
                except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
                    # Started anyway: the job then fails with the import error it meets.
                    log.warning("cannot read the sys.path of %s: %s", python, exc)
                    self._paths[python] = []
            with _spawning_with(python, self._paths[python]):
                process.start()
        child.close()
        return _Slot(process, parent, python=python)

    def idle(self) -> int:
        return sum(1 for slot in self._slots if slot.job is None)

    def _idle_slot(
        self, series_uid: str, python: Path | None = None, model_id: str | None = None
    ) -> _Slot | None:
        """An idle worker: on ``python``, then one with ``model_id`` loaded, then one with
        ``series_uid`` prefetched; any if none is."""
        idle = [slot for slot in self._slots if slot.job is None]
        ranked = sorted(
            idle,
            key=lambda s: (
                s.python != python,
                model_id is not None and model_id not in s.models,
                s.prefetched_series != series_uid,
            ),
        )
        return ranked[0] if ranked else None

    def submit(self, spec: JobSpec) -> None:
        slot = self._idle_slot(spec.series_instance_uid, spec.python, spec.model_id)
        if slot is None:
            raise RuntimeError("no idle worker")
        if slot.python != spec.python:
            slot = self._renew(
                slot,
                f"job {spec.job_id} runs on {spec.python or 'the node interpreter'}",
                python=spec.python,
                level=logging.INFO,
            )
        try:
            slot.conn.send(spec)
        except OSError:  # it died while idle (a prefetch it could not survive): a fresh one
            slot = self._renew(slot, "the worker process died while idle")
            slot.conn.send(spec)
        slot.job = spec
        slot.deadline = time.monotonic() + spec.timeout_seconds
        if spec.model_id in slot.models:
            slot.models.remove(spec.model_id)
        slot.models = [*slot.models, spec.model_id][-self._warm_models :]

    def prefetch(
        self, series_uid: str, paths: tuple[Path, ...], models: tuple[str, ...] = ()
    ) -> bool:
        """Ask an idle worker to decode ``paths`` ahead of the series' job; False when none
        is idle. (``models``, what the series' rules run, matters on a cluster only.)"""
        slot = self._idle_slot(series_uid)
        if slot is None:
            return False
        slot.prefetched_series = series_uid
        slot.conn.send(Prefetch(series_uid, paths))
        return True

    def poll(self, timeout: float = 0.0, wake: socket.socket | None = None) -> list[JobOutcome]:
        """Finished, failed, crashed and timed-out jobs since the last call; waits up to
        ``timeout`` for one, or until a byte arrives on ``wake`` (read and dropped)."""
        for slot in self._slots:
            if slot.job is None and not slot.process.is_alive():
                self._renew(slot, _died(slot.process) + " while idle")
        busy = {slot.conn: slot for slot in self._slots if slot.job is not None}
        outcomes: list[JobOutcome] = []
        waiting: list[Connection | socket.socket] = [*busy, *([wake] if wake else [])]
        if not waiting:
            time.sleep(timeout)  # the caller's loop paces itself on this call
            return outcomes
        for ready in wait(waiting, timeout):
            if ready is wake:
                drain(wake)
                continue
            slot = busy[ready]  # type: ignore[index]
            assert slot.job is not None
            try:
                outcomes.append(slot.conn.recv())
                slot.job = None
            except (EOFError, OSError):
                slot.process.join(timeout=5)  # its pipe closed as it exited: the exit code
                outcomes.append(self._replace(slot, _died(slot.process), retry=True))
        now = time.monotonic()
        for slot in self._slots:
            if slot.job is None:
                continue
            if not slot.process.is_alive():
                outcomes.append(self._replace(slot, _died(slot.process), retry=True))
            elif now > slot.deadline:
                outcomes.append(
                    self._replace(
                        slot,
                        f"the model ran past its timeout of {slot.job.timeout_seconds:g} s",
                        retry=False,
                    )
                )
        return outcomes

    def _replace(self, slot: _Slot, reason: str, retry: bool) -> JobOutcome:
        assert slot.job is not None
        job_id = slot.job.job_id
        self._renew(slot, f"job {job_id}: {reason}")
        return JobOutcome(job_id, False, reason=reason, retry=retry)

    def _renew(
        self,
        slot: _Slot,
        reason: str,
        python: Path | _Keep | None = _Keep.SAME,
        level: int = logging.WARNING,
    ) -> _Slot:
        """Kill what is left of ``slot``'s worker and put a fresh one in its place, on
        ``python`` (by default the interpreter it ran)."""
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(timeout=5)
        slot.conn.close()
        fresh = self._new_slot(slot.python if isinstance(python, _Keep) else python)
        self._slots[self._slots.index(slot)] = fresh
        log.log(level, "%s; worker replaced", reason)
        return fresh

    def shutdown(self) -> None:
        """Idle workers are asked to stop. A worker in a job is killed at once: the job
        stays running in the index and runs again at the next start, with the same result
        UIDs, where waiting would hold the stop for the rest of an inference. One still
        busy after _STOP_GRACE_SECONDS (a prefetch, which keeps nothing) is killed too."""
        for slot in self._slots:
            if slot.job is not None:
                log.info(
                    "stopping: job %d interrupted, to run again at the next start", slot.job.job_id
                )
                slot.process.kill()
                continue
            with contextlib.suppress(OSError):
                slot.conn.send(None)
        for slot in self._slots:
            slot.process.join(timeout=_STOP_GRACE_SECONDS)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(timeout=3)

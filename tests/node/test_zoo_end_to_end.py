"""Every radiology bundle of the MONAI model zoo through one node, configs unchanged.

One node serves all bundles (the shared configs copied, seeded weights added as a download
would add real ones: :mod:`tests.zoo`), one rule per bundle routes a series to it by Series
Description. The module fixture sends every bundle's synthetic series at once, so the node
works through them while the tests check earlier results; each test waits for its own job.

- Segmentation bundles: a SEG and an SR at the PACS; dciodvfy clean, PixelMed TID 1500
  clean, each SEG frame derived from an image of the source series, highdicom reads both.
- valve_landmarks (2-D MR points): an SR with SCOORD3D POINTs.
- breast_density_classification / lung_nodule_ct_detection need torchvision, which does
  not load beside this machine's CPU torch: ``dicom-ai models check`` must name it
  (``benchmarks/torchvision_bundles.py`` runs them on demand where it loads).
- brats_mri_segmentation / renalStructures_CECT_segmentation take several series as
  channels; one series is refused by the node with a reason naming them.

A bundle whose network does not build with the node's MONAI (swin_unetr's ``img_size``,
valve_landmarks' ``numpy.product``) gets the environment ``dicom_ai.inference.environment``
prepares from its metadata (wheels from the node's wheelhouse, no index), as ``dicom-ai
models prepare`` does; its weights are written with that environment's interpreter.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid
from tests.peers import REPO, NodeProcess, StoreSCP, node_config, storescu, wait_until
from tests.zoo import (
    MULTI_SERIES_BUNDLES,
    TORCHVISION_BUNDLES,
    ZOO,
    make_zoo_bundle,
    needs_torchvision,
    torchvision_loads,
    zoo_input,
    zoo_series,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.java, pytest.mark.slow]

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
JOB_TIMEOUT_S = 240.0
# Every job must have finished this long after the series were sent: a wedged node fails
# the remaining tests in minutes, not one job timeout each.
ALL_JOBS_S = 600.0

SEGMENTATION = tuple(
    name
    for name in ZOO
    if name not in TORCHVISION_BUNDLES + MULTI_SERIES_BUNDLES + ("valve_landmarks",)
)


@dataclass
class Zoo:
    node: NodeProcess
    pacs: StoreSCP
    work: Path
    series: dict[str, list[Path]] = field(default_factory=dict)
    setup_errors: dict[str, str] = field(default_factory=dict)
    sent_at: float = 0.0


def _description(name: str) -> str:
    return f"zoo {name}"


def _make_here(name: str, work: Path) -> str | None:
    """The bundle with weights written in this process; the first line of why not when its
    network does not build here (raises when no environment can help: torchvision)."""
    try:
        make_zoo_bundle(name, work / "bundles")
    except RuntimeError as here:
        if needs_torchvision(work / "bundles" / name):
            raise  # no environment gets torchvision beside the node's torch
        return str(here).splitlines()[0]
    return None


def _make_in_environment(name: str, work: Path, data_dir: Path, first: str) -> Path:
    """The bundle in its own environment, as ``dicom-ai models prepare`` makes it; only
    subprocesses (pip, the check, the weight writer): safe beside other work in threads."""
    from dicom_ai.inference.environment import default_wheelhouse, prepare

    bundle = (work / "bundles" / name).resolve()
    # Built without weights (its check fails for want of them), then checked again with them.
    env = prepare(bundle, data_dir, default_wheelhouse(), use_index=False)
    try:
        make_zoo_bundle(name, work / "bundles", python=env.python)
    except RuntimeError as there:
        raise RuntimeError(
            f"{first}; in its environment ({', '.join(env.installed)}): "
            + str(there).splitlines()[-1]
        ) from there
    env = prepare(bundle, data_dir, default_wheelhouse(), use_index=False)
    if not env.ok:
        raise RuntimeError(f"{name}: its environment fails its check: {env.verdict}")
    return bundle


def _make_all(work: Path, data_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every zoo bundle with weights: (bundles, why not). Environments are built in threads
    while the next bundles' weights are written here (bundle scripts share the module name
    ``scripts``: in-process writing stays in this thread)."""
    made: dict[str, Path] = {}
    errors: dict[str, str] = {}
    pending: dict[str, Future[Path]] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name in ZOO:
            try:
                first = _make_here(name, work)
            except Exception as exc:
                errors[name] = str(exc)
                continue
            if first is None:
                made[name] = (work / "bundles" / name).resolve()
            else:
                pending[name] = pool.submit(_make_in_environment, name, work, data_dir, first)
        for name, future in pending.items():
            try:
                made[name] = future.result()
            except Exception as exc:  # RuntimeError, or ModelError from prepare
                errors[name] = str(exc)
    return made, errors


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    work = tmp_path_factory.mktemp("zoo")
    pacs = StoreSCP(work / "pacs").start()
    settings = node_config(work / "node", pacs.port)
    data_dir = Path(settings["node"]["data_dir"])
    models: dict[str, dict[str, object]] = {}
    rules: list[dict[str, object]] = []
    series: dict[str, list[Path]] = {}
    made, setup_errors = _make_all(work, data_dir)
    for seed, name in enumerate(ZOO, start=1):
        if name not in made:
            continue
        bundle = made[name]
        model: dict[str, object] = {"bundle": str(bundle), "device": "cpu"}
        model["timeout_seconds"] = JOB_TIMEOUT_S
        models[name] = model
        rules.append(
            {
                "name": f"zoo-{name}",
                "match": {"SeriesDescription": {"equals": _description(name)}},
                "model": name,
                "destinations": ["pacs"],
            }
        )
        series[name] = zoo_series(
            bundle, work / "input" / name, series_description=_description(name), seed=seed
        )
    rules_file = work / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"rules": rules}, sort_keys=False))
    settings["models"], settings["rules"] = models, str(rules_file)
    node = NodeProcess(work / "node", settings)
    zoo = Zoo(node, pacs, work, series, setup_errors)
    try:
        node.start()
        zoo.sent_at = time.monotonic()
        for name, paths in series.items():
            sent = storescu(node.port, paths)
            assert sent.returncode == 0, f"{name}: {sent.stdout}{sent.stderr}"
        yield zoo
    finally:
        node.stop()
        pacs.stop()
        _report_timings(zoo)


def _report_timings(zoo: Zoo) -> None:
    """Worker seconds per bundle, printed for ``pytest -s``. One worker runs the jobs one
    after another: a job's time runs from the later of its creation and the previous job's
    end to its own end."""
    try:
        rows = zoo.node.index_rows(
            "SELECT model, state, created_at, updated_at FROM jobs ORDER BY updated_at"
        )
    except Exception:  # the index may not exist when the node never started
        return
    previous = 0.0
    for model, state, created, updated in rows:
        print(
            f"zoo timing: {model} {state} {updated - max(created, previous):.1f} s", file=sys.stderr
        )
        previous = updated


def _job(zoo: Zoo, name: str) -> tuple[str, str | None]:
    """(state, error) of the bundle's job, once it is done or failed."""
    uid = str(dcmread(zoo.series[name][0], stop_before_pixels=True).SeriesInstanceUID)

    def finished() -> bool:
        rows = zoo.node.index_rows(
            "SELECT state FROM jobs WHERE series_instance_uid = ? AND model = ?", uid, name
        )
        return any(state in ("done", "failed") for (state,) in rows)

    left = max(1.0, zoo.sent_at + ALL_JOBS_S - time.monotonic())
    try:
        wait_until(finished, left, f"{name}'s job to finish", 1.0)
    except TimeoutError:
        rows = zoo.node.index_rows(
            "SELECT state, attempts, error FROM jobs WHERE series_instance_uid = ?", uid
        )
        pytest.fail(f"{name}: no finished job {ALL_JOBS_S:g} s after sending; jobs: {rows}")
    ((state, error),) = zoo.node.index_rows(
        "SELECT state, error FROM jobs WHERE series_instance_uid = ? AND model = ?"
        " ORDER BY run DESC LIMIT 1",
        uid,
        name,
    )
    return str(state), error


def _results(zoo: Zoo, name: str, count: int) -> list[Dataset]:
    """The ``count`` result objects of ``name``'s series at the PACS (same study)."""
    source = dcmread(zoo.series[name][0], stop_before_pixels=True)

    def objects() -> list[Dataset]:
        out = []
        for path in zoo.pacs.files():
            try:
                ds = dcmread(path)
            except Exception:  # storescp is still writing it: read it at the next poll
                continue
            if ds.StudyInstanceUID == source.StudyInstanceUID:
                ds.filename = str(path)
                out.append(ds)
        return out

    wait_until(lambda: len(objects()) >= count, 60, f"{count} results of {name} at the PACS", 1)
    return objects()


def _study_of(path: Path) -> str | None:
    """The Study Instance UID of a PACS file; None while storescp is still writing it."""
    try:
        return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    except Exception:
        return None


def _ran(zoo: Zoo, name: str) -> None:
    """Fail with the setup or node reason unless the bundle's job finished done."""
    if name in zoo.setup_errors:
        pytest.fail(f"bundle not made: {zoo.setup_errors[name]}")
    state, error = _job(zoo, name)
    first = (error or "").strip().splitlines()[0] if error else ""
    assert state == "done", f"{name}: job {state}: {first}"


def _source_uids(zoo: Zoo, name: str) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in zoo.series[name]}


def _validate(objects: list[Dataset]) -> None:
    for ds in objects:
        assert_dciodvfy_clean(ds.filename)
        if ds.SOPClassUID == SR_STORAGE:
            assert_sr_template_valid(ds.filename)


def _content_items(items: object) -> Iterator[Dataset]:
    for item in items or []:  # type: ignore[attr-defined]
        yield item
        yield from _content_items(item.get("ContentSequence"))


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_bundle_gives_seg_and_sr(zoo: Zoo, name: str) -> None:
    import highdicom as hd

    _ran(zoo, name)
    objects = _results(zoo, name, 2)
    segs = [ds for ds in objects if ds.SOPClassUID == SEG_STORAGE]
    srs = [ds for ds in objects if ds.SOPClassUID == SR_STORAGE]
    assert len(segs) == 1 and len(srs) == 1, [ds.SeriesDescription for ds in objects]
    _validate(objects)
    (seg,) = segs
    sources = _source_uids(zoo, name)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        derivation = frame.DerivationImageSequence[0]
        referenced = {str(s.ReferencedSOPInstanceUID) for s in derivation.SourceImageSequence}
        assert referenced and referenced <= sources
    read = hd.seg.segread(seg.filename)
    assert read.number_of_segments >= 1
    assert {str(u) for _, _, u in read.get_source_image_uids()} <= sources
    report = hd.sr.srread(srs[0].filename)
    assert report.SeriesInstanceUID == srs[0].SeriesInstanceUID
    assert seg.RelatedSeriesSequence[0].SeriesInstanceUID == srs[0].SeriesInstanceUID


def test_valve_landmarks_gives_points(zoo: Zoo) -> None:
    import highdicom as hd

    name = "valve_landmarks"
    _ran(zoo, name)
    objects = _results(zoo, name, 1)
    assert [ds.SOPClassUID for ds in objects] == [SR_STORAGE]
    _validate(objects)
    (sr,) = objects
    points = [
        item
        for item in _content_items(sr.ContentSequence)
        if item.ValueType == "SCOORD3D" and item.GraphicType == "POINT"
    ]
    # out_shape [2, 10]: ten landmarks, each a point in the plane of the cine image.
    assert len(points) >= 1
    for point in points:
        assert len(point.GraphicData) == 3
    hd.sr.srread(sr.filename)


@pytest.mark.parametrize("name", MULTI_SERIES_BUNDLES)
def test_multi_series_bundle_is_refused_with_a_reason(zoo: Zoo, name: str) -> None:
    if name in zoo.setup_errors:
        pytest.fail(f"bundle not made: {zoo.setup_errors[name]}")
    channels = zoo_input(zoo.work / "bundles" / name).channels
    state, error = _job(zoo, name)
    assert state == "failed", f"{name}: {channels}-channel bundle ran on one series"
    assert error is not None
    reason = error.strip().splitlines()[0]
    assert re.search(r"(?i)channel|series", reason) and str(channels) in reason, reason
    # Refused by the node, not a torch or MONAI error from running one channel anyway.
    assert not re.search(r"weight of size|applying transform|Given groups", reason), reason
    study = dcmread(zoo.series[name][0], stop_before_pixels=True).StudyInstanceUID
    results = [p for p in zoo.pacs.files() if _study_of(p) == study]
    assert not results, f"{name}: results of a refused job reached the PACS"


@pytest.mark.parametrize("name", TORCHVISION_BUNDLES)
def test_models_check_names_torchvision(tmp_path: Path, name: str) -> None:
    """Where torchvision does not load (PyPI's torchvision beside this machine's CPU torch),
    `dicom-ai models check` says so for the bundle. Where it loads, the bundle runs: proved
    on demand by `benchmarks/torchvision_bundles.py` in an environment with a torchvision
    build, not here."""
    import torch

    from tests.bundles import shared_bundle

    bundle = tmp_path / name
    shutil.copytree(shared_bundle(name), bundle)
    assert needs_torchvision(bundle)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save({}, bundle / "models" / "model.pt")  # stands in for the download
    config = tmp_path / "node.yaml"
    settings = node_config(tmp_path / "node", 11112, models={name: {"bundle": str(bundle)}})
    config.write_text(yaml.safe_dump(settings))
    checked = subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", "models", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    output = checked.stdout + checked.stderr
    if torchvision_loads():
        # The empty weights file is then what breaks it, not torchvision.
        assert checked.returncode != 0 and "torchvision" not in output.split("broken:")[-1]
        return
    assert checked.returncode != 0, output
    # e.g. "broken: <model>: load: torchvision missing (...)"
    assert any(name in line and "torchvision" in line for line in output.splitlines()), output

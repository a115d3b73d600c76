"""The zoo's torchvision bundles through the node's bundle runner, in an environment of their own.

On demand, not in CI. PyPI's torchvision does not load beside the node's CPU torch 2.13.0,
so ``breast_density_classification`` (TorchVisionFCModel inception_v3) and
``lung_nodule_ct_detection`` (RetinaNet, torchvision's box ops) run in a venv with its own
torch and torchvision, and the node's packages (MONAI, pydicom, highdicom, dicom_ai) after
them on the path::

    python3 -m venv /tmp/tv-env
    /tmp/tv-env/bin/pip install torch==2.14.1 torchvision==0.29.1
    printf '%s\\n' /work/main/.venv/lib/python3.11/site-packages /work/main \\
        > /tmp/tv-env/lib/python3.11/site-packages/zz_dicom_ai_node.pth
    cd /work/main && /tmp/tv-env/bin/python -m benchmarks.torchvision_bundles \\
        [--work DIR] [--node-python .venv/bin/python] [--threshold 0.5] [--json FILE]

Per bundle, as the node's worker runs a job (``pipeline/worker.py`` ``_run_job``): the shared
bundle copied with seeded weights (``tests.zoo.make_zoo_bundle``, written by this
interpreter in a subprocess), its synthetic series (``tests.zoo.zoo_series``), the model
loaded (``BundleModel(bundle, "cpu")``), the series read (``load_planar_images`` for 2-D
models, ``load_series`` for 3-D), inference, the SR built (``build_classification_sr`` /
``build_detection_sr``), written as the worker writes it, then validated: dciodvfy, PixelMed's
DicomSRValidator (TID 1500), highdicom's ``srread``. Then ``python -m
dicom_ai.inference.check BUNDLE --device cpu --json`` on the prepared bundle with this
interpreter and with the node's (where torchvision must be named).

When a bundle fails to load as the worker loads it, the failure and its traceback are
recorded (``worker_load``) and it is loaded again with ``network_def#pretrained`` false, so
the rest of its job still runs; the exit status is then 1. With seeded weights RetinaNet's
scores stay near its prior (0.01), under the bundle's own ``score_thresh`` (0.02): a second
detector run with the thresholds lowered in memory (``--no-demo-detections`` skips it) shows
boxes reaching the SR and its validators.

Times are wall-clock seconds on this machine's CPU (shared: other work changes them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NODE_PYTHON = REPO / ".venv" / "bin" / "python"
BUNDLES = ("breast_density_classification", "lung_nodule_ct_detection")
CHECK_TIMEOUT_S = 1200


def _versions() -> dict[str, str]:
    import importlib

    import monai
    import numpy
    import torch

    torchvision = importlib.import_module("torchvision")  # not in the node's venv (mypy)

    return {
        "python": sys.executable,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "torch from": str(Path(torch.__file__).parent),
        "monai from": str(Path(monai.__file__).parent),
    }


def _error_lines(output: str, word: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.lstrip().startswith(word)]


def _validate(path: Path) -> dict[str, Any]:
    """dciodvfy, PixelMed and highdicom on one SR file: counts and the error lines."""
    import highdicom as hd
    import pytest

    from tests.dicom_validation import assert_sr_template_valid, dciodvfy_output

    result: dict[str, Any] = {}
    output = dciodvfy_output(path)
    result["dciodvfy_errors"] = _error_lines(output, "Error")
    result["dciodvfy_warnings"] = len(_error_lines(output, "Warning"))
    try:
        pixelmed = assert_sr_template_valid(path)
        result["pixelmed"] = "clean"
        result["pixelmed_warnings"] = len(_error_lines(pixelmed, "Warning"))
    except (Exception, pytest.fail.Exception) as exc:  # pytest.fail: the tool is missing
        result["pixelmed"] = f"FAILED: {exc}"
    try:
        hd.sr.srread(path)
        result["highdicom_srread"] = "ok"
    except Exception as exc:
        result["highdicom_srread"] = f"FAILED: {exc}"
    return result


def _summary(findings: Any) -> dict[str, Any]:
    from dicom_ai.inference.findings import ClassificationFindings, DetectionFindings

    if isinstance(findings, ClassificationFindings):
        return {
            "images": [
                {
                    "sop_instance_uids": list(r.source_sop_instance_uids),
                    "scores": {s.name: round(s.probability, 4) for s in r.scores},
                }
                for r in findings.results
            ],
            "threshold": findings.threshold,
        }
    if isinstance(findings, DetectionFindings):
        first = findings.detections[0] if findings.detections else None
        return {
            "detections": len(findings.detections),
            "first": None
            if first is None
            else {
                "name": first.name,
                "score": round(first.score, 4),
                "center_mm": [round(float(v), 2) for v in first.center],
                "edges_mm": [[round(float(v), 2) for v in edge] for edge in first.edges],
            },
        }
    return {"findings": type(findings).__name__}


def run_bundle(
    name: str,
    work: Path,
    threshold: float,
    *,
    overrides: dict[str, Any] | None = None,
    retry: bool = True,
    label: str = "",
) -> dict[str, Any]:
    """One bundle as a worker job: weights, series, load, infer, SR, validation.

    ``overrides``: config ids set before the bundle is parsed (BundleModel's
    ``overrides``; the worker sets none). ``retry``: when the load fails as the worker's
    would, record it and load again with ``network_def#pretrained`` false (see main).
    """
    from pydicom import dcmread

    from dicom_ai.errors import ModelError
    from dicom_ai.inference.bundle import BundleModel
    from dicom_ai.inference.findings import ClassificationFindings, DetectionFindings
    from dicom_ai.inference.planar import load_planar_images
    from dicom_ai.inference.volume import load_series
    from dicom_ai.results import (
        DeviceIdentity,
        build_classification_sr,
        build_detection_sr,
        result_uids,
    )
    from dicom_ai.results.encoding import file_bytes
    from tests.zoo import make_zoo_bundle, zoo_series

    report: dict[str, Any] = {"bundle": name, "run": label or "as the worker runs it"}
    bundle = work / "bundles" / name
    if not (bundle / "models").is_dir():
        started = time.perf_counter()
        # Weights by this interpreter in a subprocess, as a test passes python= for an env.
        bundle = make_zoo_bundle(name, work / "bundles", python=sys.executable)
        report["weights_s"] = round(time.perf_counter() - started, 2)
    report["bundle_dir"] = str(bundle)
    paths = zoo_series(bundle, work / "input" / name, series_description=f"zoo {name}")
    report["input"] = f"{len(paths)} file(s), {dcmread(paths[0]).Modality}"

    started = time.perf_counter()
    try:
        model = BundleModel(bundle, "cpu", threshold=threshold, overrides=overrides)
    except ModelError as exc:
        if overrides or not retry:
            raise
        # As the worker loads it, it failed: record why, then load it again with the
        # override the proposed bundle.py fix applies, so the rest of the job still runs.
        report["worker_load"] = f"FAILED after {time.perf_counter() - started:.2f} s: {exc}"
        report["worker_load_traceback"] = traceback.format_exc()
        overrides = {"network_def#pretrained": False}
        started = time.perf_counter()
        model = BundleModel(bundle, "cpu", threshold=threshold, overrides=overrides)
    report["overrides"] = overrides or {}
    report["model_load_s"] = round(time.perf_counter() - started, 2)
    report["task"] = model.task.value
    report["spatial_dims"] = model.spatial_dims

    started = time.perf_counter()
    if model.spatial_dims == 2:
        images = load_planar_images(paths)
        loaded = time.perf_counter()
        findings = model(images)
        headers = [image.header for image in images]
    else:
        volume = load_series(paths)
        loaded = time.perf_counter()
        findings = model(volume)
        headers = list(volume.headers)
    inferred = time.perf_counter()
    report["series_load_s"] = round(loaded - started, 2)
    report["inference_s"] = round(inferred - loaded, 2)
    report["findings"] = _summary(findings)

    series_uid = str(headers[0].SeriesInstanceUID)
    uids = result_uids(series_uid, name, findings.algorithm.version)
    device = DeviceIdentity.for_node("x")
    if isinstance(findings, ClassificationFindings):
        sr = build_classification_sr(headers, findings, uids, device)
    elif isinstance(findings, DetectionFindings):
        sr = build_detection_sr(headers, findings, uids, device)
    else:
        raise TypeError(f"{name}: unexpected findings {type(findings).__name__}")
    out = work / "results" / (f"{name}-demo" if label else name) / "sr.dcm"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(file_bytes(sr))
    report["sr_encode_write_s"] = round(time.perf_counter() - inferred, 2)
    report["sr"] = str(out)
    report["sr_bytes"] = out.stat().st_size
    report["validation"] = _validate(out)
    return report


def run_check(python: Path, bundle: Path) -> dict[str, Any]:
    """``python -m dicom_ai.inference.check BUNDLE --device cpu --json``: its JSON, or why not."""
    command = [str(python), "-m", "dicom_ai.inference.check", str(bundle), "--device", "cpu"]
    command.append("--json")
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )
    result: dict[str, Any] = {
        "command": " ".join(command),
        "rc": done.returncode,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    lines = done.stdout.strip().splitlines()
    try:
        result["json"] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result["stdout"] = done.stdout[-4000:]
        result["stderr"] = done.stderr[-4000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="work directory (default: a new temp dir)")
    parser.add_argument("--node-python", type=Path, default=NODE_PYTHON)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES))
    parser.add_argument("--json", type=Path, help="write the whole report here")
    parser.add_argument(
        "--no-demo-detections",
        dest="demo_detections",
        action="store_false",
        help="skip the detector run with lowered score thresholds",
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="tv-bundles-"))
    work.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"environment": _versions(), "bundles": [], "checks": []}
    print(json.dumps(report["environment"], indent=2), flush=True)
    failed = False
    for name in args.bundles:
        try:
            result = run_bundle(name, work, args.threshold)
        except Exception as exc:
            result = {"bundle": name, "error": traceback.format_exc()}
            print(f"{name}: FAILED: {exc}", flush=True)
            failed = True
        else:
            errors = result["validation"]["dciodvfy_errors"]
            failed = failed or bool(errors) or result["validation"]["pixelmed"] != "clean"
        report["bundles"].append(result)
        print(json.dumps(result, indent=2), flush=True)
        failed = failed or "worker_load" in result
    if args.demo_detections and "lung_nodule_ct_detection" in args.bundles:
        # Seeded random weights keep RetinaNet's classification prior (scores near 0.01),
        # under the bundle's own score_thresh 0.02: no box. Lowered here (in memory) so
        # boxes reach the SR and its validators; not what a real model needs.
        selector = (
            "$@detector.set_box_selector_parameters(score_thresh=0.0,"
            "topk_candidates_per_level=1000,nms_thresh=0.22,detections_per_img=5)"
        )
        try:
            result = run_bundle(
                "lung_nodule_ct_detection",
                work,
                0.0,
                overrides={"detector_ops#1": selector},
                retry=False,
                label="demo: detector score_thresh 0, detections_per_img 5, node threshold 0",
            )
        except Exception:
            result = {"bundle": "lung_nodule_ct_detection", "error": traceback.format_exc()}
            failed = True
        report["bundles"].append(result)
        print(json.dumps(result, indent=2), flush=True)
    # After the bundles: one torch process at a time on this shared machine.
    for name in args.bundles:
        bundle = work / "bundles" / name
        if not (bundle / "models").is_dir():
            continue
        for python in (Path(sys.executable), args.node_python):
            check = run_check(python, bundle)
            report["checks"].append(check)
            print(json.dumps(check, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

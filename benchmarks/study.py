"""Study latency: last acknowledgement of the last required series of a 4-series MR study ->
SEG and SR stored at the PACS, minus inference.

    .venv/bin/python -m benchmarks.study [--runs 3] [--grace 1.0] [--full-size]

The node runs the model zoo's ``brats_mri_segmentation`` config unchanged (weights seeded
by tests/zoo.py) through a study rule: four MR series (T1c 3-D sagittal, T1 and T2 axial,
FLAIR axial at 5 mm; each on a grid of its own) as four channels, resampled onto the T1c
grid. Each series goes in its own storescu association, in a random order (seeded), as a
scanner sends a protocol. The PACS is DCMTK storescp. Each run starts a fresh node; a first
study warms the worker up (torch, MONAI, the bundle loaded), then a second study is timed.

Printed per run: seconds from storescu's exit for the last series (its last C-STORE-RSP)
to both results at the PACS (``stored``), the model's inference (``infer``, from the node's
log), the difference (the issue's figure, target 2 s), and where that went: until the
study job was made (the last series complete, the study decided), the job's load stage
(model warm: reading four series, resampling three onto the reference grid), encode and
write, delivery. No peer is run beside it: neither Orthanc, mercure nor MONAI's Informatics
Gateway builds a multi-channel input from several series, so there is no like figure.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from benchmarks.settle import settle
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until
from tests.studies import AXIAL, SAGITTAL, SeriesSpec, write_study
from tests.zoo import make_zoo_bundle

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_RULES = {
    "rules": [
        {
            "name": "brain-tumour",
            "match": {"Modality": {"equals": "MR"}},
            "model": "brats",
            "destinations": ["pacs"],
            "study": {
                "input": "channels",
                "roles": [
                    {"name": "t1c", "match": {"SeriesDescription": {"regex": "(?i)^t1 ?c"}}},
                    {"name": "t1", "match": {"SeriesDescription": {"regex": "(?i)^t1$"}}},
                    {"name": "t2", "match": {"SeriesDescription": {"regex": "(?i)^t2"}}},
                    {"name": "flair", "match": {"SeriesDescription": {"regex": "(?i)flair"}}},
                ],
            },
        }
    ]
}
BRATS_LABELS = {1: "Tumor core", 2: "Whole tumor", 4: "Enhancing tumor"}


def study_series(full_size: bool = False) -> list[SeriesSpec]:
    """The benchmark's four sequences: grids that differ as a brain protocol's do; with
    ``full_size`` the sizes of a clinical protocol (3-D T1c 240x240x160 at 1 mm, 2-D T1, T2,
    FLAIR 256x256x24 at 0.9 x 0.9 x 5 mm)."""
    if full_size:
        return [
            SeriesSpec("t1c", "T1C", rows=240, columns=240, slices=160,
                       pixel_spacing=(1.0, 1.0), slice_spacing=1.0, orientation=SAGITTAL,
                       mr_acquisition_type="3D", semi_axes_mm=(70.0, 90.0, 65.0)),
            SeriesSpec("t1", "T1", rows=256, columns=256, slices=24, pixel_spacing=(0.9, 0.9),
                       slice_spacing=5.0, semi_axes_mm=(70.0, 90.0, 65.0)),
            SeriesSpec("t2", "T2", rows=256, columns=256, slices=24, pixel_spacing=(0.9, 0.9),
                       slice_spacing=5.0, semi_axes_mm=(70.0, 90.0, 65.0)),
            SeriesSpec("flair", "FLAIR", rows=256, columns=256, slices=24,
                       pixel_spacing=(0.9, 0.9), slice_spacing=5.0,
                       semi_axes_mm=(70.0, 90.0, 65.0)),
        ]  # fmt: skip
    return [
        SeriesSpec("t1c", "T1C", rows=48, columns=48, slices=40, pixel_spacing=(1.2, 1.2),
                   slice_spacing=1.2, orientation=SAGITTAL, mr_acquisition_type="3D"),
        SeriesSpec("t1", "T1", rows=40, columns=40, slices=12, pixel_spacing=(1.5, 1.5),
                   slice_spacing=4.0),
        SeriesSpec("t2", "T2", rows=44, columns=44, slices=14, pixel_spacing=(1.4, 1.4),
                   slice_spacing=3.5, orientation=AXIAL),
        SeriesSpec("flair", "FLAIR", rows=36, columns=36, slices=10, pixel_spacing=(1.8, 1.8),
                   slice_spacing=5.0),
    ]  # fmt: skip


def _when(log: str, pattern: str) -> float:
    match = re.search(_STAMP + r" [^\n]*" + pattern, log)
    if match is None:
        raise RuntimeError(f"no log line matching {pattern!r}")
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _send_study(port: int, series: dict[str, list[Path]], rng: random.Random) -> float:
    """Each series in its own association, in a random order; when the last was acked."""
    order = list(series)
    rng.shuffle(order)
    for role in order:
        result = storescu(port, series[role])
        if result.returncode != 0:
            raise RuntimeError(f"send of {role} failed:\n{result.stdout}{result.stderr}")
    return time.time()


def _run(root: Path, bundle: Path, seed: int, grace: float, full_size: bool) -> dict[str, float]:
    pacs = StoreSCP(root / "pacs").start()
    rules = root / "rules.yaml"
    rules.write_text(yaml.safe_dump(_RULES, sort_keys=False))
    config = node_config(
        root / "node",
        pacs.port,
        rules=rules,
        models={"brats": {"bundle": str(bundle), "device": "cpu", "labels": BRATS_LABELS}},
        pipeline={"workers": 1, "quiet_seconds": 5.0, "release_grace_seconds": grace},
    )
    node = NodeProcess(root / "node", config).start()
    rng = random.Random(seed)
    try:
        warmup = write_study(root / "warmup", study_series(full_size), seed=seed * 2)
        _send_study(node.port, warmup, rng)
        wait_until(lambda: len(pacs.files()) >= 2, 600, "warm-up results", 0.2)
        timed = write_study(root / "timed", study_series(full_size), seed=seed * 2 + 1)
        acked = _send_study(node.port, timed, rng)
        wait_until(lambda: len(pacs.files()) >= 4, 600, "results", 0.01)
        stored = time.time()
        time.sleep(0.5)  # the node logs the delivery just after storescp has the file
        log = node.log_text()
    finally:
        node.stop()
        pacs.stop()
    jobs = re.findall(r"study (\S+), rule brain-tumour: job (\d+) \(run \d+\)", log)
    study_uid, job_id = jobs[-1]
    job = re.search(
        rf"job {job_id}: brats \(segmentation\) on series \S+[^:\n]*: .*?"
        r"load ([\d.]+) s, infer ([\d.]+) s, encode and write ([\d.]+) s",
        log,
    )
    if job is None:
        raise RuntimeError("no job line for the timed study in the node log")
    made = _when(log, rf"study {re.escape(study_uid)}, rule brain-tumour: job {job_id} ")
    delivered = _when(log, rf"job {job_id}: delivered")
    load, infer, encode = (float(job.group(k)) for k in (1, 2, 3))
    return {
        "total": stored - acked,
        "infer": infer,
        "decided": made - acked,
        "load": load,
        "encode": encode,
        "deliver": max(0.0, delivered - made - load - infer - encode),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grace", type=float, default=1.0, help="release_grace_seconds")
    parser.add_argument("--full-size", action="store_true", help="a clinical protocol's sizes")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicom-ai-study-"))
    try:
        bundle = make_zoo_bundle("brats_mri_segmentation", root / "bundles")
        print(settle(root / "probe"))
        print(
            f"4-series MR study ({'full size' if args.full_size else 'small grids'}: T1c "
            "sagittal 3-D, T1, T2, FLAIR axial), brats_mri_segmentation "
            f"(config unchanged, seeded weights, CPU), release grace {args.grace:g} s, early "
            "start on; seconds after the last acknowledgement of the last series"
        )
        header = f"{'run':<4} {'stored':>7} {'infer':>6} {'minus infer':>11} | "
        header += f"{'decided':>7} {'load':>5} {'encode+write':>12} {'deliver':>7}"
        print(header)
        rows = []
        for i in range(args.runs):
            row = _run(root / f"run{i}", bundle, i + 1, args.grace, args.full_size)
            rows.append(row)
            print(
                f"{i + 1:<4} {row['total']:>7.2f} {row['infer']:>6.2f} "
                f"{row['total'] - row['infer']:>11.2f} | {row['decided']:>7.2f} "
                f"{row['load']:>5.2f} {row['encode']:>12.2f} {row['deliver']:>7.2f}"
            )
        median = statistics.median(r["total"] - r["infer"] for r in rows)
        print(f"median minus inference: {median:.2f} s (target 2 s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

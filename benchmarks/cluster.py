"""The Ray executor's cost: last acknowledgement of a 300-slice CT -> SEG and SR at the
PACS, minus inference, through the local executor and through a Ray cluster, same run.

    .venv/bin/python -m benchmarks.cluster [--slices 300] [--runs 3] [--grace 1.0]

The cluster is real and on loopback (tests/ray_cluster.py): a head with one CPU and a node
with the custom resource ``model_host`` that ct-body is given, so the model runs on the
other Ray node, as on a GPU machine. Each run starts a fresh node per executor, sends a
warm-up series (the worker or replica imports torch and loads the model), then two timed
series (see benchmarks/latency.py, whose node run and breakdown this uses). ``deliver`` is
what is left once the job's own stages are taken away: delivery, and on Ray the input's
way to the replica and the results' way back.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.latency import FIGURES_HEADER, _run, arguments, figures, write_series
from benchmarks.settle import settle
from tests.ray_cluster import RayCluster

MODEL_HOST = {"model_host": 1.0}


def main() -> None:
    args = arguments(__doc__).parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicom-ai-ray-"))
    cluster = RayCluster(root / "ray")
    try:
        warmup, timed = write_series(root, args.slices)
        cluster.start_head()
        cluster.start_worker(MODEL_HOST)
        print(settle(root / "probe"))
        print(
            f"{args.slices} CT slices 512x512, ct-body, release grace {args.grace:g} s, early "
            "start on; Ray 2.60 on loopback (head + a model_host node); seconds after the "
            "last acknowledgement"
        )
        print(f"{'run':<4} {'executor':<8} {'series':<6} {FIGURES_HEADER}")
        rows: dict[tuple[str, str], list[float]] = {}
        for i in range(args.runs):
            for executor in ("local", "ray"):
                results = _run(
                    root / f"run{i}-{executor}",
                    warmup,
                    timed,
                    args.grace,
                    cluster=(cluster.address, MODEL_HOST) if executor == "ray" else None,
                )
                for name, row in zip(("first", "next"), results, strict=True):
                    rows.setdefault((executor, name), []).append(row["total"] - row["infer"])
                    print(f"{i + 1:<4} {executor:<8} {name:<6} {figures(row)}")
        for name in ("first", "next"):
            local = statistics.median(rows[("local", name)])
            ray = statistics.median(rows[("ray", name)])
            print(
                f"median minus inference, {name} series: local {local:.2f} s, Ray {ray:.2f} s: "
                f"Ray adds {ray - local:+.2f} s (target +0.5 s)"
            )
    finally:
        cluster.remove()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

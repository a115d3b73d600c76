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

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.latency import _run
from benchmarks.settle import settle
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.ray_cluster import RayCluster

MODEL_HOST = {"model_host": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grace", type=float, default=1.0, help="release_grace_seconds")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicom-ai-ray-"))
    cluster = RayCluster(root / "ray")
    try:
        warmup = write_phantom_ct(root / "warmup", PhantomSpec(slices=4, rows=64, columns=64))
        timed = []
        for name, seed in (("first", 1), ("next", 2)):
            spec = PhantomSpec(slices=args.slices, seed=seed)
            timed.append((spec.series_instance_uid, write_phantom_ct(root / name, spec)))
        cluster.start_head()
        cluster.start_worker(MODEL_HOST)
        print(settle(root / "probe"))
        print(
            f"{args.slices} CT slices 512x512, ct-body, release grace {args.grace:g} s, early "
            "start on; Ray 2.60 on loopback (head + a model_host node); seconds after the "
            "last acknowledgement"
        )
        print(
            f"{'run':<4} {'executor':<8} {'series':<6} {'stored':>7} {'infer':>6} "
            f"{'minus infer':>11} | {'complete':>8} {'load':>5} {'encode+write':>12} "
            f"{'deliver':>7}"
        )
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
                for (name, _), row in zip((("first", 0), ("next", 0)), results, strict=True):
                    rows.setdefault((executor, name), []).append(row["total"] - row["infer"])
                    print(
                        f"{i + 1:<4} {executor:<8} {name:<6} {row['total']:>7.2f} "
                        f"{row['infer']:>6.2f} {row['total'] - row['infer']:>11.2f} | "
                        f"{row['complete']:>8.2f} {row['load']:>5.2f} {row['encode']:>12.2f} "
                        f"{row['deliver']:>7.2f}"
                    )
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

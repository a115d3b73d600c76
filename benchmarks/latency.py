"""Latency: last acknowledgement of a 300-slice CT -> SEG and SR stored at the PACS.

    .venv/bin/python -m benchmarks.latency [--slices 300] [--runs 3] [--grace 1.0]
                                           [--no-early-start]

The node runs the built-in ct-body model with its default assembly settings (a series is
complete ``--grace`` seconds after its association released; with early start, the default,
its run starts on the release and its results are held for the grace) and sends to DCMTK
storescp.
A small series goes first so the worker has imported torch and MONAI before timing starts.
For each run it prints the wall time from storescu's exit (the last C-STORE-RSP) to both
results being in storescp's folder, the model's own inference time (from the node's log),
the difference (the issue's "minus inference" figure), and where the rest went, from the
node's log timestamps: waiting for the series to be complete, loading, encoding and writing,
delivering.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchmarks.settle import settle
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _when(log: str, pattern: str) -> float:
    match = re.search(_STAMP + r" [^\n]*" + pattern, log)
    if match is None:
        raise RuntimeError(f"no log line matching {pattern!r}")
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _run(
    root: Path,
    warmup: list[Path],
    files: list[Path],
    series_uid: str,
    grace: float,
    early_start: bool = True,
) -> dict[str, float]:
    pacs = StoreSCP(root / "pacs").start()
    config = node_config(
        root / "node",
        pacs.port,
        pipeline={
            "workers": 1,
            "quiet_seconds": 5.0,
            "release_grace_seconds": grace,
            "early_start": early_start,
        },
    )
    node = NodeProcess(root / "node", config).start()
    try:
        if storescu(node.port, warmup).returncode != 0:
            raise RuntimeError("warm-up send failed")
        wait_until(lambda: len(pacs.files()) >= 2, 300, "warm-up results", 0.2)
        result = storescu(node.port, files)
        acked = time.time()
        if result.returncode != 0:
            raise RuntimeError(f"send failed:\n{result.stdout}{result.stderr}")
        wait_until(lambda: len(pacs.files()) >= 4, 600, "results", 0.01)
        stored = time.time()
        time.sleep(0.5)  # the node logs the delivery just after storescp has the file
        log = node.log_text()
    finally:
        node.stop()
        pacs.stop()
    job = re.search(
        rf"job (\d+): ct-body \(segmentation\) on series {re.escape(series_uid)}: .*?"
        r"load ([\d.]+) s, infer ([\d.]+) s, encode and write ([\d.]+) s",
        log,
    )
    if job is None:
        raise RuntimeError("no job line for the timed series in the node log")
    job_id = job.group(1)
    complete = _when(log, rf"series {re.escape(series_uid)} complete")
    delivered = _when(log, rf"job {job_id}: delivered")
    return {
        "total": stored - acked,
        "infer": float(job.group(3)),
        "complete": complete - acked,
        "load": float(job.group(2)),
        "encode": float(job.group(4)),
        "deliver": max(0.0, delivered - complete - sum(float(job.group(k)) for k in (2, 3, 4))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grace", type=float, default=1.0, help="release_grace_seconds")
    parser.add_argument("--no-early-start", action="store_true", help="pipeline.early_start off")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicom-ai-latency-"))
    try:
        warmup = write_phantom_ct(root / "warmup", PhantomSpec(slices=4, rows=64, columns=64))
        spec = PhantomSpec(slices=args.slices)
        files = write_phantom_ct(root / "ct", spec)
        print(settle(root / "probe"))
        print(
            f"{len(files)} CT slices 512x512, ct-body, storescu TCP_NODELAY=1, "
            f"release grace {args.grace:g} s, "
            f"early start {'off' if args.no_early_start else 'on'}; "
            "seconds after the last acknowledgement"
        )
        header = f"{'run':<4} {'stored':>7} {'infer':>6} {'minus infer':>11} | "
        header += f"{'complete':>8} {'load':>5} {'encode+write':>12} {'deliver':>7}"
        print(header)
        rows = []
        for i in range(args.runs):
            row = _run(
                root / f"run{i}",
                warmup,
                files,
                spec.series_instance_uid,
                args.grace,
                not args.no_early_start,
            )
            rows.append(row)
            print(
                f"{i + 1:<4} {row['total']:>7.2f} {row['infer']:>6.2f} "
                f"{row['total'] - row['infer']:>11.2f} | {row['complete']:>8.2f} "
                f"{row['load']:>5.2f} {row['encode']:>12.2f} {row['deliver']:>7.2f}"
            )
        median = statistics.median(r["total"] - r["infer"] for r in rows)
        print(f"median minus inference: {median:.2f} s (target 1.5 s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

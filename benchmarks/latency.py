"""Latency: last acknowledgement of a 300-slice CT -> SEG and SR stored at the PACS.

    .venv/bin/python -m benchmarks.latency [--slices 300] [--runs 3] [--grace 1.0]
                                           [--no-early-start] [--receivers N]

The node runs the built-in ct-body model with its default assembly settings (a series is
complete ``--grace`` seconds after its association released; with early start, the default,
its run starts on the release and its results are held for the grace) and sends to DCMTK
storescp.
Each run starts a fresh node. A small series goes first so the worker has imported torch and
MONAI and loaded the model. Then two 300-slice series are timed one after the other:
``first``, the first full-size series this node sees, and ``next``, the one after it. A
node in service is in the second state: its worker has decoded a series before, so the
memory it decodes into is its own already. On these VMs memory touched for the first time
costs more than the decoding itself, so the first figure is the worse one; how much worse
depends on how much of its arena the worker warmed while idle after the warm-up
(``pipeline.warm_memory_mb``).
For each series it prints the wall time from storescu's exit (the last C-STORE-RSP) to both
results being in storescp's folder, the model's own inference time (from the node's log),
the difference (the issue's "minus inference" figure), and where the rest went, from the
node's log timestamps: waiting for the series to be complete, loading, encoding and writing,
delivering.
"""

from __future__ import annotations

import argparse
import functools
import json
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
    timed: list[tuple[str, list[Path]]],
    grace: float,
    early_start: bool = True,
    receivers: int | None = None,
    cluster: tuple[str, dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """One fresh node: the warm-up series, then each timed series (its UID, its files).
    ``cluster``: run the model on a Ray cluster (its address, the resources ct-body asks)."""
    pacs = StoreSCP(root / "pacs").start()
    pipeline: dict[str, object] = {
        "workers": 1,
        "quiet_seconds": 5.0,
        "release_grace_seconds": grace,
        "early_start": early_start,
    }
    models = {}
    if cluster is not None:
        pipeline.update(executor="ray", ray={"address": cluster[0]})
        models = {"ct-body": {"resources": cluster[1]}}
    config = node_config(
        root / "node",
        pacs.port,
        models=models,
        pipeline=pipeline,
        node={} if receivers is None else {"receivers": receivers},
    )
    node = NodeProcess(root / "node", config).start()
    sent: list[tuple[float, float]] = []
    try:
        if storescu(node.port, warmup).returncode != 0:
            raise RuntimeError("warm-up send failed")
        wait_until(lambda: len(pacs.files()) >= 2, 300, "warm-up results", 0.2)
        for n, (_, files) in enumerate(timed, start=2):
            result = storescu(node.port, files)
            acked = time.time()
            if result.returncode != 0:
                raise RuntimeError(f"send failed:\n{result.stdout}{result.stderr}")
            # SEG and SR of the warm-up and of each series so far
            wait_until(functools.partial(_has, pacs, 2 * n), 600, "results", 0.01)
            sent.append((acked, time.time()))
            time.sleep(0.5)  # the node logs the delivery just after storescp has the file
        log = node.log_text()
    finally:
        node.stop()
        pacs.stop()
    jobs = {
        str(uid): (int(job_id), json.loads(stages))
        for job_id, uid, stages in node.index_rows(
            "SELECT id, series_instance_uid, stages FROM jobs WHERE state = 'done'"
        )
    }
    return [
        _breakdown(log, series_uid, *jobs[series_uid], acked, stored)
        for (series_uid, _), (acked, stored) in zip(timed, sent, strict=True)
    ]


def _has(pacs: StoreSCP, count: int) -> bool:
    return len(pacs.files()) >= count


def _breakdown(
    log: str, series_uid: str, job_id: int, stages: dict[str, float], acked: float, stored: float
) -> dict[str, float]:
    """Where the time went: the job's stages as its worker (or replica) measured them and
    the index keeps them; the rest from the node's log."""
    complete = _when(log, rf"series {re.escape(series_uid)} complete")
    delivered = _when(log, rf"job {job_id}: delivered")
    measured = stages["load"] + stages["infer"] + stages["encode"]
    return {
        "total": stored - acked,
        "infer": stages["infer"],
        "complete": complete - acked,
        "load": stages["load"],
        "encode": stages["encode"],
        # Delivery, and on a cluster the transfers to and from it.
        "deliver": max(0.0, delivered - complete - measured),
    }


def arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every latency benchmark takes (benchmarks.cluster adds none)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--grace", type=float, default=1.0, help="release_grace_seconds")
    return parser


def write_series(root: Path, slices: int) -> tuple[list[Path], list[tuple[str, list[Path]]]]:
    """The warm-up series, and the timed ``first`` and ``next`` series (UID, files)."""
    warmup = write_phantom_ct(root / "warmup", PhantomSpec(slices=4, rows=64, columns=64))
    timed = []
    for name, seed in (("first", 1), ("next", 2)):
        spec = PhantomSpec(slices=slices, seed=seed)
        timed.append((spec.series_instance_uid, write_phantom_ct(root / name, spec)))
    return warmup, timed


# The figures of one timed series, after its run, executor and series columns.
FIGURES_HEADER = (
    f"{'stored':>7} {'infer':>6} {'minus infer':>11} | "
    f"{'complete':>8} {'load':>5} {'encode+write':>12} {'deliver':>7}"
)


def figures(row: dict[str, float]) -> str:
    return (
        f"{row['total']:>7.2f} {row['infer']:>6.2f} {row['total'] - row['infer']:>11.2f} | "
        f"{row['complete']:>8.2f} {row['load']:>5.2f} {row['encode']:>12.2f} "
        f"{row['deliver']:>7.2f}"
    )


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--no-early-start", action="store_true", help="pipeline.early_start off")
    parser.add_argument("--receivers", type=int, default=None, help="node.receivers")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dicom-ai-latency-"))
    try:
        warmup, timed = write_series(root, args.slices)
        print(settle(root / "probe"))
        print(
            f"{args.slices} CT slices 512x512, ct-body, storescu TCP_NODELAY=1, "
            f"release grace {args.grace:g} s, "
            f"early start {'off' if args.no_early_start else 'on'}; "
            "seconds after the last acknowledgement"
        )
        print(f"{'run':<4} {'series':<6} {FIGURES_HEADER}")
        rows: dict[str, list[dict[str, float]]] = {"first": [], "next": []}
        for i in range(args.runs):
            results = _run(
                root / f"run{i}", warmup, timed, args.grace, not args.no_early_start, args.receivers
            )
            for name, row in zip(rows, results, strict=True):
                rows[name].append(row)
                print(f"{i + 1:<4} {name:<6} {figures(row)}")
        for name, values in rows.items():
            median = statistics.median(r["total"] - r["infer"] for r in values)
            print(f"median minus inference, {name} series: {median:.2f} s (target 1.5 s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Ingest: one 300-slice 512x512 CT from DCMTK storescu to the node, storescp and Orthanc.

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--runs 3] [--no-nodelay]

Every receiver runs in the same invocation on loopback, with the same files and the same
storescu settings (TCP_NODELAY=1 unless --no-nodelay). Prints img/s per run, the median,
and the node's ratio to each peer. The node keeps fsync-before-Success; Orthanc runs with its
default (synchronous) storage; storescp does not fsync.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, Orthanc, StoreSCP, free_port, node_config, storescu


def _timed_send(port: int, ae_title: str, files: list[Path], nodelay: bool) -> float:
    started = time.perf_counter()
    result = storescu(port, files, ae_title=ae_title, nodelay=nodelay)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {ae_title} failed:\n{result.stdout}{result.stderr}")
    return elapsed


def _run(receiver: str, work: Path, files: list[Path], nodelay: bool) -> float:
    """Seconds for one storescu run against a freshly started receiver."""
    work.mkdir(parents=True)
    if receiver == "storescp":
        scp = StoreSCP(work / "out").start()
        try:
            return _timed_send(scp.port, "PACS", files, nodelay)
        finally:
            scp.stop()
    if receiver == "orthanc":
        orthanc = Orthanc(work).start(nodelay=True)
        try:
            return _timed_send(orthanc.dicom_port, "ORTHANC", files, nodelay)
        finally:
            orthanc.stop()
    rules = work / "rules.yaml"
    rules.write_text("rules: []\n")  # receive only: no model competes for the 2 cores
    node = NodeProcess(work, node_config(work, free_port(), rules=rules)).start()
    try:
        return _timed_send(node.port, "DICOM_AI", files, nodelay)
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-nodelay", action="store_true", help="storescu without TCP_NODELAY")
    args = parser.parse_args()
    nodelay = not args.no_nodelay

    root = Path(tempfile.mkdtemp(prefix="dicom-ai-bench-"))
    try:
        files = write_phantom_ct(root / "ct", PhantomSpec(slices=args.slices))
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"{len(files)} CT slices, {megabytes:.1f} MB; "
            f"storescu TCP_NODELAY={'1' if nodelay else 'unset'}"
        )
        receivers: dict[str, Callable[[int], float]] = {
            name: (lambda i, name=name: _run(name, root / f"{name}-{i}", files, nodelay))
            for name in ("dicom-ai", "storescp", "orthanc")
        }
        rates: dict[str, list[float]] = {name: [] for name in receivers}
        for i in range(args.runs):  # interleaved, so drift in machine load hits all alike
            for name, run in receivers.items():
                rates[name].append(len(files) / run(i))
        print(f"{'receiver':<10} {'runs (img/s)':<32} {'median img/s':>12}")
        medians = {}
        for name, values in rates.items():
            medians[name] = statistics.median(values)
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(f"{name:<10} {runs:<32} {medians[name]:>12.0f}")
        for peer in ("storescp", "orthanc"):
            print(f"dicom-ai / {peer}: {medians['dicom-ai'] / medians[peer]:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Memory: peak RSS while 4 storescu send 4 different 300-slice 512x512 CT series at once.

    .venv/bin/python -m benchmarks.memory [--senders 4] [--slices 300] [--interval 0.05]
                                          [--no-pipeline] [--receivers N]

Receivers, one after another in the same invocation, each freshly started:
  dicom-ai (receive only)  rules that claim every series with ``model: null``: no job runs
                           (both runs: ``--receivers N`` sets the node's ``node.receivers``)
  dicom-ai (+ ct-body)     the default rules: each series also goes to the built-in ct-body
                           model (1 worker) and its SEG and SR to a storescp; sampled until
                           all results are delivered
  storescp                 DCMTK's, as tests.peers starts it (no --fork: one association at a
                           time, the others wait in its listen queue)
  orthanc                  Debian's, default (synchronous) storage, no compression

The same files, and TCP_NODELAY=1 in the environment of every storescu and every DCMTK/Orthanc
receiver. The RSS (psutil, resident set size) of the receiver's process and all its
descendants is sampled every ``--interval`` seconds from the senders' start. A peak is the
largest *sum* over a group at one sample, not a sum of per-process peaks. The node's processes
are grouped as:
  receiving  the node's main process, plus any descendant that was ever seen holding a TCP
             socket on the node's DICOM port (listening or connected): receiver processes,
             however many there are
  workers    every other descendant: spawned model workers, multiprocessing helpers
RSS counts pages shared between processes once per process, so a sum over forked processes
overstates what they use together. The target (500 MB) applies to the node's receiving
processes; the total with idle or busy model workers is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.settle import settle
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, Orthanc, StoreSCP, node_config, wait_until

TARGET_MB = 500.0
MB = 1e6

RECEIVE_ONLY_RULES = """\
rules:
  - name: receive-only
    match: {Modality: {exists: true}}
    model: null
"""


@dataclass
class Sample:
    at: float  # seconds since the senders started
    receiving: int  # bytes
    workers: int
    processes: int


@dataclass
class Sampler:
    """Samples a process tree's RSS in a thread; ``receiving_port`` groups the processes."""

    root_pid: int
    interval: float
    receiving_port: int | None = None  # None: the whole tree is receiving
    samples: list[Sample] = field(default_factory=list)
    receiver_pids: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def __enter__(self) -> Sampler:
        self._t0 = time.perf_counter()
        self.sample()  # before the first byte: the idle figure
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _is_receiver(self, proc: psutil.Process) -> bool:
        if self.receiving_port is None or proc.pid in self.receiver_pids:
            return True
        try:
            connections = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        if any(c.laddr and c.laddr.port == self.receiving_port for c in connections):
            self.receiver_pids.add(proc.pid)
            return True
        return False

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            receiving = root.memory_info().rss
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        workers = 0
        for child in children:
            try:
                rss = child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if self._is_receiver(child):
                receiving += rss
            else:
                workers += rss
        at = time.perf_counter() - self._t0
        self.samples.append(Sample(at, receiving, workers, 1 + len(children)))

    def peak(self, what: Callable[[Sample], int], until: float | None = None) -> float:
        values = [what(s) for s in self.samples if until is None or s.at <= until]
        return max(values, default=0) / MB


@dataclass
class Result:
    name: str
    seconds: float  # all senders started -> the last one done
    images: int
    sampler: Sampler
    note: str = ""

    def row(self) -> str:
        s = self.sampler
        idle = s.samples[0].receiving + s.samples[0].workers if s.samples else 0
        receiving = s.peak(lambda x: x.receiving, until=self.seconds)
        workers = s.peak(lambda x: x.workers)
        total = s.peak(lambda x: x.receiving + x.workers)
        processes = max((x.processes for x in s.samples), default=0)
        every = s.samples[-1].at / max(len(s.samples) - 1, 1) if s.samples else 0.0
        return (
            f"{self.name:<24} {self.seconds:>6.1f} {self.images / self.seconds:>6.0f} "
            f"{idle / MB:>8.0f} {receiving:>10.0f} {workers:>8.0f} {total:>8.0f} {processes:>6}"
            f"  {every * 1000:>9.0f}  {self.note}"
        )


def _send_all(port: int, ae_title: str, series: Sequence[list[Path]], logs: Path) -> float:
    """All storescu started together, one series each; seconds until the last has finished."""
    env = dict(os.environ, TCP_NODELAY="1")
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    started = time.perf_counter()
    for n, files in enumerate(series):
        log = logs / f"storescu-{ae_title}-{n}.log"
        with log.open("wb") as out:
            command = ["storescu", "-R", "-aet", f"SCANNER{n}", "-aec", ae_title]
            procs.append(
                (
                    subprocess.Popen(
                        [*command, "127.0.0.1", str(port), *map(str, files)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    ),
                    log,
                )
            )
    for proc, log in procs:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(
                f"storescu to {ae_title} exited {proc.returncode}:\n{log.read_text()}"
            )
    return time.perf_counter() - started


@contextmanager
def _workdir(root: Path, name: str) -> Iterator[Path]:
    work = root / name
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~0.6 GB received per run


def _node(
    root: Path,
    series: Sequence[list[Path]],
    interval: float,
    pipeline: bool,
    receivers: int | None,
) -> Result:
    name = "dicom-ai (+ ct-body)" if pipeline else "dicom-ai (receive only)"
    overrides: dict[str, Any] = {} if receivers is None else {"node": {"receivers": receivers}}
    with _workdir(root, "pipeline" if pipeline else "receive") as work:
        pacs = StoreSCP(work / "pacs").start()
        try:
            if pipeline:
                # the default rules: CT -> ct-body
                config = node_config(work / "node", pacs.port, **overrides)
            else:
                rules = work / "rules.yaml"
                rules.write_text(RECEIVE_ONLY_RULES)
                config = node_config(work / "node", pacs.port, rules=rules, **overrides)
            node = NodeProcess(work / "node", config).start()
            try:
                assert node.proc is not None
                time.sleep(2.0)  # let the spawned workers finish importing: a steady idle figure
                with Sampler(node.proc.pid, interval, receiving_port=node.port) as sampler:
                    seconds = _send_all(node.port, "DICOM_AI", series, work)
                    note = f"{len(sampler.receiver_pids)} receiver child process(es)"
                    if pipeline:
                        wait_until(
                            lambda: len(pacs.files()) >= 2 * len(series),
                            900,
                            "every SEG and SR at the storescp",
                            0.5,
                        )
                        note += f"; results {sampler.samples[-1].at:.0f} s after the start"
                rows = node.index_rows("SELECT count(*) FROM instances")
                if rows != [(sum(len(s) for s in series),)]:
                    raise RuntimeError(f"the node indexed {rows} instances")
            finally:
                node.stop()
        finally:
            pacs.stop()
    return Result(name, seconds, sum(len(s) for s in series), sampler, note)


def _storescp(root: Path, series: Sequence[list[Path]], interval: float) -> Result:
    with _workdir(root, "storescp") as work:
        scp = StoreSCP(work / "out").start()
        try:
            assert scp.proc is not None
            with Sampler(scp.proc.pid, interval) as sampler:
                seconds = _send_all(scp.port, "PACS", series, work)
        finally:
            scp.stop()
    return Result("storescp", seconds, sum(len(s) for s in series), sampler, "one at a time")


def _orthanc(root: Path, series: Sequence[list[Path]], interval: float) -> Result:
    with _workdir(root, "orthanc") as work:
        orthanc = Orthanc(work).start(nodelay=True)
        try:
            assert orthanc.proc is not None
            with Sampler(orthanc.proc.pid, interval) as sampler:
                seconds = _send_all(orthanc.dicom_port, "ORTHANC", series, work)
        finally:
            orthanc.stop()
    return Result("orthanc", seconds, sum(len(s) for s in series), sampler)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.05, help="sampling period, s")
    parser.add_argument(
        "--no-pipeline", action="store_true", help="skip the node run with the ct-body model"
    )
    parser.add_argument(
        "--receivers", type=int, default=None, help="the node's node.receivers (default: unset)"
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dicom-ai-memory-"))
    try:
        series = [
            write_phantom_ct(root / f"ct{n}", PhantomSpec(slices=args.slices, seed=n + 1))
            for n in range(args.senders)
        ]
        megabytes = sum(f.stat().st_size for s in series for f in s) / MB
        print(settle(root / "probe"))
        print(
            f"{args.senders} concurrent storescu x {args.slices} CT slices 512x512 "
            f"({args.senders} series, {megabytes:.1f} MB); TCP_NODELAY=1 for senders and "
            f"receivers; RSS of the process tree every {args.interval * 1000:.0f} ms; "
            f"{psutil.cpu_count()} cores"
        )
        results = [_node(root, series, args.interval, False, args.receivers)]
        if not args.no_pipeline:
            results.append(_node(root, series, args.interval, True, args.receivers))
        results.append(_storescp(root, series, args.interval))
        results.append(_orthanc(root, series, args.interval))

        print(
            f"{'receiver':<24} {'wall s':>6} {'img/s':>6} {'idle MB':>8} "
            f"{'receiving':>10} {'workers':>8} {'total':>8} {'procs':>6}  {'ms/sample':>9}"
        )
        for result in results:
            print(result.row())
        print(
            "(wall s: all senders started -> last finished; idle MB: whole tree before the "
            "first byte; receiving: peak while receiving; workers and total: peak over the run; "
            "procs: most processes in the tree; ms/sample: the sampling period achieved)"
        )
        for result in results[: 1 if args.no_pipeline else 2]:
            peak = result.sampler.peak(lambda x: x.receiving, until=result.seconds)
            total = result.sampler.peak(lambda x: x.receiving + x.workers)
            verdict = "PASS" if peak < TARGET_MB else "FAIL"
            print(
                f"{result.name}: receiving processes' peak {peak:.0f} MB vs target "
                f"{TARGET_MB:.0f} MB: {verdict} (with model workers: {total:.0f} MB)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

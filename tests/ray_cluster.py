"""A real Ray cluster on loopback for tests and benchmarks: `ray start --block` per node,
each in a process group of its own, stopped (or killed) by that group's PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.markers import uses
from tests.peers import free_port, wait_until

RAY = Path(sys.executable).with_name("ray")


class RayNode:
    """One `ray start --block` (a head, or a node joining ``address``)."""

    def __init__(self, name: str, arguments: Sequence[str], log: Path) -> None:
        self.name = name
        self.arguments = list(arguments)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RayNode:
        uses("ray", "a Ray cluster")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", *self.arguments],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its raylet and workers: one group to kill
            env=env,
        )
        return self

    def kill(self) -> None:
        """Gone at once, as a machine that fails: every process of the node, SIGKILL."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for pid in _group(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        # Ray's worker processes start sessions of their own: without their raylet they
        # exit; wait for those of this node so the next start finds its ports free.
        wait_until(lambda: not _group(pgid), 30, f"ray node {self.name} to end", 0.2)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


class RayCluster:
    """A head (``--num-cpus`` 1, no custom resources) and, on demand, worker nodes with
    custom resources; every port ephemeral, Ray's files in a temporary folder."""

    def __init__(self, workdir: Path, head_cpus: int = 1) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # Ray's unix sockets live under its temp dir: a short path (sun_path is 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head_cpus = head_cpus
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []

    def _ports(self) -> list[str]:
        return [
            "--node-manager-port",
            str(free_port()),
            "--object-manager-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
        ]

    def start_head(self) -> RayNode:
        self.head = RayNode(
            "head",
            [
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--num-cpus",
                str(self.head_cpus),
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(free_port()),
                "--object-store-memory",
                str(400 << 20),
                "--temp-dir",
                str(self.temp_dir),
                *self._ports(),
            ],
            self.workdir / "head.log",
        ).start()
        wait_until(lambda: self.nodes() >= 1, 60, "the Ray head", 0.5)
        return self.head

    def start_worker(self, resources: dict[str, float], num_cpus: int = 2) -> RayNode:
        before = self.nodes()
        node = RayNode(
            f"worker{len(self.workers) + 1}",
            [
                "--address",
                self.address,
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(num_cpus),
                "--resources",
                json.dumps(resources),
                "--object-store-memory",
                str(400 << 20),
                *self._ports(),
            ],
            self.workdir / f"worker{len(self.workers) + 1}.log",
        ).start()
        self.workers.append(node)
        wait_until(lambda: self.nodes() > before, 60, "the Ray node to join", 0.5)
        return node

    def nodes(self) -> int:
        """Alive nodes, as the head's GCS counts them (0: no head to ask)."""
        return len(self.node_table(alive_only=True))

    def node_table(self, alive_only: bool = False) -> list[dict[str, Any]]:
        """Node id, alive and resources of each node the GCS knows, asked from a short-lived
        driver (a test process never connects to the cluster itself)."""
        script = (
            "import json, ray\n"
            f"ray.init(address={self.address!r}, log_to_driver=False, "
            "logging_level='ERROR', configure_logging=False)\n"
            "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], "
            "'resources': n['Resources']} for n in ray.nodes()]))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        if done.returncode != 0:
            return []
        nodes: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
        return [n for n in nodes if n["alive"]] if alive_only else nodes

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:
            node.kill()
        self.workers = []
        self.head = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

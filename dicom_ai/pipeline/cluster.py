"""The Ray executor's node side: `RayPool`, the scheduler's pool when pipeline.executor is ray.

The node stays the DICOM front and the only source of truth; a model's runs happen on a Ray
cluster. The Ray driver is not the node's process but a spawned child, the bridge
(`pipeline/ray_bridge.py`): Ray ends a driver's process when it loses the cluster's head,
and it must never end the node. The pool talks to the bridge through a pipe, as to a
worker: `JobSpec`s go out, `JobOutcome`s and `ClusterState`s come back. A bridge that dies
(the head lost, a crash) fails its jobs for another attempt and is started again; while the
cluster cannot be reached the pool takes no jobs, so they stay pending in the index and
receiving goes on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from dicom_ai.config import Config
from dicom_ai.pipeline.worker import JobOutcome, JobSpec, Prefetch, drain

__all__ = ["ClusterSettings", "ClusterState", "RayPool", "ReplicaSettings"]

log = logging.getLogger(__name__)

# While the cluster cannot be reached, the node says so once a minute.
UNREACHABLE_LOG_SECONDS = 60.0
# A bridge that ended is started again after this (it then probes the head every 2 s).
RESTART_SECONDS = 2.0


@dataclass(frozen=True)
class ReplicaSettings:
    """Where one model's replicas run: Ray resources per replica, and how many."""

    resources: dict[str, float] = field(default_factory=dict)
    replicas: int = 1
    bundle: Path | None = None  # None: a built-in model


@dataclass(frozen=True)
class ClusterSettings:
    address: str  # the GCS, host:port
    namespace: str
    models: dict[str, ReplicaSettings]

    @classmethod
    def from_config(cls, config: Config) -> ClusterSettings:
        return cls(
            config.pipeline.ray.address,
            config.pipeline.ray.namespace,
            {
                model_id: ReplicaSettings(
                    dict(config.model(model_id).resources),
                    config.model(model_id).replicas,
                    config.model(model_id).bundle,
                )
                for model_id in sorted(config.known_models())
            },
        )

    def capacity(self, max_concurrent: dict[str, int]) -> dict[str, int]:
        """Jobs of each model that may run at once: its replicas, or fewer
        (``max_concurrent``)."""
        return {
            model_id: min(model.replicas, max_concurrent.get(model_id, model.replicas))
            for model_id, model in self.models.items()
        }


@dataclass(frozen=True)
class ClusterState:
    """The bridge's word on the cluster: connected (``detail``: its nodes), or not (why)."""

    connected: bool
    detail: str


def _bridge_main(
    conn: Connection, settings: ClusterSettings, log_level: int, parent_pid: int
) -> None:
    """The bridge process's entry: ray is imported there, never in the node's process."""
    from dicom_ai.pipeline.ray_bridge import bridge_main

    bridge_main(conn, settings, log_level, parent_pid)


class RayPool:
    """The scheduler's `Pool` on a Ray cluster: jobs go to the bridge; ``idle`` is 0 while
    the cluster cannot be reached, else the replicas not running a job."""

    def __init__(self, settings: ClusterSettings, log_level: int = logging.INFO) -> None:
        self._settings = settings
        self._log_level = log_level
        self._context = multiprocessing.get_context("spawn")
        self._capacity = sum(model.replicas for model in settings.models.values())
        self._in_flight: dict[int, JobSpec] = {}
        self._state = ClusterState(False, "not connected yet")
        self._heard = False  # a state from a bridge: the first says at once if unreachable
        self._logged_at = -UNREACHABLE_LOG_SECONDS
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._start_at = 0.0
        self._start_bridge()

    @property
    def state(self) -> ClusterState:
        return self._state

    def _start_bridge(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_bridge_main,
            args=(child, self._settings, self._log_level, os.getpid()),
            name="dicom-ai-ray",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent

    def idle(self) -> int:
        if not self._state.connected or self._conn is None:
            return 0
        return max(0, self._capacity - len(self._in_flight))

    def submit(self, spec: JobSpec) -> None:
        if self._conn is None:
            raise RuntimeError("the Ray bridge is not running")
        self._in_flight[spec.job_id] = spec
        try:
            self._conn.send(spec)
        except OSError:  # it ended; poll reports the job back for another attempt
            log.debug("job %d: the Ray bridge had ended", spec.job_id)

    def prefetch(
        self, series_uid: str, paths: tuple[Path, ...], models: tuple[str, ...] = ()
    ) -> bool:
        """Send ``paths`` ahead to an idle replica of one of ``models`` (the bridge picks),
        which decodes them before the series' job comes; False while not connected."""
        if self._conn is None or not self._state.connected or not models:
            return False
        try:
            self._conn.send(Prefetch(series_uid, paths, models))
        except OSError:
            return False
        return True

    def poll(self, timeout: float = 0.0, wake: socket.socket | None = None) -> list[JobOutcome]:
        outcomes: list[JobOutcome] = []
        if self._conn is None:
            if time.monotonic() >= self._start_at:
                self._start_bridge()
            else:
                time.sleep(min(timeout, max(0.0, self._start_at - time.monotonic())))
                return outcomes
        assert self._conn is not None
        waiting: list[Connection | socket.socket] = [self._conn, *([wake] if wake else [])]
        for ready in wait(waiting, timeout):
            if ready is wake:
                drain(wake)
                continue
            try:
                while self._conn.poll():
                    self._take(self._conn.recv(), outcomes)
            except (EOFError, OSError):
                outcomes += self._bridge_ended()
                return outcomes
        if self._process is not None and not self._process.is_alive():
            outcomes += self._bridge_ended()
        self._say_unreachable()
        return outcomes

    def _take(self, message: object, outcomes: list[JobOutcome]) -> None:
        if isinstance(message, JobOutcome):
            if self._in_flight.pop(message.job_id, None) is not None:
                outcomes.append(message)  # (one already reported back is not again)
        elif isinstance(message, ClusterState):
            self._heard = True
            if message.connected and not self._state.connected:
                log.info("Ray cluster at %s connected: %s", self._settings.address, message.detail)
            elif self._state.connected and not message.connected:
                self._logged_at = -UNREACHABLE_LOG_SECONDS
            self._state = message

    def _say_unreachable(self) -> None:
        now = time.monotonic()
        if not self._heard or self._state.connected:
            return
        if now - self._logged_at < UNREACHABLE_LOG_SECONDS:
            return
        self._logged_at = now
        log.warning(
            "Ray cluster at %s unreachable (%s): jobs wait, receiving goes on",
            self._settings.address,
            self._state.detail,
        )

    def _bridge_ended(self) -> list[JobOutcome]:
        """The bridge is gone (the cluster's head lost, or a crash): its jobs go back for
        another attempt, and a fresh bridge starts after RESTART_SECONDS."""
        lost: list[JobOutcome] = []
        if self._conn is not None:
            # What it sent before it ended counts: a job done is not run again.
            with contextlib.suppress(EOFError, OSError):
                while self._conn.poll():
                    self._take(self._conn.recv(), lost)
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=5)
            code = self._process.exitcode
        else:
            code = None
        self._process, self._conn = None, None
        self._start_at = time.monotonic() + RESTART_SECONDS
        reason = f"the connection to the Ray cluster was lost (its driver exited with {code})"
        if self._state.connected:
            log.warning("Ray cluster at %s: %s", self._settings.address, reason)
        self._state = ClusterState(False, reason)
        lost += [JobOutcome(job_id, False, reason=reason, retry=True) for job_id in self._in_flight]
        self._in_flight.clear()
        return lost

    def shutdown(self) -> None:
        """The bridge disconnects (its replicas end with it); jobs in flight stay running
        in the index and run again at the next start, with the same result UIDs."""
        for job_id in self._in_flight:
            log.info("stopping: job %d interrupted, to run again at the next start", job_id)
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=3)

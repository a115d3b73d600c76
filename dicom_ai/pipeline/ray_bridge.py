"""The Ray driver (the bridge process) and the replicas it keeps on the cluster.

The only module that imports ray. It runs in a process of its own (`cluster.RayPool`
spawns it), never in the node's: Ray ends a driver's process when the cluster's head is
lost.

- Each model has ``replicas`` actors (`ModelReplica`), made at its first job and kept warm,
  placed by the model's ``resources``, restarted by Ray without limit (a node that died).
- A job's input files (the series, a study job's every role) are read here and put into
  Ray's object store as one buffer; the replica writes them into a temporary folder on its
  own cluster node and runs `worker.run_job` on them, as a local worker would. The model's
  bundle folder travels the same way once per replica: no filesystem is shared.
- The instances of a series still arriving go ahead to an idle replica of a model its
  rules run (`ModelReplica.prefetch`), decoded into its arena; its job then carries only
  what that replica lacks (all of it again if the replica restarted: `MissingInput`).
- The replica returns the encoded result files; the bridge writes them into the job's
  results folder (fsynced) and reports a `JobOutcome` naming the cluster node.
- A replica that dies under a job (its node gone): the job goes back for another attempt
  (``retry``), to a replica Ray restarts where the resources are. A job past its timeout:
  its replica is killed (and restarted), the job fails.
- The head unreachable: the bridge probes its port every `PROBE_SECONDS` and says so; once
  connected, losing the head ends this process (Ray's doing, after
  ``RAY_gcs_rpc_server_reconnect_timeout_s``), and the pool starts another.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Read by the driver's core worker at ray.init: a lost head ends this process in seconds
# rather than a minute, and the pool's next bridge waits for the head to come back.
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "10")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from dicom_ai.pipeline.cluster import ClusterSettings, ClusterState, ReplicaSettings
from dicom_ai.pipeline.worker import (
    JobOutcome,
    JobSpec,
    LoadedModels,
    Prefetch,
    new_arena,
    run_job,
)

if TYPE_CHECKING:
    from dicom_ai.inference.arena import PrefetchArena

__all__ = ["ModelReplica", "bridge_main"]

log = logging.getLogger(__name__)

_ray: Any = ray  # for Ray's functions that carry no annotations

PROBE_SECONDS = 2.0
# A replica's readiness is asked again this long after an answer that it is unavailable
# (Ray says so until it has noticed that the replica's node died).
REPING_SECONDS = 1.0
_ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory")


@dataclass(frozen=True)
class JobInput:
    """A job's instance files as one buffer: file k is ``data[offsets[k]:offsets[k+1]]``."""

    paths: tuple[Path, ...]
    offsets: tuple[int, ...]
    data: np.ndarray[Any, np.dtype[np.uint8]]

    @classmethod
    def read(cls, paths: tuple[Path, ...]) -> JobInput:
        sizes = [path.stat().st_size for path in paths]
        offsets = (0, *np.cumsum(sizes, dtype=np.int64).tolist())
        data = np.empty(offsets[-1], np.uint8)
        for path, start, end in zip(paths, offsets, offsets[1:], strict=False):
            with path.open("rb") as file:
                if file.readinto(data.data[start:end]) != end - start:
                    raise OSError(f"{path} changed while it was read")
        return cls(paths, offsets, data)

    def write(self, folder: Path, first: int = 0) -> dict[Path, Path]:
        """The files under ``folder``, numbered from ``first``; returns where each original
        path now lies."""
        folder.mkdir(parents=True, exist_ok=True)
        placed = {}
        for k, (path, start, end) in enumerate(
            zip(self.paths, self.offsets, self.offsets[1:], strict=False), start=first
        ):
            local = folder / f"{k:06d}.dcm"
            local.write_bytes(self.data.data[start:end])
            placed[path] = local
        return placed


def _packed(folder: Path | None) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    """A bundle folder as an uncompressed tar (weights do not compress)."""
    if folder is None:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname="bundle")
    return np.frombuffer(buffer.getbuffer(), np.uint8).copy()


class MissingInput(Exception):
    """A job counted on instances sent ahead that its replica no longer holds (restarted
    since): the bridge sends the job again with all of them."""


class ReplicaBroken(Exception):
    """The replica could not be set up on its cluster node; every job it gets fails so."""


class ModelReplica:
    """One warm copy of a model on a cluster node (a Ray actor). Instances of a series
    still arriving are sent ahead (`prefetch`) and decoded into its arena, as a local
    worker's, so its job starts with them loaded."""

    def __init__(self, bundle: np.ndarray[Any, np.dtype[np.uint8]] | None) -> None:
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
        logging.getLogger("highdicom").setLevel(logging.WARNING)
        self._folder = _replica_folder()
        self._bundle: Path | None = None
        # Why it cannot run jobs; said by each job. Not raised here: Ray would restart a
        # replica whose constructor fails, again and again, while its jobs wait.
        self._broken: str | None = None
        if bundle is not None:
            try:
                with tarfile.open(fileobj=io.BytesIO(bundle.tobytes()), mode="r") as tar:
                    tar.extractall(self._folder, filter="data")
            except Exception as exc:  # a link out of the bundle, a full disk, ...
                self._broken = f"its bundle does not unpack here: {type(exc).__name__}: {exc}"
            self._bundle = self._folder / "bundle"
        self._models = LoadedModels(keep=1)
        self._arena: PrefetchArena | None = None
        self._prefetched: dict[Path, Path] = {}  # the node's path -> the file here
        self._written = 0

    def prefetch(self, job_input: JobInput) -> int:
        """Keep and decode instances ahead of their job; how many were decoded."""
        if self._broken is not None:
            return 0
        if self._arena is None:
            self._arena = new_arena()
        placed = job_input.write(self._folder / "prefetch", self._written)
        self._written += len(placed)
        self._prefetched.update(placed)
        return self._arena.prefetch(list(placed.values()))

    def where(self) -> str:
        """This cluster node's id."""
        return str(ray.get_runtime_context().get_node_id())

    def run(
        self, spec: JobSpec, job_input: JobInput
    ) -> tuple[str, list[tuple[str, bytes]], dict[str, float]]:
        """Run one job on its input; the result files' names and bytes, and its stages."""
        if self._broken is not None:
            raise ReplicaBroken(self._broken)
        job_folder = Path(tempfile.mkdtemp(prefix=f"job-{spec.job_id}-", dir=self._folder))
        try:
            placed = {**self._prefetched, **job_input.write(job_folder / "input")}
            missing = [p for p in _inputs(spec) if p not in placed]
            if missing:
                raise MissingInput(f"{len(missing)} instance(s) sent ahead are not here")
            if self._arena is None:
                self._arena = new_arena()
            local = replace(
                spec,
                bundle=self._bundle if spec.bundle is not None else None,
                python=None,
                instance_paths=tuple(placed[p] for p in spec.instance_paths),
                roles=tuple(
                    replace(role, instance_paths=tuple(placed[p] for p in role.instance_paths))
                    for role in spec.roles
                ),
                results_dir=job_folder / "spool" / "results" / str(spec.job_id),
                min_free_bytes=0,
            )
            stages: dict[str, float] = {}
            files = run_job(local, self._arena, self._models, stages)
            return self.where(), [(path.name, path.read_bytes()) for path in files], stages
        finally:
            shutil.rmtree(job_folder, ignore_errors=True)
            # What was sent ahead is this job's or superseded by it (the bridge forgets it
            # too when it sends a job).
            for path in self._prefetched.values():
                path.unlink(missing_ok=True)
            self._prefetched.clear()


def _inputs(spec: JobSpec) -> tuple[Path, ...]:
    """Every instance file a job reads (a study job's every role), once."""
    paths = (*spec.instance_paths, *(p for r in spec.roles for p in r.instance_paths))
    return tuple(dict.fromkeys(paths))


REPLICA_FOLDER_PREFIX = "dicom-ai-replica-"


def _replica_folder() -> Path:
    """A temporary folder of this replica's own, named by its process id. The folders of
    replicas whose processes are gone go first: a replica killed with its node, by a
    timeout or at the driver's end cannot remove its bundle copy, and every restart would
    leave one more."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{REPLICA_FOLDER_PREFIX}*"):
        pid = replica_pid(folder)
        if pid is not None and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{REPLICA_FOLDER_PREFIX}{os.getpid()}-", dir=root))


def replica_pid(folder: Path) -> int | None:
    """The process id in a replica folder's name; None for any other name."""
    if not folder.name.startswith(REPLICA_FOLDER_PREFIX):
        return None
    pid, dash, _ = folder.name.removeprefix(REPLICA_FOLDER_PREFIX).partition("-")
    return int(pid) if dash and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class _Replica:
    model_id: str
    actor: Any  # a ray.actor.ActorHandle of ModelReplica
    ready: Any | None = None  # the ObjectRef of where(), while it is asked
    node: str | None = None  # known once it answered: it is alive
    reping_at: float = 0.0
    job: JobSpec | None = None
    result: Any | None = None  # the ObjectRef of run()
    deadline: float = 0.0
    # Instances sent ahead (the node's paths), and the ObjectRefs of those prefetch() calls.
    prefetched: set[Path] = field(default_factory=set)
    prefetches: list[Any] = field(default_factory=list)
    series: str | None = None  # the series whose instances it was sent last


@dataclass
class _Model:
    settings: ReplicaSettings
    # Held while its replicas live: Ray restarts a replica from its constructor's arguments.
    bundle: Any | None = None
    replicas: list[_Replica] = field(default_factory=list)
    queue: deque[JobSpec] = field(default_factory=deque)


class _Bridge:
    def __init__(self, conn: Connection, settings: ClusterSettings) -> None:
        self._conn = conn
        self._settings = settings
        self._models: dict[str, _Model] = {}
        self._queue: deque[JobSpec] = deque()  # received before the cluster was reached
        self._actor_class: Any = ray.remote(max_restarts=-1, max_task_retries=0)(ModelReplica)
        self._addresses: dict[str, str] = {}  # node id -> its address, from the GCS

    def run(self) -> None:
        while not self._connect():
            if not self._receive(PROBE_SECONDS):
                return
        self._send(ClusterState(True, self._describe()))
        for spec in self._queue:
            self._enqueue(spec)
        self._queue.clear()
        while self._receive(0.0):
            self._dispatch()
            self._collect(timeout=0.05)
            self._check_timeouts()
        ray.shutdown()

    # -- the cluster ---------------------------------------------------------------------

    def _connect(self) -> bool:
        host, _, port = self._settings.address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS):
                pass
        except OSError as exc:
            self._send(ClusterState(False, f"{self._settings.address}: {exc.strerror or exc}"))
            return False
        try:
            ray.init(
                address=self._settings.address,
                namespace=self._settings.namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except Exception as exc:  # Ray's own errors: ConnectionError, RuntimeError, ...
            ray.shutdown()
            self._send(ClusterState(False, f"{type(exc).__name__}: {exc}"))
            return False
        return True

    def _describe(self) -> str:
        nodes = [node for node in _ray.nodes() if node.get("Alive")]
        return f"{len(nodes)} node(s), resources {_ray.cluster_resources()}"

    def _label(self, node_id: str) -> str:
        """A cluster node as the node's status and logs name it: "<node id> (<address>)"."""
        if node_id not in self._addresses:
            try:
                for node in _ray.nodes():
                    address = str(node.get("NodeManagerAddress", "?"))
                    self._addresses[str(node["NodeID"])] = address
            except Exception as exc:  # the GCS in trouble: the id alone says enough
                log.debug("no node table: %s", exc)
        return f"{node_id} ({self._addresses.get(node_id, '?')})"

    def _send(self, message: ClusterState | JobOutcome) -> None:
        self._conn.send(message)

    def _receive(self, timeout: float) -> bool:
        """Take the node's messages; False at the stop (or when the node is gone)."""
        while True:
            try:
                if not self._conn.poll(timeout):
                    return True
                message = self._conn.recv()
            except (EOFError, OSError):
                return False
            timeout = 0.0
            if message is None:
                return False
            if isinstance(message, Prefetch):
                if ray.is_initialized():
                    self._prefetch(message)
            elif ray.is_initialized():
                self._enqueue(message)
            else:
                self._queue.append(message)

    # -- jobs ----------------------------------------------------------------------------

    def _enqueue(self, spec: JobSpec) -> None:
        if spec.python is not None and spec.model_id not in self._models:
            log.info(
                "model %s: its prepared environment is not used on the cluster; its replicas "
                "run on the cluster nodes' Python",
                spec.model_id,
            )
        try:
            model = self._model(spec.model_id)
        except Exception as exc:  # Ray refused the options, the bundle would not pack, ...
            reason = f"the model's replicas cannot be made: {type(exc).__name__}: {exc}"
            log.warning("model %s: %s", spec.model_id, reason)
            self._send(JobOutcome(spec.job_id, False, reason=reason))
            return
        model.queue.append(spec)

    def _model(self, model_id: str) -> _Model:
        """The model's replicas, made at its first job or prefetch: placed by its
        resources, its bundle sent with them."""
        model = self._models.get(model_id)
        if model is not None:
            return model
        settings = self._settings.models.get(model_id, ReplicaSettings())
        model = _Model(settings)
        resources = dict(model.settings.resources)
        options: dict[str, Any] = {
            name: resources.pop(name) for name in _ACTOR_OPTIONS if name in resources
        }
        options["resources"] = resources
        model.bundle = ray.put(_packed(model.settings.bundle))
        for _ in range(model.settings.replicas):
            actor = self._actor_class.options(**options).remote(model.bundle)
            replica = _Replica(model_id, actor)
            replica.ready = actor.where.remote()
            model.replicas.append(replica)
        self._models[model_id] = model  # once whole: a failure above leaves no half model
        return model

    def _prefetch(self, request: Prefetch) -> None:
        """Send arriving instances to an idle replica of a model their rules run (one that
        has the series' earlier instances first); none idle: the job sends them."""
        for model_id in request.models:
            try:
                replicas = self._model(model_id).replicas
            except Exception:  # its job will say why
                continue
            idle = [r for r in replicas if r.node and r.job is None]
            if not idle:
                continue
            replica = max(idle, key=lambda r: r.series == request.series_instance_uid)
            new = tuple(p for p in request.instance_paths if p not in replica.prefetched)
            try:
                job_input = JobInput.read(new)
            except OSError:
                return  # best effort: the job sends what is not here
            replica.prefetches.append(replica.actor.prefetch.remote(job_input))
            replica.prefetched.update(new)
            replica.series = request.series_instance_uid
            return

    def _dispatch(self) -> None:
        for model in self._models.values():
            for replica in model.replicas:
                due = time.monotonic() >= replica.reping_at
                if replica.node is None and replica.ready is None and due:
                    replica.ready = replica.actor.where.remote()
            while model.queue:
                idle = [r for r in model.replicas if r.node is not None and r.job is None]
                if not idle:
                    break
                spec = model.queue.popleft()
                needed = _inputs(spec)
                # The replica that has the most of its input already.
                replica = max(idle, key=lambda r: len(r.prefetched.intersection(needed)))
                try:
                    job_input = JobInput.read(
                        tuple(p for p in needed if p not in replica.prefetched)
                    )
                except OSError as exc:
                    self._send(JobOutcome(spec.job_id, False, reason=f"input: {exc}"))
                    continue
                replica.prefetched.clear()
                replica.job = spec
                replica.result = replica.actor.run.remote(spec, job_input)
                replica.deadline = time.monotonic() + spec.timeout_seconds

    def _collect(self, timeout: float) -> None:
        replicas = [r for m in self._models.values() for r in m.replicas]
        waiting = {r.ready: r for r in replicas if r.ready is not None}
        waiting.update({r.result: r for r in replicas if r.result is not None})
        waiting.update({ref: r for r in replicas for ref in r.prefetches})
        if not waiting:
            time.sleep(timeout)
            return
        done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=timeout)
        for ref in done:
            replica = waiting[ref]
            if ref == replica.ready:
                self._answered(replica)
            elif ref == replica.result:
                self._finished(replica)
            elif ref in replica.prefetches:
                self._prefetched(replica, ref)
            # else: its model's replicas were given up (_unplaceable) meanwhile

    def _prefetched(self, replica: _Replica, ref: Any) -> None:
        replica.prefetches.remove(ref)
        try:
            ray.get(ref)
        except RayTaskError as exc:
            # Best effort: its job sends what the replica does not have (MissingInput).
            log.debug("model %s: prefetch failed: %s", replica.model_id, exc)
        except RayError as exc:  # the replica is gone: ask for it again before a job
            log.debug("model %s: prefetch lost with its replica: %s", replica.model_id, exc)
            replica.node, replica.reping_at = None, time.monotonic() + REPING_SECONDS
            replica.prefetched.clear()

    def _answered(self, replica: _Replica) -> None:
        ref: Any = replica.ready
        replica.ready = None
        try:
            replica.node = self._label(str(ray.get(ref)))
            log.info("model %s: a replica is ready on %s", replica.model_id, replica.node)
        except RayActorError as exc:
            if exc.actor_init_failed:  # it can never start: its jobs fail with the reason
                self._unplaceable(replica.model_id, exc)
                return
            replica.node = None
            replica.reping_at = time.monotonic() + REPING_SECONDS
            log.debug("model %s: replica not ready: %s", replica.model_id, exc)
        except RayError as exc:  # Ray's others (a lost object, the GCS): ask again
            replica.node = None
            replica.reping_at = time.monotonic() + REPING_SECONDS
            log.debug("model %s: replica not ready: %s", replica.model_id, exc)

    def _unplaceable(self, model_id: str, exc: BaseException) -> None:
        """A replica of ``model_id`` failed in its constructor (dicom-ai missing on the
        cluster node, a bundle that does not unpack): its queued and running jobs fail with
        the reason, and the next job tries a fresh set of replicas."""
        model = self._models.pop(model_id)
        reason = f"the model's replica could not start on the cluster: {exc}"
        log.warning("model %s: %s", model_id, reason)
        jobs = [*model.queue, *(r.job for r in model.replicas if r.job is not None)]
        for spec in jobs:
            self._send(JobOutcome(spec.job_id, False, reason=reason))
        for replica in model.replicas:
            replica.job, replica.result, replica.ready, replica.prefetches = None, None, None, []
            _ray.kill(replica.actor, no_restart=True)

    def _finished(self, replica: _Replica) -> None:
        ref: Any = replica.result
        spec = replica.job
        assert spec is not None
        replica.result, replica.job = None, None
        started = replica.deadline - spec.timeout_seconds
        try:
            node_id, files, stages = ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, MissingInput):  # restarted since: all of it again
                self._models[spec.model_id].queue.appendleft(spec)
                return
            # The model raised: another attempt would only repeat it.
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            reason = f"{type(cause).__name__}: {cause}"
            if isinstance(cause, ReplicaBroken):
                reason = f"the model's replica could not start on the cluster: {cause}"
            log.debug("job %d failed on the cluster:\n%s", spec.job_id, exc)
            self._send(JobOutcome(spec.job_id, False, reason=reason, ran_on=replica.node or ""))
            return
        except RayError as exc:
            # Its replica died (its cluster node gone, its memory), or its results were lost
            # with their node: Ray restarts the replica where the resources are; the job
            # runs again there.
            where = replica.node or ""
            replica.node, replica.reping_at = None, time.monotonic() + REPING_SECONDS
            replica.prefetched.clear()
            self._send(
                JobOutcome(
                    spec.job_id,
                    False,
                    reason=f"its replica on cluster node {where or '?'} was lost: "
                    f"{type(exc).__name__}",
                    retry=True,
                    ran_on=where,
                )
            )
            return
        try:
            paths = _write_results(spec, files)
        except Exception as exc:  # the node's disk: StorageError, OutOfSpaceError
            reason = f"{type(exc).__name__}: {exc}"
            self._send(JobOutcome(spec.job_id, False, reason=reason, ran_on=replica.node or ""))
            return
        self._send(
            JobOutcome(
                spec.job_id,
                True,
                paths,
                seconds=time.monotonic() - started,
                stages=tuple(stages.items()),
                ran_on=self._label(node_id),
            )
        )

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for model in self._models.values():
            for replica in model.replicas:
                spec = replica.job
                if spec is None or now <= replica.deadline:
                    continue
                ray.kill(replica.actor, no_restart=False)
                where = replica.node or ""
                replica.job, replica.result, replica.node = None, None, None
                replica.reping_at = now + REPING_SECONDS
                replica.prefetched.clear()
                self._send(
                    JobOutcome(
                        spec.job_id,
                        False,
                        reason=f"the model ran past its timeout of {spec.timeout_seconds:g} s",
                        ran_on=where,
                    )
                )


def _write_results(spec: JobSpec, files: list[tuple[str, bytes]]) -> tuple[Path, ...]:
    from dicom_ai.store.spool import Spool

    spool = Spool(spec.results_dir.parent.parent, spec.min_free_bytes)
    paths = []
    for name, data in files:
        path = spec.results_dir / Path(name).name
        spool.write_atomic(path, data)
        paths.append(path)
    return tuple(paths)


def bridge_main(
    conn: Connection, settings: ClusterSettings, log_level: int, parent_pid: int
) -> None:
    from dicom_ai.lifecycle import die_with_parent

    die_with_parent(parent_pid)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _Bridge(conn, settings).run()
    except Exception:
        log.error("the Ray bridge failed:\n%s", traceback.format_exc())
        raise

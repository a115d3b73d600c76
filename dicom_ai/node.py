"""The running node: wires receive -> store -> assembly -> routing -> workers -> delivery.

This is the composition root; each stage stays ignorant of the ones before it, and the
policy lives in the stages: recovery at start (recovery.py), the rules and their reload
(routing), completeness and early start (assembly.py), one scheduling round
(pipeline/scheduler.py), delivery (pipeline/delivery.py). Besides the receiving threads (an
accept loop per port, one thread per association), two threads: the scheduler, which runs
`Scheduler.step` in a loop, and the deliverer (sending can block on a slow peer, and must
not hold up the scheduler); with ``webhooks`` configured, a third sends the events
(pipeline/webhooks.py), with its own waits, so a slow receiver holds up neither. The
retention policy runs in a process of its own (cleaner.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

from dicom_ai.assembly import AssemblyPolicy
from dicom_ai.cleaner import Cleaner
from dicom_ai.config import SENDER, Config
from dicom_ai.errors import ConfigError
from dicom_ai.lifecycle import wait_for_stop
from dicom_ai.pipeline.cluster import ClusterSettings, RayPool
from dicom_ai.pipeline.delivery import Deliverer
from dicom_ai.pipeline.health import ModelHealth
from dicom_ai.pipeline.scheduler import JobSpecs, Scheduler
from dicom_ai.pipeline.webhooks import WebhookSender
from dicom_ai.pipeline.worker import WorkerPool
from dicom_ai.receivers import ReceiverProcesses, access_policy, make_scp, open_store
from dicom_ai.recovery import orphan_called_ae, recover
from dicom_ai.routing import LiveRules, RuleSet
from dicom_ai.web.server import WebServer

__all__ = ["Node", "access_policy", "check_rules_against_config"]

log = logging.getLogger(__name__)


def check_rules_against_config(rules: RuleSet, config: Config, source: Path) -> None:
    """Every model and destination a rule names must exist in the config."""
    unknown_models = sorted(m for m in rules.models if m not in config.known_models())
    unknown_destinations = sorted(d for d in rules.destinations if not config.has_destination(d))
    problems = []
    if unknown_models:
        problems.append(f"unknown model(s) {', '.join(unknown_models)}")
    if unknown_destinations:
        problems.append(f"unknown destination(s) {', '.join(unknown_destinations)}")
    if problems:
        raise ConfigError(f"{source}: rules name {'; '.join(problems)}")


class Node:
    """Builds every stage from the config and runs them: receivers, the scheduler thread
    and the deliverer thread. Policy lives in the stages; this only wires them."""

    def __init__(self, config: Config, log_level: int = logging.INFO) -> None:
        self.config = config
        self.spool, self.index = open_store(config)
        self.rules = LiveRules(
            {title: called.rules for title, called in config.called_ae_table().items()},
            check=lambda rules, path: check_rules_against_config(rules, config, path),
        )
        uses_sender = any(SENDER in r.destinations for r in self.rules.by_called_ae().values())
        if uses_sender and not config.senders:
            log.warning("rules send to %r but no senders are configured", SENDER)
        if config.node.tls and config.node.port is not None:
            plain = [t for t, c in config.called_ae_table().items() if not c.require_tls]
            if plain:
                log.warning(
                    "TLS is on, but %s also answer on plain port %d (require_tls, or port: null)",
                    ", ".join(plain),
                    config.node.port,
                )
        self.assembly = AssemblyPolicy(
            config.pipeline.quiet_seconds,
            config.pipeline.release_grace_seconds,
            config.pipeline.early_start,
        )
        self._receivers = ReceiverProcesses(config, config.node.receivers - 1, log_level)
        self.scp = make_scp(
            config,
            self.spool,
            self.index,
            port=config.node.port,
            tls_port=None,
            shared_limit=self._receivers.shared_limit,
        )
        # A released association wakes the scheduler (its series may be complete now).
        self._wake, self._waker = socket.socketpair()
        for end in (self._wake, self._waker):
            end.setblocking(False)
        self.scp.on_association_ended = self._wake_scheduler
        self.deliverer = Deliverer(
            self.index,
            config.destinations,
            config.node.ae_title,
            config.delivery,
            senders=config.senders,
        )
        self.webhooks = WebhookSender(self.index, config.webhooks) if config.webhooks else None
        self.cleaner = Cleaner(config, log_level)
        self._log_level = log_level
        # The bundles' start-time checks: run in the background once the SCP listens.
        self.health = ModelHealth(config, record=self.index.record_model_check)
        # The operator's console (web.enabled): its own process, on a socket bound here.
        self.web = WebServer(config, log_level) if config.web.enabled else None
        self._pool: WorkerPool | RayPool | None = None
        self.scheduler: Scheduler | None = None
        self._stop = threading.Event()
        self._deliver_now = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int | None:
        return self.scp.port

    @property
    def tls_port(self) -> int | None:
        return self.scp.tls_port

    def start(self) -> None:
        if self.web is not None:
            web = self.config.web
            try:
                self.web.bind()
            except OSError as exc:
                raise ConfigError(
                    f"console: cannot listen on {web.host}:{web.port}: "
                    f"{exc.strerror or exc} (web.port, or web.enabled: false)"
                ) from exc
        titles = list(self.config.called_ae_table())
        recover(self.spool, self.index, orphan_called_ae(titles, self.config.node.ae_title))
        pipeline = self.config.pipeline
        max_concurrent = {
            name: model.max_concurrent
            for name, model in self.config.models.items()
            if model.max_concurrent is not None
        }
        if pipeline.executor == "ray":
            # The models run on the cluster's nodes: their replicas bound each model's jobs,
            # and this machine's checks of them say nothing of the cluster's.
            cluster = ClusterSettings.from_config(self.config)
            self._pool = RayPool(cluster, self._log_level)
            max_concurrent = cluster.capacity(max_concurrent)
            specs = JobSpecs(self.config, self.spool)
            health: ModelHealth | None = None
        else:
            self._pool = WorkerPool(
                pipeline.workers,
                self._log_level,
                pipeline.warm_memory_mb << 20,
                warm_models=pipeline.warm_models,
            )
            specs = JobSpecs(self.config, self.spool, python=self.health.python)
            health = self.health
        self.scheduler = Scheduler(
            self.index,
            self._pool,
            self.rules,
            self.assembly,
            specs,
            pipeline.max_job_attempts,
            results_ready=self._deliver_now.set,
            wake=self._wake,
            health=health,
            max_concurrent=max_concurrent,
        )
        self.scp.start()
        if health is not None:  # on a cluster, this machine's checks would say nothing
            self.health.start()
        if self.web is not None:
            self.web.start()
            log.info("console on %s", self.web.url)
        if self.config.node.receivers > 1:
            self._receivers.start(self.scp.listening())
        if self.web is not None:
            self.web.wait_ready()
        # After recovery (its sweep finishes interrupted purges before anything else runs).
        self.cleaner.start()
        loops = [(self._schedule_loop, "scheduler"), (self._deliver_loop, "deliverer")]
        if self.webhooks is not None:
            loops.append((self._webhook_loop, "webhooks"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"dicom-ai-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._deliver_now.set()
        self._receivers.stop()
        self.cleaner.stop()
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        self.health.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown()
        if self.webhooks is not None:
            self.webhooks.close()
        self.index.close()
        self._wake.close()
        self._waker.close()

    def _wake_scheduler(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: woken already, not yet read
            self._waker.send(b"\0")

    def request_stop(self) -> None:
        """Safe from a signal handler: the caller of ``wait`` then calls ``stop``."""
        self._stop.set()

    def wait(self) -> None:
        wait_for_stop(self._stop)

    def _schedule_loop(self) -> None:
        assert self.scheduler is not None
        while not self._stop.is_set():
            try:
                self.scheduler.step(time.time(), wait=0.1)
            except Exception:
                log.exception("scheduler step failed; continuing")
                self._stop.wait(1.0)

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            # Results go out as soon as a job records them; the timeout paces retries.
            self._deliver_now.wait(0.2)
            self._deliver_now.clear()
            try:
                self.deliverer.run_due()
            except Exception:
                log.exception("delivery step failed; continuing")
                self._stop.wait(1.0)

    def _webhook_loop(self) -> None:
        assert self.webhooks is not None
        while not self._stop.is_set():
            # Its own thread and waits: a receiver that is slow or down holds up nothing else.
            try:
                wait = self.webhooks.run_due(time.time())
            except Exception:  # run_due logs and goes on; this is the last guard
                log.exception("webhook step failed; continuing")
                wait = 1.0
            self._stop.wait(min(wait, 1.0))

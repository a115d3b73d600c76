"""The receiving side of the node: its storage SCP, and extra receiver processes.

One process runs every association on its own thread, and its Python work (PDU handling,
header parsing, indexing) holds one interpreter lock. With ``node.receivers: N`` the node
starts N - 1 receiver processes beside its own SCP; all of them accept on the node's
listening socket(s), passed to them at spawn, whichever acceptor runs (``node.acceptor``).
A new connection wakes every process and the first to accept takes it; a process already
holding connections waits a little before it accepts (``dimse.transport``), so an idler
one takes it first (SO_REUSEPORT hashes the addresses instead, which can pile concurrent
senders onto one process). Each receiver has its own spool writer and its own connection
to the SQLite index (WAL, so the processes share it safely); fsync before Success holds in
every one of them. ``node.max_associations`` counts them all (a semaphore shared at
spawn). The node logs that it is ready once its receivers listen; its own port opens
before that.

A receiver dies with the node: it asks the kernel for SIGKILL when its parent exits
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the node leaves no orphan on the port.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from dicom_ai.config import Config
from dicom_ai.dimse.scp import AccessPolicy, CalledAE, Listening, StorageSCP
from dicom_ai.dimse.service import SharedLimit
from dicom_ai.dimse.tls import server_context
from dicom_ai.lifecycle import die_with_parent, wait_for_stop
from dicom_ai.store.index import Index
from dicom_ai.store.spool import Spool

__all__ = ["ReceiverProcesses", "access_policy", "make_scp", "open_store"]

log = logging.getLogger(__name__)


def access_policy(config: Config) -> AccessPolicy:
    """Who may call which of the node's AE titles, from the config."""
    return AccessPolicy(
        {
            title: CalledAE(
                title,
                frozenset(called.allowed_calling_aes),
                tuple(called.allowed_addresses),
                called.require_tls,
            )
            for title, called in config.called_ae_table().items()
        }
    )


def open_store(config: Config) -> tuple[Spool, Index]:
    """The spool and the index under the config's data directory."""
    data_dir = config.node.data_dir
    spool = Spool(data_dir / "spool", config.node.min_free_bytes)
    return spool, Index(data_dir / "index.sqlite3")


def make_scp(
    config: Config,
    spool: Spool,
    index: Index,
    *,
    port: int | None,
    tls_port: int | None,
    shared_limit: SharedLimit | None = None,
) -> StorageSCP:
    """The storage SCP of the config, listening on ``port`` / ``tls_port``; with
    ``shared_limit``, ``max_associations`` counts the receiver processes' too."""
    tls = config.node.tls
    return StorageSCP(
        config.node.ae_title,
        config.node.host,
        port,
        spool,
        index,
        config.node.max_associations,
        access=access_policy(config),
        tls=(tls_port if tls_port is not None else tls.port, server_context(tls)) if tls else None,
        network_timeout=config.node.network_timeout_seconds,
        acse_timeout=config.node.acse_timeout_seconds,
        shared_limit=shared_limit,
        acceptor=config.node.acceptor,
    )


class ReceiverProcesses:
    """``count`` spawned receivers listening on the ports the node's own SCP bound.
    ``shared_limit`` counts open associations across them and the node's own SCP."""

    def __init__(self, config: Config, count: int, log_level: int = logging.INFO) -> None:
        self._config = config
        self._count = count
        self._log_level = log_level
        self._processes: list[BaseProcess] = []
        self._context = multiprocessing.get_context("spawn")
        self.shared_limit: SharedLimit | None = (
            self._context.BoundedSemaphore(config.node.max_associations) if count else None
        )

    def start(self, shared: Listening) -> None:
        ready = [self._context.Event() for _ in range(self._count)]
        for n, event in enumerate(ready, start=1):
            process = self._context.Process(
                target=_receiver_main,
                args=(
                    self._config,
                    shared,
                    self.shared_limit,
                    self._log_level,
                    os.getpid(),
                    event,
                ),
                name=f"dicom-ai-receiver-{n}",
                daemon=True,
            )
            process.start()
            self._processes.append(process)
        for started, event in zip(self._processes, ready, strict=True):
            # Listening before the node says it is ready: no association waits on a spawn.
            if not event.wait(60) and started.is_alive():
                log.warning("receiver %s is slow to start", started.name)
        alive = sum(1 for p in self._processes if p.is_alive())
        log.info("%d receiver process(es) besides the node's own", alive)

    def stop(self) -> None:
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self._processes.clear()


def _receiver_main(
    config: Config,
    shared: Listening,
    shared_limit: SharedLimit | None,
    log_level: int,
    parent_pid: int,
    ready: EventType,
) -> None:
    die_with_parent(parent_pid)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us
    spool, index = open_store(config)
    port, tls_port = (
        None if sock is None else int(sock.getsockname()[1]) for sock in (shared.plain, shared.tls)
    )
    scp = make_scp(config, spool, index, port=port, tls_port=tls_port, shared_limit=shared_limit)
    scp.start(shared)
    ready.set()
    try:
        wait_for_stop(stop)
    finally:
        scp.stop()
        index.close()

"""Several receiver processes on one port (node.receivers), with real DCMTK senders."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from pynetdicom import AE

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, echoscu, node_config, storescu, wait_until

pytestmark = [pytest.mark.dcmtk]

RECEIVERS = 3


def _receiver_children(node: NodeProcess) -> list[psutil.Process]:
    assert node.proc is not None
    children = psutil.Process(node.proc.pid).children()
    # Receivers listen on the node's port; model workers do not.
    return [
        child
        for child in children
        if any(c.laddr and c.laddr.port == node.port for c in child.net_connections("tcp"))
    ]


def _accepted(node: NodeProcess) -> list[int]:
    """Per process (the node, then its receivers): connections it accepted on the port."""
    assert node.proc is not None
    return [
        sum(
            1
            for c in process.net_connections("tcp")
            if c.laddr and c.laddr.port == node.port and c.status == psutil.CONN_ESTABLISHED
        )
        for process in (psutil.Process(node.proc.pid), *_receiver_children(node))
    ]


@pytest.mark.slow
def test_receivers_share_the_port_and_die_with_the_node(tmp_path: Path, pacs: StoreSCP) -> None:
    node = NodeProcess(
        tmp_path / "node", node_config(tmp_path / "node", pacs.port, node={"receivers": RECEIVERS})
    ).start()  # returns once the node says it is ready, receivers included
    try:
        assert len(_receiver_children(node)) == RECEIVERS - 1
        # Connections arriving at once spread: a process holding some lets an idler one
        # accept first. (Without that, 6 at once split 0-1-5 or 1-1-4 in 4 of 10 tries.)
        for attempt in range(3):
            held = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(6)]
            try:
                wait_until(lambda: sum(_accepted(node)) == 6, 10, "6 accepted", 0.01)
                spread = _accepted(node)
                assert min(spread) >= 1 and max(spread) <= 3, spread
                if attempt == 0:
                    # A burst while every process holds some: none is dropped by a full
                    # listen queue, where the kernel retries it after 1 s, then 3 s.
                    started = time.monotonic()
                    held += [socket.create_connection(("127.0.0.1", node.port)) for _ in range(18)]
                    wait_until(lambda: sum(_accepted(node)) == 24, 10, "24 accepted", 0.01)
                    assert time.monotonic() - started < 0.9
            finally:
                for sock in held:
                    sock.close()
            wait_until(lambda: sum(_accepted(node)) == 0, 10, "all closed", 0.01)
        series = [
            write_phantom_ct(
                tmp_path / f"s{n}",
                PhantomSpec(slices=12, rows=64, columns=64, pixel_spacing_mm=4.0, seed=n + 1),
            )
            for n in range(6)
        ]
        with ThreadPoolExecutor(len(series)) as pool:
            results = list(pool.map(lambda paths: storescu(node.port, paths), series))
        assert [r.returncode for r in results] == [0] * len(series), results
        # Every instance of every association is indexed once, whichever process took it.
        assert node.index_rows(
            "SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances"
        ) == [(72, 72)]
        wait_until(lambda: len(pacs.files()) >= 2 * len(series), 180, "12 results", 0.5)
        assert echoscu(node.port).returncode == 0
        receivers = _receiver_children(node)
        # kill -9 of the node takes its receivers with it: nothing keeps serving the port.
        node.kill9()
        _, alive = psutil.wait_procs(receivers, timeout=10)
        assert not alive, alive
        time.sleep(0.5)
        assert echoscu(node.port).returncode != 0
    finally:
        node.stop()
    assert len(pacs.files()) == 2 * len(series)


_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


def _exited(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_receiver_stops_on_sigterm_whichever_thread_the_kernel_picks(
    tmp_path: Path, pacs: StoreSCP
) -> None:
    """A process-wide SIGTERM may be delivered to any thread; sent here to one that is
    not the main thread, which before waited with no timeout and never ran the handler."""
    node = NodeProcess(
        tmp_path / "node", node_config(tmp_path / "node", pacs.port, node={"receivers": 2})
    ).start()
    try:
        (receiver,) = _receiver_children(node)
        other = next(t.id for t in receiver.threads() if t.id != receiver.pid)
        tgkill = _SYS_TGKILL[platform.machine()]
        assert ctypes.CDLL(None).syscall(tgkill, receiver.pid, other, signal.SIGTERM) == 0
        # It exits; the node reaps it only when stopping, so a zombie counts as gone.
        wait_until(lambda: _exited(receiver), 3, "the receiver to exit on SIGTERM", 0.05)
        assert echoscu(node.port).returncode == 0  # the node itself keeps serving
    finally:
        node.stop()


@pytest.mark.parametrize("acceptor", ["fast", "pynetdicom"])
def test_max_associations_counts_every_receiver_process(
    tmp_path: Path, pacs: StoreSCP, acceptor: str
) -> None:
    """On either acceptor (node.acceptor): receivers share the port and the limit."""
    config = node_config(
        tmp_path / "node",
        pacs.port,
        node={"receivers": RECEIVERS, "max_associations": 2, "acceptor": acceptor},
    )
    node = NodeProcess(tmp_path / "node", config).start()
    ae = AE(ae_title="HELD")
    ae.add_requested_context("1.2.840.10008.1.1")
    held: list[Any] = []
    try:
        # Held in two processes: a per-process limit of 2 would take a third anywhere. The
        # kernel picks the accepting process; both in one is a retry, not a failure.
        for _ in range(20):
            for _ in range(2):
                held.append(ae.associate("127.0.0.1", node.port, ae_title="DICOM_AI"))
                assert held[-1].is_established
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: sorted(_accepted(node)) == [0, 1, 1], 2, "one each", 0.01)
                break
            while held:
                held.pop().release()
            wait_until(lambda: sum(_accepted(node)) == 0, 10, "the releases", 0.01)
        assert sorted(_accepted(node)) == [0, 1, 1], "20 tries all landed in one process"
        for _ in range(3):
            assert echoscu(node.port).returncode != 0  # A-ASSOCIATE-RJ, whoever accepts
        held.pop().release()
        assert echoscu(node.port).returncode == 0
        assert "2 associations are open already" in node.log_text()
    finally:
        for association in held:
            association.release()
        node.stop()

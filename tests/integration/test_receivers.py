"""Several receiver processes on one port (node.receivers), with real DCMTK senders."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, echoscu, node_config, storescu, wait_until

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


def test_receivers_share_the_port_and_die_with_the_node(tmp_path: Path, pacs: StoreSCP) -> None:
    node = NodeProcess(
        tmp_path / "node", node_config(tmp_path / "node", pacs.port, node={"receivers": RECEIVERS})
    ).start()
    try:
        wait_until(lambda: len(_receiver_children(node)) == RECEIVERS - 1, 60, "receivers", 0.2)
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

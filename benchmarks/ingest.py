"""Ingest: 300-slice 512x512 CTs from DCMTK storescu to the node, storescp and Orthanc.

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--runs 3] [--no-nodelay] [--tls]
                                          [--associations N] [--receivers N]
                                          [--acceptor fast|pynetdicom ...]

Every receiver runs in the same invocation on loopback, with the same files and the same
storescu settings (TCP_NODELAY=1 unless --no-nodelay, which leaves it unset for storescu,
storescp and Orthanc alike: their default, Nagle on; with --tls, DICOM TLS with client
certificates on every receiver, certificates made for the run). With --associations N, N
storescu processes send N different series at once (img/s = all images / wall time); the
node runs with --receivers receiver processes (default: the node's own default). The node
runs with each --acceptor given (node.acceptor, default: fast; name both to see what the
node's own acceptor gains over pynetdicom's data phase, in the same interleaved runs). Prints
img/s per run, the median, and the node's ratio to each peer. The node keeps
fsync-before-Success; Orthanc runs with its default (synchronous) storage; storescp does
not fsync.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.settle import settle
from dicom_ai.config import NodeConfig
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, Orthanc, StoreSCP, free_port, node_config, storescu
from tests.tls_certs import Pki


def _dcmtk_tls(pki: Pki | None, who: str) -> list[str]:
    return pki.dcmtk(who) if pki is not None else []


def _timed_send(
    port: int,
    ae_title: str,
    series: Sequence[list[Path]],
    nodelay: bool,
    pki: Pki | None = None,
) -> float:
    """Seconds until every series has been sent, one storescu (association) per series."""
    options = _dcmtk_tls(pki, "client")
    with ThreadPoolExecutor(len(series)) as pool:
        started = time.perf_counter()
        futures = [
            pool.submit(storescu, port, files, ae_title=ae_title, nodelay=nodelay, options=options)
            for files in series
        ]
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - started
    for result in results:
        if result.returncode != 0:
            # storescu exits with the high byte of a failure status (167: 0xA7xx).
            output = f"{result.stdout}{result.stderr}"
            raise RuntimeError(f"storescu to {ae_title} failed ({result.returncode}):\n{output}")
    return elapsed


def _run(
    receiver: str,
    work: Path,
    files: Sequence[list[Path]],
    nodelay: bool,
    pki: Pki | None = None,
    receivers: int | None = None,
    acceptor: str = "fast",
) -> float:
    """Seconds for one storescu run against a freshly started receiver."""
    work.mkdir(parents=True)
    if receiver == "storescp":
        scp = StoreSCP(work / "out", tls=_dcmtk_tls(pki, "server"), nodelay=nodelay).start()
        try:
            return _timed_send(scp.port, "PACS", files, nodelay, pki)
        finally:
            scp.stop()
    if receiver == "orthanc":
        settings = {}
        if pki is not None:
            settings = {
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(pki.server_certificate),
                "DicomTlsPrivateKey": str(pki.server_key),
                "DicomTlsTrustedCertificates": str(pki.ca),
                "DicomTlsRemoteCertificateRequired": True,
            }
        orthanc = Orthanc(work, settings=settings).start(nodelay=nodelay)
        try:
            return _timed_send(orthanc.dicom_port, "ORTHANC", files, nodelay, pki)
        finally:
            orthanc.stop()
    rules = work / "rules.yaml"
    rules.write_text("rules: []\n")  # receive only: no model competes for the 2 cores
    overrides: dict[str, dict[str, object]] = {
        "node": {"acceptor": acceptor} | ({} if receivers is None else {"receivers": receivers})
    }
    tls_port = free_port()
    if pki is not None:
        overrides["node"]["tls"] = pki.node_tls(tls_port)
    node = NodeProcess(work, node_config(work, free_port(), rules=rules, **overrides)).start()
    try:
        port = tls_port if pki is not None else node.port
        return _timed_send(port, "DICOM_AI", files, nodelay, pki)
    finally:
        node.stop()


def _node_name(acceptor: str) -> str:
    return "dicom-ai" if acceptor == "fast" else f"dicom-ai:{acceptor}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--no-nodelay",
        action="store_true",
        help="DCMTK's default: no TCP_NODELAY for storescu, storescp and Orthanc",
    )
    parser.add_argument("--tls", action="store_true", help="DICOM TLS with client certificates")
    parser.add_argument("--associations", type=int, default=1, help="concurrent senders")
    parser.add_argument("--receivers", type=int, default=None, help="node receiver processes")
    parser.add_argument(
        "--acceptor",
        action="append",
        choices=["fast", "pynetdicom"],
        help="node.acceptor; repeat to run the node with each (default: fast)",
    )
    args = parser.parse_args()
    acceptors: list[str] = list(dict.fromkeys(args.acceptor or ["fast"]))
    nodelay = not args.no_nodelay
    receivers = args.receivers  # None: the node's default

    root = Path(tempfile.mkdtemp(prefix="dicom-ai-bench-"))
    try:
        series = [
            write_phantom_ct(root / f"ct{n}", PhantomSpec(slices=args.slices, seed=n + 1))
            for n in range(args.associations)
        ]
        images = sum(len(files) for files in series)
        megabytes = sum(f.stat().st_size for files in series for f in files) / 1e6
        pki = None
        if args.tls:
            from tests.tls_certs import make_pki

            pki = make_pki(root / "pki")
        print(settle(root / "probe"))
        print(
            f"{args.associations} association(s) x {args.slices} CT slices = {images} images, "
            f"{megabytes:.1f} MB; TCP_NODELAY={'1' if nodelay else 'unset'} for DCMTK and Orthanc; "
            f"TLS {'on' if pki else 'off'}; node receiver processes: "
            f"{receivers or NodeConfig().receivers}; node acceptor(s): {', '.join(acceptors)}"
        )
        nodes = {_node_name(acceptor): acceptor for acceptor in acceptors}

        def runner(name: str) -> Callable[[int], float]:
            receiver, acceptor = ("dicom-ai", nodes[name]) if name in nodes else (name, "fast")
            return lambda i: _run(
                receiver, root / f"{name}-{i}", series, nodelay, pki, receivers, acceptor
            )

        runners = {name: runner(name) for name in (*nodes, "storescp", "orthanc")}
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(args.runs):  # interleaved, so drift in machine load hits all alike
            for name, run in runners.items():
                rates[name].append(images / run(i))
        print(f"{'receiver':<20} {'runs (img/s)':<32} {'median img/s':>12}")
        medians = {}
        for name, values in rates.items():
            medians[name] = statistics.median(values)
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(f"{name:<20} {runs:<32} {medians[name]:>12.0f}")
        for node in nodes:
            for peer in ("storescp", "orthanc"):
                print(f"{node} / {peer}: {medians[node] / medians[peer]:.2f}x")
        if len(nodes) == 2:
            fast, reference = (_node_name(a) for a in ("fast", "pynetdicom"))
            print(f"{fast} / {reference}: {medians[fast] / medians[reference]:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

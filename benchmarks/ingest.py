"""Ingest: 300-slice 512x512 CTs from DCMTK storescu to the node, storescp and Orthanc.

    .venv/bin/python -m benchmarks.ingest [--slices 300] [--runs 3] [--no-nodelay] [--tls]
                                          [--associations N] [--receivers N]
                                          [--acceptor fast|pynetdicom ...] [--console]

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

With --console, each node also runs a second time in every round, interleaved, with its
console on (web.enabled) and open: a client GETs /metrics and the API's first series page
(/api/v1/series?page=1&per_page=50, a bearer token) every second from before the first image
until the last; the node without the console runs with web.enabled false. Prints both
nodes' figures and the ratio (the issue's target: within 5%).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.settle import settle
from dicom_ai.config import NodeConfig
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import (
    NodeProcess,
    Orthanc,
    StoreSCP,
    free_port,
    node_config,
    storescu,
    wait_until,
)
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


class _OpenConsole:
    """A console left open: GET /metrics and the first series page every second, in a
    thread, until stopped; counts the requests and the failed ones."""

    _URLS = ("/metrics", "/api/v1/series?page=1&per_page=50")

    def __init__(self, port: int, token: str) -> None:
        self._base = f"http://127.0.0.1:{port}"
        self._token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.requests = 0
        self.failures: list[str] = []

    def _get(self, url: str) -> bool:
        request = urllib.request.Request(
            self._base + url, headers={"Authorization": f"Bearer {self._token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self) -> _OpenConsole:
        # Up and answering (the web process imports its app after the node is ready).
        wait_until(lambda: all(self._get(url) for url in self._URLS), 60, "the console")
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            for url in self._URLS:
                self.requests += 1
                if not self._get(url):
                    self.failures.append(url)
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _cpu_seconds(root_pid: int, web_port: int | None) -> tuple[float, float]:
    """CPU seconds so far (user + system) of the node's processes, and of its console's
    (the child listening on ``web_port``; the node holds the socket too) alone."""
    import psutil

    total = web = 0.0
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            used = times.user + times.system
            if (
                proc is not root
                and web_port is not None
                and any(
                    c.laddr and c.laddr.port == web_port and c.status == psutil.CONN_LISTEN
                    for c in proc.net_connections(kind="tcp")
                )
            ):
                web += used
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        total += used
    return total, web


def _run(
    receiver: str,
    work: Path,
    files: Sequence[list[Path]],
    nodelay: bool,
    pki: Pki | None = None,
    receivers: int | None = None,
    acceptor: str = "fast",
    console: bool = False,
    cpu: list[tuple[float, float]] | None = None,
) -> float:
    """Seconds for one storescu run against a freshly started receiver (the node with its
    console open when ``console``); for the node, ``cpu`` gets the CPU seconds its
    processes, and its console's alone, spent during the send."""
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
    web_port = free_port()
    if console:
        overrides["web"] = {"enabled": True, "host": "127.0.0.1", "port": web_port}
    config = node_config(work, free_port(), rules=rules, **overrides)
    token = _console_token(Path(config["node"]["data_dir"])) if console else ""
    node = NodeProcess(work, config).start()
    poller = None
    try:
        if console:
            poller = _OpenConsole(web_port, token).start()
        port = tls_port if pki is not None else node.port
        assert node.proc is not None
        before = _cpu_seconds(node.proc.pid, web_port if console else None)
        elapsed = _timed_send(port, "DICOM_AI", files, nodelay, pki)
        after = _cpu_seconds(node.proc.pid, web_port if console else None)
        if cpu is not None:
            cpu.append((after[0] - before[0], after[1] - before[1]))
        return elapsed
    finally:
        if poller is not None:
            poller.stop()
            print(f"  console open: {poller.requests} requests, {len(poller.failures)} failed")
        node.stop()


def _console_token(data_dir: Path) -> str:
    """An admin's API token in the node's console accounts (``dicom-ai users add/token``)."""
    from dicom_ai.web.accounts import Accounts

    accounts = Accounts(data_dir / "console.sqlite3")
    try:
        accounts.add_user("bench", "admin", "bench-password-0123456789")
        return accounts.new_token("bench")
    finally:
        accounts.close()


def _node_name(acceptor: str, console: bool = False) -> str:
    name = "dicom-ai" if acceptor == "fast" else f"dicom-ai:{acceptor}"
    return f"{name}+console" if console else name


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
    parser.add_argument(
        "--console",
        action="store_true",
        help="also run each node with its console open (/metrics and a series page each second)",
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
            + ("; each node also with its console open" if args.console else "")
        )
        nodes = {_node_name(acceptor): acceptor for acceptor in acceptors}
        consoles = {
            _node_name(acceptor, console=True): acceptor for acceptor in acceptors if args.console
        }

        cpu: dict[str, list[tuple[float, float]]] = {n: [] for n in (*nodes, *consoles)}

        def runner(name: str) -> Callable[[int], float]:
            acceptor = {**nodes, **consoles}.get(name)
            receiver = name if acceptor is None else "dicom-ai"
            return lambda i: _run(
                receiver,
                root / f"{name}-{i}",
                series,
                nodelay,
                pki,
                receivers,
                acceptor or "fast",
                console=name in consoles,
                cpu=cpu.get(name) if consoles else None,
            )

        runners = {name: runner(name) for name in (*nodes, *consoles, "storescp", "orthanc")}
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(args.runs):  # interleaved, so drift in machine load hits all alike
            order = list(runners.items())
            if consoles and i % 2:  # each node runs first with and without its console
                order.reverse()
            for name, run in order:
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
        for name, acceptor in consoles.items():
            plain = _node_name(acceptor)
            ratio = medians[name] / medians[plain]
            print(
                f"{name} / {plain}: {ratio:.3f}x ({(ratio - 1) * 100:+.1f}%; "
                f"target: within 5%, {'met' if ratio >= 0.95 else 'NOT met'})"
            )
            # CPU time is less at the mercy of other load on the machine than wall time.
            for who in (plain, name):
                per_image = [total / images * 1000 for total, _ in cpu[who]]
                runs = ", ".join(f"{v:.2f}" for v in per_image)
                print(
                    f"  {who}: node CPU per image {statistics.median(per_image):.2f} ms "
                    f"(runs: {runs})"
                )
            web = [w * 1000 for _, w in cpu[name]]
            print(
                f"  {name}: its console's process used {statistics.median(web):.0f} ms of CPU "
                f"during a send (runs: {', '.join(f'{w:.0f}' for w in web)})"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Real DICOM peers and the node as processes on loopback, for integration tests and benchmarks.

Every server gets an ephemeral port, is started here and stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.markers import uses

if TYPE_CHECKING:
    from dicom_ai.dimse.scp import StorageSCP

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15
) -> None:
    if proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


class StoreSCP:
    """DCMTK storescp writing every received object into ``directory``."""

    def __init__(
        self,
        directory: Path,
        ae_title: str = "PACS",
        port: int | None = None,
        tls: Sequence[str] = (),
        nodelay: bool = True,
    ) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = port or free_port()
        self.tls = list(tls)  # DCMTK TLS options, e.g. +tls KEY CERT +cf CA
        self.nodelay = nodelay  # False: DCMTK's default, Nagle on
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory.parent / f"storescp-{self.port}.log"

    def start(self) -> StoreSCP:
        uses("dcmtk", "storescp")
        self.directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("TCP_NODELAY", None)
        if self.nodelay:
            env["TCP_NODELAY"] = "1"
        # +xa: accept every transfer syntax; -uf: name files by SOP instance UID
        self.proc = subprocess.Popen(
            [
                "storescp",
                "--aetitle",
                self.ae_title,
                "+xa",
                "-uf",
                "-od",
                str(self.directory),
                *self.tls,
                str(self.port),
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_until(lambda: port_open(self.port), 10, "storescp to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def files(self) -> list[Path]:
        return (
            sorted(p for p in self.directory.iterdir() if p.is_file())
            if self.directory.exists()
            else []
        )


def storescu_command(
    port: int,
    paths: Sequence[Path],
    ae_title: str = "DICOM_AI",
    calling_ae: str = "SCANNER",
    options: Sequence[str] = (),
) -> list[str]:
    """The storescu command line to send ``paths`` to 127.0.0.1:``port``."""
    uses("dcmtk", "storescu")
    # -R: propose only the SOP classes of the files (else SEG etc. may have no context)
    return [
        "storescu",
        "-R",
        "-aet",
        calling_ae,
        "-aec",
        ae_title,
        *options,
        "127.0.0.1",
        str(port),
        *map(str, paths),
    ]


def storescu(
    port: int,
    paths: Sequence[Path],
    ae_title: str = "DICOM_AI",
    calling_ae: str = "SCANNER",
    nodelay: bool = True,
    options: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return subprocess.run(
        storescu_command(port, paths, ae_title, calling_ae, options),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def echoscu(
    port: int, ae_title: str = "DICOM_AI", calling_ae: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    uses("dcmtk", "echoscu")
    return subprocess.run(
        ["echoscu", "-aet", calling_ae, "-aec", ae_title, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class NodeProcess:
    """``dicom-ai serve`` as a subprocess with a config written from a dict."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.port: int = int(config["node"]["port"])
        self.config_path = workdir / "node.yaml"
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        earlier = self.log.stat().st_size if self.log.exists() else 0  # a restart appends
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_ai.cli", "serve", "--config", str(self.config_path)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_text()}")
            # The port opens before receiver processes (node.receivers) have started.
            return port_open(self.port) and b"dicom-ai ready" in self.log.read_bytes()[earlier:]

        wait_until(ready, timeout, "the node to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=30)
            self.proc = None

    def kill9(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            # spawned workers die with their parent's pipe; reap any that linger
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def data_dir(self) -> Path:
        return Path(self.config["node"]["data_dir"])

    def index_rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the node's index, read-only (the node may be running)."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()


def node_config(
    workdir: Path,
    pacs_port: int,
    rules: Path | None = None,
    models: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A test config: ephemeral port, short assembly and retry times, one PACS destination."""
    config: dict[str, Any] = {
        "node": {
            "ae_title": "DICOM_AI",
            "host": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(workdir / "data"),
            "min_free_bytes": 0,
        },
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        "models": models or {},
        "rules": str(rules or REPO / "rules" / "default.yaml"),
        "pipeline": {"workers": 1, "quiet_seconds": 3, "release_grace_seconds": 0.5},
        "delivery": {
            "retry_base_seconds": 1,
            "retry_max_seconds": 4,
            "max_attempts": 30,
            "timeout_seconds": 10,
        },
        # The console's own tests turn it on (tests/web/); the others need no web process.
        "web": {"enabled": False},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    if "called_aes" in overrides:
        del config["rules"]  # each called AE names its own
    return config


ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


class Orthanc:
    """Debian's Orthanc with a generated JSON config, fresh storage, ephemeral ports.

    ``settings`` are merged over the base config (e.g. ``DicomModalities``, ``LuaScripts``,
    ``StableAge``); ``dicomweb=True`` loads Debian's DICOMweb plugin at ``/dicom-web/``.
    """

    def __init__(
        self,
        workdir: Path,
        ae_title: str = "ORTHANC",
        dicomweb: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicomweb = dicomweb
        self.settings = settings or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, nodelay: bool = True) -> Orthanc:
        import json

        uses("orthanc", "Orthanc")

        self.workdir.mkdir(parents=True, exist_ok=True)
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "dicom-ai-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")] if self.dicomweb else [],
            "StorageCompression": False,
        }
        if self.dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config.update(self.settings)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        env = dict(os.environ)
        if nodelay:
            env["TCP_NODELAY"] = "1"
        self.proc = subprocess.Popen(
            ["Orthanc", str(config_path)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        # Its HTTP port comes up before its DICOM port: wait for both.
        wait_until(lambda: port_open(self.http_port) and port_open(self.dicom_port), 30, "Orthanc")
        return self

    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        """One REST call; JSON answers are decoded."""
        import json
        import urllib.request

        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
            if response.headers.get_content_type() == "application/json":
                return json.loads(data)
            return data

    def upload(self, paths: Sequence[Path]) -> list[str]:
        """POST each file to /instances, as a user uploading a study; Orthanc instance ids."""
        return [str(self.rest("POST", "/instances", p.read_bytes())["ID"]) for p in paths]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


# -- crash-safety helpers ------------------------------------------------------------------


def storescu_acked(
    port: int,
    paths: Sequence[Path],
    on_success: Callable[[int], None] | None = None,
    ae_title: str = "DICOM_AI",
    calling_ae: str = "SCANNER",
    timeout: float = 120,
) -> tuple[int, list[Path], str]:
    """storescu -v, reading its log as it runs: (exit code, files answered Success, log).

    storescu logs "Sending file: PATH" before each C-STORE-RQ and "Received Store Response
    (Success)" when the peer acknowledged it; a file counts as acknowledged only with the
    latter. ``on_success(n)`` is called right after the n-th Success line (storescu meanwhile
    goes on sending), e.g. to kill the peer mid-association.
    """
    import threading

    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(
        storescu_command(port, paths, ae_title, calling_ae, ["-v"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    by_name = {str(p): p for p in paths}
    acked: list[Path] = []
    lines: list[str] = []
    current: Path | None = None
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            text = line.strip()
            if text.startswith("I: Sending file: "):
                current = by_name[text.removeprefix("I: Sending file: ")]
            elif text.startswith("I: Received Store Response ("):
                if text == "I: Received Store Response (Success)" and current is not None:
                    acked.append(current)
                    if on_success is not None:
                        on_success(len(acked))
                current = None
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return returncode, acked, "".join(lines)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc), e.g. the node's worker processes."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return children


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class RestartableStoreSCP(StoreSCP):
    """A storescp kept on one port and directory across stops and starts, optionally slow.

    ``start(sleep_after=s)`` makes storescp sleep s seconds after each object it stored
    (``--sleep-after``): of a SEG and an SR sent in one association the SEG is stored at
    once and the SR a second later, which leaves a window inside a delivery. Each start logs
    to its own file (``logs()`` reads them all).
    """

    def __init__(self, directory: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        super().__init__(directory, ae_title, port)
        self.starts = 0

    def start(self, sleep_after: int = 0) -> RestartableStoreSCP:
        self.starts += 1
        self.log = self.directory.parent / f"storescp-{self.port}-{self.starts}.log"
        # StoreSCP passes ``tls`` to storescp as plain options; here they are not TLS ones.
        self.tls = ["--sleep-after", str(sleep_after)] if sleep_after else []
        super().start()
        return self

    def logs(self) -> str:
        return "".join(
            (self.directory.parent / f"storescp-{self.port}-{n}.log").read_text(errors="replace")
            for n in range(1, self.starts + 1)
        )


@contextmanager
def local_scp(directory: Path, **options: Any) -> Iterator[StorageSCP]:
    """The node's storage SCP in this process on an ephemeral port, with its own spool and
    index under ``directory``; ``options`` go to ``StorageSCP`` (timeouts, limits)."""
    from dicom_ai.dimse.scp import StorageSCP
    from dicom_ai.store.index import Index
    from dicom_ai.store.spool import Spool

    scp = StorageSCP(
        "DICOM_AI",
        "127.0.0.1",
        0,
        Spool(directory / "spool"),
        Index(directory / "index.db"),
        **options,
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()
        scp.index.close()


@contextmanager
def tmpfs(mount_point: Path, size_mib: int) -> Iterator[Path]:
    """A size-limited tmpfs mounted at ``mount_point`` (made here), unmounted afterwards;
    the test is skipped, with the reason, where it cannot be mounted (not root)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root; this test runs as a user")
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)

"""The console's own process: uvicorn serving `create_app` on a socket the node bound.

The node binds ``web.host:web.port`` itself (a port in use fails the start with a clear
message, and port 0 resolves before anything is logged), then spawns this process with the
socket. It runs niced, so pages and scrapes never take the CPU from receiving, and dies
with the node (``lifecycle.die_with_parent``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from dicom_ai.config import Config
from dicom_ai.lifecycle import die_with_parent, stop_child

__all__ = ["WebServer"]

log = logging.getLogger(__name__)

_NICENESS = 5


class WebServer:
    """The console for ``config``: bound by `bind`, served by a spawned process."""

    def __init__(self, config: Config, log_level: int = logging.INFO) -> None:
        self._config = config
        self._log_level = log_level
        self._socket: socket.socket | None = None
        self._process: BaseProcess | None = None
        self._ready: EventType | None = None

    @property
    def port(self) -> int | None:
        return None if self._socket is None else int(self._socket.getsockname()[1])

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        scheme = "https" if self._config.web.tls else "http"
        host = self._config.web.host
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def bind(self) -> None:
        web = self._config.web
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only for that
        # protocol, and without it each answer on a kept-alive connection waits for a
        # delayed ACK (benchmarks/console.py).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((web.host, web.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._socket = sock

    def start(self) -> None:
        if self._socket is None:
            self.bind()
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        self._process = context.Process(
            target=_web_main,
            args=(self._config, self._socket, os.getpid(), self._log_level, self._ready),
            name="dicom-ai-web",
            # Not a daemon: a daemonic process may not start children, and a replay runs in
            # one (isolated.py). It still ends with the node: stop(), or PR_SET_PDEATHSIG.
            daemon=False,
        )
        self._process.start()

    def wait_ready(self, timeout: float = 60) -> bool:
        """Until the console answers (its imports done, its app built); False on timeout:
        requests queue on the socket meanwhile."""
        if self._ready is None or not self._ready.wait(timeout):
            log.warning("the console is slow to start")
            return False
        return True

    def stop(self) -> None:
        stop_child(self._process)
        self._process = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _web_main(
    config: Config, sock: socket.socket, parent_pid: int, log_level: int, ready: EventType
) -> None:
    die_with_parent(parent_pid)
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us
    import uvicorn

    from dicom_ai.web.app import create_app

    tls = config.web.tls
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level=logging.WARNING,  # no access log: URLs carry UIDs, and it is noise
            access_log=False,
            ssl_certfile=str(tls.certificate) if tls else None,
            ssl_keyfile=str(tls.private_key) if tls else None,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
    )
    ready.set()  # what is left is the event loop: requests queue on the socket until then
    server.run(sockets=[sock])

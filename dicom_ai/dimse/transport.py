"""The acceptor's TCP side: listening (maybe on a socket shared with receiver processes),
socket tuning, and reading whole PDUs off one blocking socket.

Every tuning knob is a named constant here, with why it is set.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import cast

__all__ = [
    "DEFER_LIMIT",
    "DEFER_SECONDS",
    "LISTEN_BACKLOG",
    "SHUTDOWN_POLL_SECONDS",
    "ConnectionBroken",
    "ListeningServer",
    "PDUStream",
    "set_nodelay",
]

# socketserver's default backlog is 5: a burst of senders (or receiver processes deferring,
# below) would overflow it, and a dropped connection waits for the kernel's SYN retry.
LISTEN_BACKLOG = socket.SOMAXCONN
# Where processes share the listening socket, one holding connections waits this long per
# connection it holds (up to DEFER_LIMIT of them) before it accepts, so an idler one wins.
DEFER_SECONDS = 0.005
DEFER_LIMIT = 2
# How often the accept loop looks for a shutdown request; stop() waits up to this long
# (socketserver's default made it most of a node's stop time).
SHUTDOWN_POLL_SECONDS = 0.05
# Linux's TCP_QUICKACK (absent elsewhere): ACK at once, not up to 40 ms later.
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class ConnectionBroken(Exception):
    """The connection closed where more was due: ``received`` of ``expected`` bytes."""

    def __init__(self, received: int = 0, expected: int = 0, message: str = "") -> None:
        super().__init__(message or "the connection closed")
        self.received = received
        self.expected = expected


def set_nodelay(sock: socket.socket) -> None:
    """Nagle off: responses are small, and Nagle with delayed ACK stalls each exchange."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PDUStream:
    """One accepted socket: exact-length reads into one buffer, whole writes, timeouts."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self.sock = sock
        self.tls = tls
        self._quickack_option = _TCP_QUICKACK
        self._recv_flags = 0
        self._answered = True  # something was sent since quick ACKs were last asked for

    def start_tls(self) -> None:
        """Wrap the socket for TLS; the handshake happens on the first read."""
        if self.tls is not None:
            self.sock = self.tls.wrap_socket(self.sock, server_side=True)

    @property
    def is_tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    def set_timeout(self, seconds: float | None) -> None:
        """A plain socket blocks, with the kernel's own timeouts, so that one
        recv(MSG_WAITALL) takes a whole PDU: with Python's timeout the socket is
        non-blocking and a large PDU takes many reads, each a wait for the GIL under load.
        TLS keeps Python's timeout (no flags on an SSL read)."""
        if self.tls is not None:
            self.sock.settimeout(seconds)
            return
        self.sock.settimeout(None)
        seconds = seconds or 0.0  # 0: no timeout, as None is to Python
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._recv_flags = socket.MSG_WAITALL

    def recv_exactly(self, length: int) -> bytearray:
        """``length`` bytes; ``TimeoutError`` past the timeout, ``ConnectionBroken`` when
        the peer closes first."""
        buffer = bytearray(length)
        view = memoryview(buffer)
        received = 0
        while received < length:
            if self._answered:
                self._quickack()
                self._answered = False
            try:
                count = self.sock.recv_into(view[received:], length - received, self._recv_flags)
            except BlockingIOError:  # SO_RCVTIMEO ran out (see set_timeout)
                raise TimeoutError("receive timed out") from None
            if count == 0:
                raise ConnectionBroken(received, length)
            received += count
        return buffer

    def drain(self) -> bool:
        """Read and drop everything until the peer closes (True) or the timeout or an
        error ends the wait (False)."""
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            return False
        return True

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self._answered = True

    def _quickack(self) -> None:
        """ACK at once rather than up to 40 ms later. A sender with Nagle on (DCMTK's and
        Orthanc's default) holds its last small segment until the previous one is ACKed.
        Linux leaves quick-ACK mode when we answer (it takes the exchange for interactive),
        so it is asked for again at the first read after each answer, not before every
        read (each such call sends a pending ACK, a cost under load)."""
        if self._quickack_option is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, self._quickack_option, 1)
            except OSError:
                self._quickack_option = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def shutdown(self) -> None:
        """End the connection from another thread: its blocked read returns."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


ConnectionHandler = Callable[[socket.socket, str, "ssl.SSLContext | None"], None]


class ListeningServer(socketserver.ThreadingTCPServer):
    """Accepts connections, each handled on its own thread by ``handler(sock, address,
    tls)``; listens on a new socket, or on ``listening``, one other processes accept on
    too (``sharing``)."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: ConnectionHandler,
        tls: ssl.SSLContext | None,
        listening: socket.socket | None = None,
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.sharing = listening is not None
        super().__init__(address, _Handler, bind_and_activate=listening is None)
        if listening is not None:  # another process's listening socket, shared with us
            self.socket.close()
            self.socket = listening
            self.server_address = listening.getsockname()
        # Where processes share the socket, each connection wakes all of them and the first
        # to accept takes it; the others must not block in accept.
        self.socket.setblocking(False)
        self._connections = 0  # accepted and not yet closed
        self._count_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.sharing and self._connections:
            # A process holding connections lets an idler one accept first.
            time.sleep(min(self._connections, DEFER_LIMIT) * DEFER_SECONDS)
        sock, address = self.socket.accept()  # BlockingIOError: another process took it
        with self._count_lock:
            self._connections += 1
        return sock, address

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._count_lock:
            self._connections -= 1
        super().shutdown_request(request)

    def serve_in_thread(self) -> None:
        threading.Thread(
            target=self.serve_forever,
            args=(SHUTDOWN_POLL_SECONDS,),
            name=f"dicom-ai-accept-{self.server_address[1]}",
            daemon=True,
        ).start()


class _Handler(socketserver.BaseRequestHandler):
    server: ListeningServer

    def handle(self) -> None:
        sock = cast(socket.socket, self.request)
        set_nodelay(sock)
        self.server.handler(sock, str(self.client_address[0]), self.server.tls)

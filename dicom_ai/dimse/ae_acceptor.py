"""The acceptor built on pynetdicom's own association handling (``node.acceptor:
pynetdicom``): its AE, DUL state machine and DIMSE data phase, serving the same
``DimseService`` as ``acceptor.Acceptor``.

It is the reference the hand-written acceptor is measured and tested against: the same
integration tests run on both, and ``benchmarks.ingest --acceptor`` shows the gap in
throughput (pynetdicom's data phase is the slower one). What is shared with the fast
acceptor: the access check, the association limit and the A-ASSOCIATE-RJ they give
(``service.judge_request``, from pynetdicom's EVT_REQUESTED hook), the listening socket,
which receiver processes may share, TLS, and the advertised maximum PDU length.
Protocol errors are pynetdicom's to find and answer.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association as AEAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext, PresentationContextTuple
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai.dimse import _compat
from dicom_ai.dimse.pdv import MAXIMUM_LENGTH_RECEIVED
from dicom_ai.dimse.service import (
    AcceptedContext,
    Association,
    AssociationSlots,
    CStoreRequest,
    DimseService,
    SharedLimit,
    judge_request,
)
from dicom_ai.dimse.transport import (
    DEFER_LIMIT,
    DEFER_SECONDS,
    LISTEN_BACKLOG,
    SHUTDOWN_POLL_SECONDS,
    set_nodelay,
)

__all__ = ["AEAcceptor"]

log = logging.getLogger(__name__)

_PROCESSING_FAILURE = 0x0110  # PS3.7 C.5.10
# pynetdicom counts its acceptor threads against its own limit, including ones still
# closing; the node's limit (AssociationSlots) is applied first, so theirs stays out of
# the way.
_PYNETDICOM_ASSOCIATION_LIMIT = 1024


class _Server(ThreadedAssociationServer):
    """pynetdicom's server on a new socket or on ``listening`` (shared with other
    processes), tuned as the fast acceptor's listening server is (``transport``)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, *args: Any, listening: socket.socket | None = None, **kwargs: Any) -> None:
        self._listening = listening
        self.sharing = listening is not None
        self._connections = 0  # accepted and not yet closed
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        # Each connection on a shared socket wakes every process; the losers must not block.
        self.listening.setblocking(False)

    @property
    def listening(self) -> socket.socket:
        assert self.socket is not None  # bound in __init__
        return self.socket

    def server_bind(self) -> None:
        if self._listening is None:
            super().server_bind()
            return
        self.listening.close()
        self.socket = self._listening
        self.server_address = self._listening.getsockname()

    def server_activate(self) -> None:
        if self._listening is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.sharing and self._connections:
            # A process holding connections lets an idler one accept first.
            time.sleep(min(self._connections, DEFER_LIMIT) * DEFER_SECONDS)
        sock, address = self.listening.accept()  # BlockingIOError: another process took it
        set_nodelay(sock)
        with self._count_lock:
            self._connections += 1
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self._count_lock:
            self._connections = max(self._connections - 1, 0)
        super().shutdown_request(request)

    def server_close(self) -> None:
        # Close only: a shutdown() of a listening socket shared with other processes
        # would stop theirs too.
        self.listening.close()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)  # not pynetdicom's: the AE does not own us
        self.server_close()


class AEAcceptor:
    """Listens on a port (plain or TLS) with pynetdicom's AE; the same constructor and
    methods as ``acceptor.Acceptor``."""

    def __init__(
        self,
        service: DimseService,
        supported_contexts: list[PresentationContext],
        maximum_associations: int = 10,
        network_timeout: float | None = 60.0,
        acse_timeout: float | None = 30.0,
        shared_limit: SharedLimit | None = None,
    ) -> None:
        self.service = service
        self.supported_contexts = supported_contexts
        self.maximum_associations = maximum_associations
        self.network_timeout = network_timeout
        self.acse_timeout = acse_timeout
        self.slots = AssociationSlots(maximum_associations, shared_limit)
        _compat.pynetdicom_unrestricted_storage()
        self._ae = AE()
        self._ae.maximum_pdu_size = MAXIMUM_LENGTH_RECEIVED
        self._ae.network_timeout = network_timeout
        self._ae.acse_timeout = acse_timeout
        self._ae.maximum_associations = _PYNETDICOM_ASSOCIATION_LIMIT
        self._servers: list[_Server] = []
        self._lock = threading.Lock()
        self._associations: dict[AEAssociation, Association] = {}
        self._ended: set[AEAssociation] = set()

    # -- listening ---------------------------------------------------------------------------

    def serve(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        listening: socket.socket | None = None,
    ) -> int:
        """Start listening (returns at once), on a new socket or on ``listening``, a socket
        another process listens on too; the bound port."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._requested, [tls is not None]),
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_C_ECHO, self._c_echo),
            (evt.EVT_C_STORE, self._c_store),
            (evt.EVT_RELEASED, self._released),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_PDU_SENT, self._pdu_sent),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        server = self._ae.make_server(
            (host, port),
            contexts=self.supported_contexts,
            ssl_context=tls,
            evt_handlers=handlers,
            server_class=_Server,
            listening=listening,
        )
        assert isinstance(server, _Server)
        server.sharing = server.sharing or any(s.sharing for s in self._servers)
        self._servers.append(server)
        bound = int(server.server_address[1])
        threading.Thread(
            target=server.serve_forever,
            args=(SHUTDOWN_POLL_SECONDS,),
            name=f"dicom-ai-accept-{bound}",
            daemon=True,
        ).start()
        return bound

    def listening_socket(self, port: int) -> socket.socket:
        """The socket listening on ``port``, to share with receiver processes."""
        for server in self._servers:
            server.sharing = True
        for server in self._servers:
            if server.server_address[1] == port:
                return server.listening
        raise KeyError(port)

    def stop(self) -> None:
        """Stop listening and abort every open association."""
        for server in self._servers:
            server.shutdown()
        self._servers.clear()
        self.slots.close_all()

    # -- pynetdicom's events (notification handlers: never raise) ----------------------------

    def _ours(self, assoc: AEAssociation) -> Association | None:
        with self._lock:
            return self._associations.get(assoc)

    def _requested(self, event: evt.Event, tls: bool) -> None:
        """A-ASSOCIATE-RQ received: the node's own access check and limit, before
        pynetdicom negotiates; a refusal is sent from here (EVT_REQUESTED's purpose)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None
        association = Association(
            calling_ae_title=str(request.calling_ae_title).strip(),
            called_ae_title=str(request.called_ae_title).strip(),
            address=str(assoc.requestor.address),
            tls=tls,
            peer_maximum_length=int(request.maximum_length_received or 0),
        )
        try:
            refusal = judge_request(
                str(request.application_context_name),
                association,
                self.service,
                self.slots,
                assoc,
                lambda: assoc.abort(),
            )
        except Exception:
            log.exception("association from %s: the access check failed", association.requestor)
            assoc.abort()
            return
        if refusal is None:
            with self._lock:
                self._associations[assoc] = association
            return
        log.warning(
            "association from %s to %s rejected: %s",
            association.requestor,
            association.called_ae_title,
            refusal.reason,
        )
        assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        assoc.kill()

    def _established(self, event: evt.Event) -> None:
        association = self._ours(event.assoc)
        if association is None:
            return
        for context in event.assoc.accepted_contexts:
            if context.context_id is not None:
                association.contexts[context.context_id] = _accepted(context.as_tuple)
        log.debug(
            "association from %s to %s accepted, %d presentation contexts",
            association.requestor,
            association.called_ae_title,
            len(association.contexts),
        )

    def _c_echo(self, event: evt.Event) -> int:
        association = self._ours(event.assoc)
        if association is None:
            return _PROCESSING_FAILURE
        return self._call(association, lambda: self.service.c_echo(association))

    def _c_store(self, event: evt.Event) -> int:
        association = self._ours(event.assoc)
        if association is None:
            return _PROCESSING_FAILURE
        command = event.request
        assert isinstance(command, C_STORE)
        context = _accepted(event.context)
        data_set = command.DataSet
        request = CStoreRequest(
            association,
            context,
            int(command.MessageID or 0),
            str(command.AffectedSOPClassUID or context.abstract_syntax),
            str(command.AffectedSOPInstanceUID or ""),
            (memoryview(data_set.getvalue() if data_set is not None else b""),),
        )
        return self._call(association, lambda: self.service.c_store(request))

    def _call(self, association: Association, handler: Callable[[], int]) -> int:
        try:
            return handler()
        except Exception:
            log.exception(
                "association from %s: a DIMSE handler raised; answered 0x0110",
                association.requestor,
            )
            return _PROCESSING_FAILURE

    def _pdu_sent(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            association = self._ours(event.assoc)
            who = (
                f"association from {association.requestor}"
                if association is not None
                else f"connection from {event.assoc.requestor.address}"
            )
            log.warning("%s aborted by the node (pynetdicom)", who)

    def _released(self, event: evt.Event) -> None:
        association = self._ours(event.assoc)
        if association is not None:
            association.released = True
            log.debug("association from %s released", association.requestor)
        self._end(event.assoc)  # the series may be complete now; do not wait for the close
        # pynetdicom closes the socket later; the slot is free now, as the fast acceptor's.
        self.slots.release(event.assoc)

    def _aborted(self, event: evt.Event) -> None:
        association = self._ours(event.assoc)
        if association is not None and not association.released:
            log.warning(
                "association from %s ended without release: aborted by the peer or the "
                "connection broke; an instance still in transfer was not stored",
                association.requestor,
            )
        self._end(event.assoc)
        self.slots.release(event.assoc)

    def _closed(self, event: evt.Event) -> None:
        self._end(event.assoc)
        with self._lock:
            self._associations.pop(event.assoc, None)
            self._ended.discard(event.assoc)
        self.slots.release(event.assoc)

    def _end(self, assoc: AEAssociation) -> None:
        """Tell the service the association is over, once."""
        with self._lock:
            association = self._associations.get(assoc)
            if association is None or assoc in self._ended:
                return
            self._ended.add(assoc)
        try:
            self.service.association_ended(association)
        except Exception:
            log.exception("could not record the end of the association")


def _accepted(context: PresentationContextTuple) -> AcceptedContext:
    return AcceptedContext(
        int(context.context_id),
        UID(str(context.abstract_syntax)),
        UID(str(context.transfer_syntax)),
    )

"""The node's own association acceptor (``node.acceptor: fast``): DICOM upper layer
(PS3.8) and DIMSE message framing (PS3.7) for the receiving side, one thread per
association.

Why by hand: pynetdicom hands every PDU through two threads, queues and a state machine
that polls with sleeps, and its data phase is the slower one (``benchmarks.ingest
--acceptor`` shows the gap; ``node.acceptor: pynetdicom`` runs it). Here one thread reads a
PDU into one buffer, and the C-STORE is stored and answered on that same thread. The parts
with rules to get right stay with the libraries: pynetdicom decodes A-ASSOCIATE-RQ,
negotiates presentation contexts and encodes A-ASSOCIATE-AC/RJ; pydicom decodes command
set elements.

The layers: ``transport`` (sockets), ``ul_states`` (the PS3.8 state table, which every
transition here goes through), ``pdv`` (PDVs to DIMSE messages), ``service`` (what the SCP
sees). What a peer can get from here, and when (PS3.8 9.2, acceptor side):

- A-ASSOCIATE-RJ: the access check or the association limit said no;
- A-ASSOCIATE-AC, then P-DATA answers for C-ECHO / C-STORE; A-RELEASE-RP on release;
- A-ABORT: a protocol error (unexpected or unrecognised PDU, a PDV on a context that was
  not accepted, an undecodable command set), or silence past the network timeout;
- a closed connection without a word: no A-ASSOCIATE-RQ within the ARTIM timeout (AA-2).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

from dicom_ai.dimse.pdv import (
    MAX_DATA_PDU,
    MAX_REQUEST_PDU,
    MAXIMUM_LENGTH_RECEIVED,
    PDU_HEADER,
    RESPONSE_BIT,
    AbortReason,
    CommandField,
    Message,
    MessageAssembler,
    PDUType,
    ProtocolError,
    p_data_tf,
)
from dicom_ai.dimse.service import (
    APPLICATION_CONTEXT,
    AcceptedContext,
    Association,
    AssociationSlots,
    CStoreRequest,
    DimseService,
    Refusal,
    Rejection,
    SharedLimit,
    judge_request,
)
from dicom_ai.dimse.transport import ConnectionBroken, ListeningServer, PDUStream
from dicom_ai.dimse.ul_states import Action, Event, State, Transition, event_for_pdu, transition
from dicom_ai.dimse.wire import command_response

__all__ = [
    "AcceptedContext",
    "Acceptor",
    "Association",
    "CStoreRequest",
    "DimseService",
    "Rejection",
    "SharedLimit",
]

log = logging.getLogger(__name__)

_ABORT_SOURCE_SERVICE_PROVIDER = 0x02  # A-ABORT Source (PS3.8 9.3.8)
_UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.5.4
_PROCESSING_FAILURE = 0x0110  # PS3.7 C.5.10

# What the transport reports, as events of the state table.
_Received = tuple[Event, "bytearray | ProtocolError | str | None"]


class _Connection:
    """One accepted socket, from the first byte to close, on its own thread: reads the
    next event, looks up the transition (``ul_states``), performs its action."""

    def __init__(
        self, acceptor: Acceptor, sock: socket.socket, address: str, tls: ssl.SSLContext | None
    ) -> None:
        self.acceptor = acceptor
        self.stream = PDUStream(sock, tls)
        self.address = address
        self.state = State.STA1
        self.association: Association | None = None
        self._request: A_ASSOCIATE | None = None
        self._pending: Association | None = None  # decided, not yet accepted
        self._assembler: MessageAssembler | None = None
        self._ended = False

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except ssl.SSLError as exc:
            log.warning("TLS connection from %s failed: %s", self.address, exc)
        except Exception:
            self._send_abort(AbortReason.REASON_NOT_SPECIFIED)
            log.exception("association with %s failed unexpectedly; aborted", self._who())
        finally:
            self.stream.close()
            self._end()
            self.acceptor.slots.release(self)

    def _serve(self) -> None:
        event: Event | None = Event.TRANSPORT_CONNECTED
        detail: bytearray | ProtocolError | str | None = None
        while event is not None:
            step = transition(self.state, event)
            self.state = step.next_state
            try:
                follow = self._perform(step, event, detail)
            except ProtocolError as exc:  # found inside a PDU (Evt19)
                follow = (Event.INVALID_PDU, exc)
            except ConnectionBroken as exc:
                follow = (Event.TRANSPORT_CLOSED, self._broken(exc))
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO ran out
                follow = (self._timer_event(), None)
            except ssl.SSLError:
                raise
            except OSError as exc:
                follow = (Event.TRANSPORT_CLOSED, f"the connection broke: {exc}")
            if self.state is State.STA1:  # closed: whatever else happened, it is over
                return
            if follow is None:
                follow = self._receive()
            event, detail = follow

    def _timer_event(self) -> Event:
        """Which timer ran out: ARTIM where it runs (Sta2, Sta13), else the network
        timeout, on which the node asks for A-ABORT."""
        if self.state in (State.STA2, State.STA13):
            return Event.ARTIM_EXPIRED
        return Event.A_ABORT_REQUEST

    def _receive(self) -> _Received:
        """The next event from the peer: a PDU, its close, or a timer running out."""
        try:
            if self.state is State.STA13:  # PDUs are ignored here (AA-6)
                closed = self.stream.drain()
                return (Event.TRANSPORT_CLOSED if closed else Event.ARTIM_EXPIRED), None
            header = self.stream.recv_exactly(PDU_HEADER.size)
            pdu_type, length = PDU_HEADER.unpack(header)
            event = event_for_pdu(pdu_type)
            if event is Event.INVALID_PDU:
                return event, ProtocolError(
                    f"unrecognised PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU
                )
            limit = MAX_REQUEST_PDU if self.state is State.STA2 else MAX_DATA_PDU
            if length > limit:
                return Event.INVALID_PDU, ProtocolError(
                    f"PDU of {length} bytes where at most {limit} fit"
                )
            try:
                body = self.stream.recv_exactly(length)
            except ConnectionBroken as exc:
                return Event.TRANSPORT_CLOSED, (
                    f"the connection closed after {exc.received} of {length} bytes of a PDU "
                    f"(type 0x{pdu_type:02X})"
                )
            return event, body
        except ConnectionBroken as exc:
            return Event.TRANSPORT_CLOSED, self._broken(exc)
        except (TimeoutError, BlockingIOError):
            return self._timer_event(), None
        except ssl.SSLError:
            raise
        except OSError as exc:
            return Event.TRANSPORT_CLOSED, f"the connection broke: {exc}"

    @staticmethod
    def _broken(exc: ConnectionBroken) -> str:
        if exc.received:
            return f"the connection closed after {exc.received} of {exc.expected} bytes of a PDU"
        return str(exc)

    # -- actions (PS3.8 9.2, Tables 9-6 to 9-9) ----------------------------------------------

    def _perform(
        self, step: Transition, event: Event, detail: bytearray | ProtocolError | str | None
    ) -> _Received | None:
        """Do ``step.action``; returns a local event that follows from it (the answer to an
        A-ASSOCIATE or A-RELEASE indication), or None to read the next one."""
        action = step.action
        if action is Action.AE_5:
            self.stream.set_timeout(self.acceptor.acse_timeout)  # the ARTIM timer (9.1.5)
            self.stream.start_tls()
        elif action is Action.AE_6:
            assert isinstance(detail, bytearray)
            return self._association_indication(detail), None
        elif action is Action.AE_7:
            self._accept()
        elif action is Action.AE_8:
            pass  # sent by AE-6, which knew why
        elif action is Action.DT_2:
            assert isinstance(detail, bytearray) and self._assembler is not None
            for message in self._assembler.feed(detail):
                self._serve_message(message)
        elif action is Action.AR_2:
            return Event.A_RELEASE_RESPONSE, None  # always granted
        elif action is Action.AR_4:
            self._release()
        elif action in (Action.AA_1, Action.AA_8):
            self._abort(step, event, detail)
        elif action is Action.AA_2:
            if event is Event.ARTIM_EXPIRED and self.association is None:
                log.warning(
                    "connection from %s closed: no valid association request within %s s "
                    "(ARTIM timeout)",
                    self.address,
                    self.acceptor.acse_timeout,
                )
        elif action is Action.AA_3:
            self._log_ended_without_release("A-ABORT from the peer")
        elif action is Action.AA_4:
            self._log_ended_without_release(str(detail))
        elif action is Action.AA_5:
            # A port probe or a health check, or a peer that gave up before asking.
            log.debug(
                "connection from %s closed before an association request: %s",
                self.address,
                detail,
            )
        return None  # AR-5: nothing to do but close

    def _abort(
        self, step: Transition, event: Event, detail: bytearray | ProtocolError | str | None
    ) -> None:
        if isinstance(detail, ProtocolError):
            reason, why = detail.reason, str(detail)
        else:
            # Evt19 without its reason: cannot happen, but say something. Not `or`:
            # reason-not-specified is 0.
            table_reason = step.abort_reason
            reason = AbortReason.UNEXPECTED_PDU if table_reason is None else table_reason
            why = self._unexpected(event)
        self._send_abort(reason)
        if event is Event.A_ABORT_REQUEST:
            log.warning(
                "%s aborted by the node: silent past the network timeout of %s s",
                self._who(),
                self.acceptor.network_timeout,
            )
        else:
            log.warning("%s aborted by the node: %s", self._who(), why)

    def _unexpected(self, event: Event) -> str:
        if self.association is None:
            return f"{event.name} ({event.value}) before an A-ASSOCIATE-RQ"
        return f"unexpected {event.name} ({event.value}) in an association"

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self._send_pdu(
                PDUType.A_ABORT, bytes((0, 0, _ABORT_SOURCE_SERVICE_PROVIDER, int(reason)))
            )

    def _send_pdu(self, pdu_type: int, body: bytes) -> None:
        self.stream.send(PDU_HEADER.pack(pdu_type, len(body)) + body)

    def _end(self) -> None:
        """Tell the service the association is over, once."""
        if self.association is not None and not self._ended:
            self._ended = True
            self.acceptor.association_ended(self.association)

    def _who(self) -> str:
        if self.association is None:
            return f"connection from {self.address}"
        return f"association from {self.association.requestor}"

    def _log_ended_without_release(self, why: str) -> None:
        if self.association is None:  # the A-ASSOCIATE-AC did not go out
            log.debug("connection from %s closed: %s", self.address, why)
            return
        log.warning(
            "association from %s ended without release: aborted by the peer or the "
            "connection broke (%s); an instance still in transfer was not stored",
            self.association.requestor,
            why,
        )

    # -- association establishment -----------------------------------------------------------

    def _association_indication(self, body: bytearray) -> Event:
        """AE-6: decode the A-ASSOCIATE-RQ and decide; a refusal's A-ASSOCIATE-RJ is
        sent here."""
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(PDU_HEADER.pack(PDUType.A_ASSOCIATE_RQ, len(body)) + bytes(body))
            request = pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises what struct and its items raise
            raise ProtocolError(
                f"A-ASSOCIATE-RQ does not decode: {exc}", AbortReason.INVALID_PDU_PARAMETER
            ) from exc
        association = Association(
            calling_ae_title=str(request.calling_ae_title).strip(),
            called_ae_title=str(request.called_ae_title).strip(),
            address=self.address,
            tls=self.stream.is_tls,
            peer_maximum_length=int(request.maximum_length_received or 0),
        )
        refusal = judge_request(
            str(request.application_context_name),
            association,
            self.acceptor.service,
            self.acceptor.slots,
            self,
            self.stream.shutdown,
        )
        if refusal is not None:
            log.warning(
                "association from %s to %s rejected: %s",
                association.requestor,
                association.called_ae_title,
                refusal.reason,
            )
            self._send_reject(refusal)
            return Event.A_ASSOCIATE_REJECT
        self._request, self._pending = request, association
        return Event.A_ASSOCIATE_ACCEPT

    def _send_reject(self, refusal: Refusal) -> None:
        reject = A_ASSOCIATE()
        reject.result = refusal.result
        reject.result_source = refusal.source
        reject.diagnostic = refusal.diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(reject)
        with contextlib.suppress(OSError):
            self.stream.sock.sendall(pdu.encode())

    def _accept(self) -> None:
        """AE-7: negotiate the presentation contexts, send A-ASSOCIATE-AC."""
        request, association = self._request, self._pending
        assert request is not None and association is not None
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in request.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        results, reply_roles = negotiate_unrestricted(
            request.presentation_context_definition_list, self.acceptor.supported_contexts, roles
        )
        for context in results:
            if context.result == 0x00 and context.context_id is not None:
                association.contexts[context.context_id] = AcceptedContext(
                    context.context_id,
                    UID(str(context.abstract_syntax)),
                    UID(str(context.transfer_syntax[0])),
                )
        accept = A_ASSOCIATE()
        accept.application_context_name = APPLICATION_CONTEXT
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.presentation_context_definition_results_list = results
        accept.user_information = [*self.acceptor.user_information(), *reply_roles]
        pdu_ac = A_ASSOCIATE_AC()
        pdu_ac.from_primitive(accept)
        self.stream.send(pdu_ac.encode())
        self.association, self._request, self._pending = association, None, None
        self._assembler = MessageAssembler(association.contexts)
        self.stream.set_timeout(self.acceptor.network_timeout)
        log.debug(
            "association from %s to %s accepted, %d of %d presentation contexts",
            association.requestor,
            association.called_ae_title,
            len(association.contexts),
            len(results),
        )

    def _release(self) -> None:
        """AR-4: A-RELEASE-RP, then wait (ARTIM) for the requestor to close."""
        assert self.association is not None
        self.association.released = True
        self._send_pdu(PDUType.A_RELEASE_RP, b"\x00" * 4)
        log.debug("association from %s released", self.association.requestor)
        self._end()  # the series may be complete now; do not wait for the close
        self.stream.set_timeout(self.acceptor.acse_timeout)

    # -- DIMSE -------------------------------------------------------------------------------

    def _serve_message(self, message: Message) -> None:
        assert self.association is not None
        command = message.command
        context = self.association.contexts[message.context_id]
        field_ = command.command_field
        message_id = command.message_id
        sop_class = command.affected_sop_class_uid or str(context.abstract_syntax)
        sop_instance = command.affected_sop_instance_uid
        if field_ == CommandField.C_STORE_RQ:
            request = CStoreRequest(
                self.association, context, message_id, sop_class, sop_instance, message.data_set
            )
            status = self._call(lambda: self.acceptor.service.c_store(request))
        elif field_ == CommandField.C_ECHO_RQ:
            association = self.association
            status = self._call(lambda: self.acceptor.service.c_echo(association))
        elif field_ == CommandField.C_CANCEL_RQ:
            return  # nothing in progress to cancel: one message at a time
        else:
            log.warning("%s: DIMSE command 0x%04X is not served (0x0211)", self._who(), field_)
            status = _UNRECOGNIZED_OPERATION
        response = command_response(
            field_ | RESPONSE_BIT, message_id, sop_class, sop_instance, status
        )
        self.stream.send(
            p_data_tf(message.context_id, response, self.association.peer_maximum_length)
        )

    def _call(self, handler: Callable[[], int]) -> int:
        try:
            return handler()
        except Exception:
            log.exception("%s: a DIMSE handler raised; answered 0x0110", self._who())
            return _PROCESSING_FAILURE


class Acceptor:
    """Listens on a port (plain or TLS) and runs each association on its own thread.

    ``supported_contexts`` are negotiated as pynetdicom's acceptor does; every storage
    (or unknown, or private) abstract syntax is accepted with the first transfer syntax
    proposed, so files are kept exactly as sent.
    """

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
        self._servers: list[ListeningServer] = []

    def user_information(
        self,
    ) -> list[
        MaximumLengthNotification
        | ImplementationClassUIDNotification
        | ImplementationVersionNameNotification
    ]:
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = MAXIMUM_LENGTH_RECEIVED
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        return [maximum, implementation, version]

    def association_ended(self, association: Association) -> None:
        try:
            self.service.association_ended(association)
        except Exception:
            log.exception("could not record the end of the association")

    def _connection(self, sock: socket.socket, address: str, tls: ssl.SSLContext | None) -> None:
        _Connection(self, sock, address, tls).run()

    def serve(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        listening: socket.socket | None = None,
    ) -> int:
        """Start listening (returns at once), on a new socket or on ``listening``, a socket
        another process listens on too; the bound port."""
        server = ListeningServer((host, port), self._connection, tls, listening)
        server.sharing = server.sharing or any(s.sharing for s in self._servers)
        self._servers.append(server)
        server.serve_in_thread()
        return int(server.server_address[1])

    def listening_socket(self, port: int) -> socket.socket:
        """The socket listening on ``port``, to share with receiver processes."""
        for server in self._servers:
            server.sharing = True
        for server in self._servers:
            if server.server_address[1] == port:
                return server.socket
        raise KeyError(port)

    def stop(self) -> None:
        """Stop listening and close every open association's connection."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
        self.slots.close_all()

"""The association acceptor: DICOM upper layer (PS3.8) and DIMSE message framing (PS3.7)
for the node's receiving side, one thread per association.

Why by hand: pynetdicom hands every PDU through two threads, queues and a state machine
that polls with sleeps; storing nothing at all it tops out near 270 images/s on two cores,
below Orthanc's figure on this kind of machine. Here one thread reads a PDU into one buffer,
and the C-STORE is stored and answered on that same thread. The parts with rules to get
right stay with the libraries: pynetdicom decodes A-ASSOCIATE-RQ, negotiates presentation
contexts and encodes A-ASSOCIATE-AC/RJ; pydicom decodes and encodes command sets.

What a peer can get from here, and when (PS3.8 9.2, acceptor side):

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
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Protocol, cast

from pydicom.filereader import data_element_generator
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

from dicom_ai.dimse.wire import command_response, part10_header

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

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1

# PDU types (PS3.8 9.3.1)
_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04
_A_RELEASE_RQ = 0x05
_A_ABORT = 0x07
_KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

# An A-ASSOCIATE-RQ is a few KB; more before association is garbage, not a request.
_MAX_REQUEST_PDU = 1 << 20
# Advertised maximum P-DATA-TF length (PS3.8 D.1): a 512x512 slice fits in one PDU. Each
# PDU is read into one buffer of its announced length, so a length far past what was
# advertised is refused (A-ABORT) rather than allocated.
_MAXIMUM_LENGTH_RECEIVED = 4 << 20
_MAX_DATA_PDU = 16 * _MAXIMUM_LENGTH_RECEIVED
# Where receiver processes share the listening socket: how long one waits per connection
# it holds (up to _DEFER_LIMIT of them) before it accepts a new one.
_DEFER_SECONDS = 0.005
_DEFER_LIMIT = 2
# How often the accept loop looks for a shutdown request: stop() waits up to this long
# (socketserver's default, 0.5 s, was most of a node's stop time).
_SHUTDOWN_POLL_SECONDS = 0.05

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
_REJECTED_PERMANENT, _REJECTED_TRANSIENT = 0x01, 0x02
_SOURCE_SERVICE_USER, _SOURCE_PRESENTATION = 0x01, 0x03
_APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
_LOCAL_LIMIT_EXCEEDED = 0x02

# A-ABORT sources and reasons (PS3.8 9.3.8)
_ABORT_SERVICE_PROVIDER = 0x02
_REASON_NOT_SPECIFIED, _UNRECOGNIZED_PDU, _UNEXPECTED_PDU = 0x00, 0x01, 0x02
_INVALID_PDU_PARAMETER = 0x06

# DIMSE (PS3.7 E.1)
_C_STORE_RQ, _C_ECHO_RQ, _C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_RESPONSE_BIT = 0x8000
_NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows
_UNRECOGNIZED_OPERATION = 0x0211

_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_COMMAND_FRAGMENT, _LAST_FRAGMENT = 0x01, 0x02


@dataclass(frozen=True)
class Rejection:
    """Why an association request is refused: the A-ASSOCIATE-RJ diagnostic and a reason
    for the log (PS3.8 9.3.4; result rejected-permanent, source service user)."""

    diagnostic: int
    reason: str


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: UID
    transfer_syntax: UID


@dataclass
class Association:
    """An association in progress, as the services see it."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    tls: bool
    contexts: dict[int, AcceptedContext] = field(default_factory=dict)
    released: bool = False
    peer_maximum_length: int = 0  # 0: unlimited

    @property
    def requestor(self) -> str:
        return f"{self.calling_ae_title}@{self.address}"


@dataclass(frozen=True)
class CStoreRequest:
    """A complete C-STORE-RQ: its command's identifying fields and the data set as sent."""

    association: Association
    context: AcceptedContext
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    data_set: tuple[memoryview, ...]  # the fragments as received

    def file_contents(self) -> tuple[bytes | memoryview, ...]:
        """The instance as a Part 10 file, in pieces: preamble and file meta (PS3.10 7.1),
        then the data set fragments exactly as received, so nothing is decoded, re-encoded
        or joined here. Raises ``EncodingError`` when the command's UIDs cannot go into the
        file meta."""
        header = part10_header(
            self.affected_sop_class_uid,
            self.affected_sop_instance_uid,
            self.context.transfer_syntax,
            PYNETDICOM_IMPLEMENTATION_UID,
            PYNETDICOM_IMPLEMENTATION_VERSION,
            self.association.calling_ae_title,
        )
        return (header, *self.data_set)


class SharedLimit(Protocol):
    """A count of open associations shared by processes accepting on one socket (a
    ``multiprocessing`` BoundedSemaphore): ``maximum_associations`` is then node-wide."""

    def acquire(self, block: bool = ..., timeout: float | None = ...) -> bool: ...

    def release(self) -> None: ...


class DimseService(Protocol):
    """What the acceptor asks of the SCP. None of these may raise; an exception is logged
    and answered with 0x0110 (processing failure)."""

    def admit(self, association: Association) -> Rejection | None: ...

    def c_echo(self, association: Association) -> int: ...

    def c_store(self, request: CStoreRequest) -> int: ...

    def association_ended(self, association: Association) -> None: ...


class _ProtocolError(Exception):
    """The peer broke PS3.8: answered with A-ABORT."""

    def __init__(self, message: str, reason: int = _UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class _ConnectionBroken(Exception):
    """The connection closed (or reset) where a PDU or its rest was due."""


@dataclass
class _Message:
    """A DIMSE message being reassembled from PDVs (PS3.7 E.2)."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    command_set: _Command | None = None
    data_set: list[memoryview] = field(default_factory=list)


class _Connection:
    """One accepted socket, from the first byte to close, on its own thread."""

    def __init__(
        self,
        acceptor: Acceptor,
        sock: socket.socket,
        address: str,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.acceptor = acceptor
        self.sock = sock
        self.address = address
        self.tls = tls
        self.association: Association | None = None
        self._ended = False
        self._message: _Message | None = None
        self._quickack_option: int | None = getattr(socket, "TCP_QUICKACK", None)
        self._recv_flags = 0
        self._answered = True  # something was sent since quick ACKs were last asked for

    # -- reading -----------------------------------------------------------------------------

    def _recv_exactly(self, length: int) -> bytearray:
        buffer = bytearray(length)
        view = memoryview(buffer)
        received = 0
        while received < length:
            if self._answered:
                self._quickack()
                self._answered = False
            try:
                count = self.sock.recv_into(view[received:], length - received, self._recv_flags)
            except BlockingIOError:  # SO_RCVTIMEO ran out (see _set_timeout)
                raise TimeoutError("receive timed out") from None
            if count == 0:
                raise _ConnectionBroken(
                    f"the connection closed after {received} of {length} bytes of a PDU"
                    if received or length != _PDU_HEADER.size
                    else "the connection closed"
                )
            received += count
        return buffer

    def _set_timeout(self, seconds: float | None) -> None:
        """A plain socket blocks, with the kernel's own timeouts, so that one
        recv(MSG_WAITALL) takes a whole PDU: with Python's timeout the socket is
        non-blocking and a 512 KB slice takes ~12 reads, each a wait for the GIL under
        load. TLS keeps Python's timeout (no flags on an SSL read)."""
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

    def _quickack(self) -> None:
        """ACK at once rather than up to 40 ms later. A sender with Nagle on (DCMTK's and
        Orthanc's default) holds its last small segment until the previous one is ACKed.
        Linux leaves quick-ACK mode when we answer (it takes the exchange for interactive),
        so it is asked for again at the first read after each answer; asking before every
        read cost ~10% of the interpreter's time under load (each sends a pending ACK)."""
        if self._quickack_option is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, self._quickack_option, 1)
            except OSError:
                self._quickack_option = None

    def _read_pdu(self, limit: int | None = None) -> tuple[int, bytearray]:
        header = self._recv_exactly(_PDU_HEADER.size)
        pdu_type, length = _PDU_HEADER.unpack(header)
        if pdu_type not in _KNOWN_PDU_TYPES:
            raise _ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", _UNRECOGNIZED_PDU)
        if limit is not None and length > limit:
            raise _ProtocolError(f"PDU of {length} bytes where at most {limit} fit")
        try:
            body = self._recv_exactly(length)
        except _ConnectionBroken as exc:
            raise _ConnectionBroken(f"{exc} (type 0x{pdu_type:02X})") from None
        return pdu_type, body

    # -- writing -----------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self._answered = True

    def _send_pdu(self, pdu_type: int, body: bytes) -> None:
        self._send(_PDU_HEADER.pack(pdu_type, len(body)) + body)

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self._send_pdu(_A_ABORT, bytes((0, 0, _ABORT_SERVICE_PROVIDER, reason)))

    def _send_command(self, context_id: int, command: bytes) -> None:
        """A command set as PDVs, split when the peer's maximum PDU length asks for it."""
        assert self.association is not None
        maximum = self.association.peer_maximum_length
        room = len(command) if maximum == 0 else max(maximum - 6, 1)
        pdus = []
        for start in range(0, len(command), room):
            fragment = command[start : start + room]
            last = start + room >= len(command)
            control = _COMMAND_FRAGMENT | (_LAST_FRAGMENT if last else 0)
            pdv = _PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
            pdus.append(_PDU_HEADER.pack(_P_DATA_TF, len(pdv)) + pdv)
        self._send(b"".join(pdus))

    # -- the association ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except _ConnectionBroken as exc:
            self._log_broken(str(exc))
        except _ProtocolError as exc:
            self._send_abort(exc.reason)
            log.warning("%s aborted by the node: %s", self._who(), exc)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO ran out
            self._log_timeout()
        except ssl.SSLError as exc:
            log.warning("TLS connection from %s failed: %s", self.address, exc)
        except OSError as exc:
            self._log_broken(f"the connection broke: {exc}")
        except Exception:
            self._send_abort(_REASON_NOT_SPECIFIED)
            log.exception("association with %s failed unexpectedly; aborted", self._who())
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            self._end()
            self.acceptor.release_slot(self)

    def _end(self) -> None:
        """Tell the service the association is over, once."""
        if self.association is not None and not self._ended:
            self._ended = True
            self.acceptor.association_ended(self.association)

    def _who(self) -> str:
        if self.association is None:
            return f"connection from {self.address}"
        return f"association from {self.association.requestor}"

    def _log_broken(self, why: str) -> None:
        if self.association is None:
            # A port probe or a health check, or a peer that gave up before asking.
            log.debug(
                "connection from %s closed before an association request: %s", self.address, why
            )
        elif not self.association.released:
            log.warning(
                "association from %s ended without release: aborted by the peer or the "
                "connection broke (%s); an instance still in transfer was not stored",
                self.association.requestor,
                why,
            )

    def _log_timeout(self) -> None:
        if self.association is None:
            log.warning(
                "connection from %s closed: no valid association request within %s s "
                "(ARTIM timeout)",
                self.address,
                self.acceptor.acse_timeout,
            )
            return
        if self.association.released:
            return
        self._send_abort(_REASON_NOT_SPECIFIED)
        log.warning(
            "association from %s aborted by the node: silent past the network timeout of %s s",
            self.association.requestor,
            self.acceptor.network_timeout,
        )

    def _serve(self) -> None:
        self._set_timeout(self.acceptor.acse_timeout)  # the ARTIM timer (PS3.8 9.1.5)
        if self.tls is not None:
            self.sock = self.tls.wrap_socket(self.sock, server_side=True)  # handshake here
        pdu_type, body = self._read_pdu(limit=_MAX_REQUEST_PDU)
        if pdu_type != _A_ASSOCIATE_RQ:
            raise _ProtocolError(f"PDU type 0x{pdu_type:02X} before an A-ASSOCIATE-RQ")
        if not self._negotiate(body):
            return
        self._set_timeout(self.acceptor.network_timeout)
        while True:
            pdu_type, body = self._read_pdu(limit=_MAX_DATA_PDU)
            if pdu_type == _P_DATA_TF:
                self._p_data(body)
            elif pdu_type == _A_RELEASE_RQ:
                self._release()
                return
            elif pdu_type == _A_ABORT:
                raise _ConnectionBroken("A-ABORT from the peer")
            else:
                raise _ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} in an association")

    def _negotiate(self, body: bytearray) -> bool:
        """Answer the A-ASSOCIATE-RQ; True when the association is established."""
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(_PDU_HEADER.pack(_A_ASSOCIATE_RQ, len(body)) + bytes(body))
            request = pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises what struct and its items raise
            raise _ProtocolError(
                f"A-ASSOCIATE-RQ does not decode: {exc}", _INVALID_PDU_PARAMETER
            ) from exc
        association = Association(
            calling_ae_title=str(request.calling_ae_title).strip(),
            called_ae_title=str(request.called_ae_title).strip(),
            address=self.address,
            tls=isinstance(self.sock, ssl.SSLSocket),
            peer_maximum_length=int(request.maximum_length_received or 0),
        )
        rejection = self._rejection(request, association)
        if rejection is not None:
            result, source, diagnostic, reason = rejection
            log.warning(
                "association from %s to %s rejected: %s",
                association.requestor,
                association.called_ae_title,
                reason,
            )
            self._send_reject(result, source, diagnostic)
            return False

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
        self._send(pdu_ac.encode())
        self.association = association
        log.debug(
            "association from %s to %s accepted, %d of %d presentation contexts",
            association.requestor,
            association.called_ae_title,
            len(association.contexts),
            len(results),
        )
        return True

    def _rejection(
        self, request: A_ASSOCIATE, association: Association
    ) -> tuple[int, int, int, str] | None:
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return (
                _REJECTED_PERMANENT,
                _SOURCE_SERVICE_USER,
                _APPLICATION_CONTEXT_NOT_SUPPORTED,
                f"application context {request.application_context_name} is not DICOM's",
            )
        refused = self.acceptor.service.admit(association)
        if refused is not None:
            return (_REJECTED_PERMANENT, _SOURCE_SERVICE_USER, refused.diagnostic, refused.reason)
        if not self.acceptor.take_slot(self):
            return (
                _REJECTED_TRANSIENT,
                _SOURCE_PRESENTATION,
                _LOCAL_LIMIT_EXCEEDED,
                f"{self.acceptor.maximum_associations} associations are open already",
            )
        return None

    def _send_reject(self, result: int, source: int, diagnostic: int) -> None:
        reject = A_ASSOCIATE()
        reject.result = result
        reject.result_source = source
        reject.diagnostic = diagnostic
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(reject)
        with contextlib.suppress(OSError):
            self.sock.sendall(pdu.encode())

    def _release(self) -> None:
        assert self.association is not None
        self.association.released = True
        self._send_pdu(0x06, b"\x00" * 4)  # A-RELEASE-RP
        log.debug("association from %s released", self.association.requestor)
        self._end()  # the series may be complete now; do not wait for the close
        # The requestor closes the connection (PS3.8 9.2, AR-4); wait for it, not forever.
        self._set_timeout(self.acceptor.acse_timeout)
        with contextlib.suppress(OSError):
            while self.sock.recv(4096):
                pass

    # -- DIMSE -------------------------------------------------------------------------------

    def _p_data(self, body: bytearray) -> None:
        assert self.association is not None
        view = memoryview(body)
        offset = 0
        while offset < len(body):
            if offset + _PDV_HEADER.size > len(body):
                raise _ProtocolError("a PDV item runs past its P-DATA-TF", _INVALID_PDU_PARAMETER)
            item_length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
            end = offset + 4 + item_length
            if item_length < 2 or end > len(body):
                raise _ProtocolError("a PDV item runs past its P-DATA-TF", _INVALID_PDU_PARAMETER)
            if context_id not in self.association.contexts:
                raise _ProtocolError(f"a PDV on presentation context {context_id}, not accepted")
            self._fragment(context_id, control, view[offset + _PDV_HEADER.size : end])
            offset = end

    def _fragment(self, context_id: int, control: int, fragment: memoryview) -> None:
        message = self._message
        if message is None:
            message = self._message = _Message(context_id)
        elif message.context_id != context_id:
            raise _ProtocolError("a message's fragments on two presentation contexts")
        if control & _COMMAND_FRAGMENT:
            if message.command_set is not None:
                raise _ProtocolError("a second command set inside one message")
            message.command += fragment
            if control & _LAST_FRAGMENT:
                message.command_set = _decode_command(bytes(message.command))
                if message.command_set.data_set_type == _NO_DATA_SET:
                    if message.command_set.command_field == _C_STORE_RQ:
                        raise _ProtocolError("a C-STORE-RQ that says no data set follows")
                    self._dispatch(message)
            return
        if message.command_set is None:
            raise _ProtocolError("a data set fragment before its command set")
        message.data_set.append(fragment)
        if control & _LAST_FRAGMENT:
            self._dispatch(message)

    def _dispatch(self, message: _Message) -> None:
        self._message = None
        assert self.association is not None and message.command_set is not None
        command = message.command_set
        context = self.association.contexts[message.context_id]
        field_ = command.command_field
        message_id = command.message_id
        sop_class = command.affected_sop_class_uid or str(context.abstract_syntax)
        sop_instance = command.affected_sop_instance_uid
        if field_ == _C_STORE_RQ:
            request = CStoreRequest(
                self.association,
                context,
                message_id,
                sop_class,
                sop_instance,
                tuple(message.data_set),
            )
            status = self._call(lambda: self.acceptor.service.c_store(request))
        elif field_ == _C_ECHO_RQ:
            association = self.association
            status = self._call(lambda: self.acceptor.service.c_echo(association))
        elif field_ == _C_CANCEL_RQ:
            return  # nothing in progress to cancel: one message at a time
        else:
            log.warning("%s: DIMSE command 0x%04X is not served (0x0211)", self._who(), field_)
            status = _UNRECOGNIZED_OPERATION
        self._send_command(
            message.context_id,
            command_response(field_ | _RESPONSE_BIT, message_id, sop_class, sop_instance, status),
        )

    def _call(self, handler: Callable[[], int]) -> int:
        try:
            return handler()
        except Exception:
            log.exception("%s: a DIMSE handler raised; answered 0x0110", self._who())
            return 0x0110


@dataclass(frozen=True)
class _Command:
    """The command set elements the acceptor acts on (PS3.7 E.1-1)."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    data_set_type: int


# Command set tags (group 0000) and how their values read. Elements are walked raw: a
# pydicom Dataset converted and validated each value on access, ~16% of a C-STORE's
# interpreter time under load (py-spy --gil).
_US = struct.Struct("<H")
_COMMAND_FIELD, _MESSAGE_ID, _DATA_SET_TYPE = 0x00000100, 0x00000110, 0x00000800
_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE = 0x00000002, 0x00001000


def _decode_command(data: bytes) -> _Command:
    """A command set is always Implicit VR Little Endian (PS3.7 6.3.1)."""
    try:
        values = {
            int(element.tag): element.value
            for element in data_element_generator(BytesIO(data), True, True)
        }
        if _COMMAND_FIELD not in values:
            raise ValueError("it has no Command Field")

        def unsigned_short(tag: int, default: int) -> int:
            value = values.get(tag)
            return default if value is None else int(_US.unpack(value)[0])

        def uid(tag: int) -> str:
            value = values.get(tag)
            return value.decode("latin-1").strip(" \x00") if isinstance(value, bytes) else ""

        return _Command(
            unsigned_short(_COMMAND_FIELD, 0),
            unsigned_short(_MESSAGE_ID, 0),
            uid(_AFFECTED_SOP_CLASS),
            uid(_AFFECTED_SOP_INSTANCE),
            unsigned_short(_DATA_SET_TYPE, _NO_DATA_SET),
        )
    except Exception as exc:
        raise _ProtocolError(
            f"a command set does not decode: {exc}", _INVALID_PDU_PARAMETER
        ) from exc


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    # socketserver's default backlog is 5: a burst of senders (or receiver processes
    # deferring, below) would overflow it, and each dropped connection waits ~1 s to retry.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self,
        address: tuple[str, int],
        acceptor: Acceptor,
        tls: ssl.SSLContext | None,
        listening: socket.socket | None = None,
    ) -> None:
        self.acceptor = acceptor
        self.tls = tls
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
        if self.acceptor.sharing and self._connections:
            # A process holding connections lets an idler one accept first: 6 connections
            # at once onto 3 processes split 2-2-2 in 10 of 10 tries, 4 of 10 without.
            time.sleep(min(self._connections, _DEFER_LIMIT) * _DEFER_SECONDS)
        sock, address = self.socket.accept()  # BlockingIOError: another process took it
        with self._count_lock:
            self._connections += 1
        return sock, address

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._count_lock:
            self._connections -= 1
        super().shutdown_request(request)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = cast(socket.socket, self.request)
        # C-STORE-RSPs are small: without this, Nagle + delayed ACK stall each exchange.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Connection(self.server.acceptor, sock, str(self.client_address[0]), self.server.tls).run()


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
        self._slots = _Slots(maximum_associations, shared_limit)
        self._servers: list[_Server] = []
        self.sharing = False  # other processes accept on the same listening sockets

    def user_information(
        self,
    ) -> list[
        MaximumLengthNotification
        | ImplementationClassUIDNotification
        | ImplementationVersionNameNotification
    ]:
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = _MAXIMUM_LENGTH_RECEIVED
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        return [maximum, implementation, version]

    def take_slot(self, connection: _Connection) -> bool:
        return self._slots.take(connection)

    def release_slot(self, connection: _Connection) -> None:
        self._slots.release(connection)

    def association_ended(self, association: Association) -> None:
        try:
            self.service.association_ended(association)
        except Exception:
            log.exception("could not record the end of the association")

    def serve(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        listening: socket.socket | None = None,
    ) -> int:
        """Start listening (returns at once), on a new socket or on ``listening``, a socket
        another process listens on too; the bound port."""
        if listening is not None:
            self.sharing = True
        server = _Server((host, port), self, tls, listening)
        self._servers.append(server)
        bound = int(server.server_address[1])
        threading.Thread(
            target=server.serve_forever,
            args=(_SHUTDOWN_POLL_SECONDS,),
            name=f"dicom-ai-accept-{bound}",
            daemon=True,
        ).start()
        return bound

    def listening_socket(self, port: int) -> socket.socket:
        """The socket listening on ``port``, to share with receiver processes."""
        self.sharing = True
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
        self._slots.close_all()


class _Slots:
    """Open associations in this process, against the limit: this process's own, or
    ``shared``, counted across the processes that accept on the same socket."""

    def __init__(self, limit: int, shared: SharedLimit | None = None) -> None:
        self._limit = limit
        self._shared = shared
        self._lock = threading.Lock()
        self._open: dict[int, _Connection] = {}
        self._closed = False  # stopping: no new association, even one mid-handshake

    def take(self, connection: _Connection) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._shared is not None:
                if not self._shared.acquire(False):
                    return False
            elif len(self._open) >= self._limit:
                return False
            self._open[id(connection)] = connection
            return True

    def release(self, connection: _Connection) -> None:
        with self._lock:
            if self._open.pop(id(connection), None) is not None and self._shared is not None:
                self._shared.release()

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._open.values())
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

"""C-ECHO and C-STORE SCP.

The C-STORE handler does I/O only: the bytes as received go to the spool (temp file, fsync,
rename), a few header fields go to the index, and only then it answers Success. Pixel data is
never decoded here. Every failure maps, in ``_status_for``, to a DIMSE status and a log line;
no exception leaves a handler.

Who may associate is decided before any presentation context is negotiated, per called AE
title (``AccessPolicy``): an unknown called AE, a calling AE or an address not on that title's
list gets A-ASSOCIATE-RJ and a log line. One AE listens on a plain port, a TLS port, or both.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, cast

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai.dimse.status import VERIFICATION_SOP_CLASS, Status
from dicom_ai.errors import DicomAIError, InputError, OutOfSpaceError, StorageError
from dicom_ai.store.header import MissingAttributeError, parse_header
from dicom_ai.store.index import Index, InstanceRecord
from dicom_ai.store.spool import Spool

__all__ = ["AccessPolicy", "CalledAE", "Rejection", "StorageSCP"]

log = logging.getLogger(__name__)

# Accept whatever storage SOP class and transfer syntax the sender proposes first, so files
# are kept exactly as sent; SOP classes that are not storage get 0x0122 in the handler.
_config.UNRESTRICTED_STORAGE_SERVICE = True

_DUL_IDLE_SLEEP_SECONDS = 0.0001
_STORAGE_SOP_CLASSES = frozenset(UID(uid) for uid in _STORAGE_CLASSES.values())
_UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]


class _SOPClassMismatch(InputError):
    pass


class _UnsupportedSOPClass(InputError):
    pass


def _status_for(exc: BaseException) -> Status:
    """The one place where failures become DIMSE statuses."""
    if isinstance(exc, OutOfSpaceError):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, _UnsupportedSOPClass):
        return Status.SOP_CLASS_NOT_SUPPORTED
    if isinstance(exc, _SOPClassMismatch | MissingAttributeError):
        # The data set parses but is not (a complete) instance of its SOP class.
        return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InputError):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, StorageError):
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE


def _log_unreleased_end(assoc: Any) -> None:
    """A log line for a connection that ended other than by release or rejection (those
    are logged already): a silent peer, a broken-off transfer, an abort. Never raises."""
    try:
        if assoc.is_released or assoc.is_rejected:
            return
        address = assoc.requestor.address
        if assoc.requestor.primitive is None:  # no A-ASSOCIATE-RQ was ever decoded
            if assoc.dul.artim_timer.expired:
                log.warning(
                    "connection from %s closed: no valid association request within %s s "
                    "(ARTIM timeout)",
                    address,
                    assoc.dul.artim_timer.timeout,
                )
            else:  # a port probe, a health check
                log.debug("connection from %s closed before an association request", address)
            return
        who = f"{str(assoc.requestor.ae_title).strip()}@{address}"
        if assoc.is_aborted:  # aborted here: network timeout, DIMSE timeout, bad PDU
            log.warning(
                "association from %s aborted by the node (silent past the network timeout "
                "of %s s, or a protocol error)",
                who,
                assoc.network_timeout,
            )
        else:
            log.warning(
                "association from %s ended without release: aborted by the peer or the "
                "connection broke; an instance still in transfer was not stored",
                who,
            )
    except Exception:
        log.exception("could not describe the end of a connection")


# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-permanent, by the service user, with a reason.
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNIZED = 0x03
_CALLED_AE_NOT_RECOGNIZED = 0x07

_Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class CalledAE:
    """An AE title the node answers to; empty lists allow anyone."""

    ae_title: str
    allowed_calling_aes: frozenset[str] = frozenset()
    allowed_networks: tuple[_Network, ...] = ()
    require_tls: bool = False


@dataclass(frozen=True)
class Rejection:
    diagnostic: int
    reason: str


@dataclass(frozen=True)
class AccessPolicy:
    called_aes: Mapping[str, CalledAE] = field(default_factory=dict)

    def check(
        self, called_ae: str, calling_ae: str, address: str, tls: bool = False
    ) -> Rejection | None:
        """None when the association may proceed, else why not."""
        called = self.called_aes.get(called_ae.strip())
        if called is None:
            return Rejection(_CALLED_AE_NOT_RECOGNIZED, f"called AE {called_ae!r} is not served")
        if called.require_tls and not tls:
            # No reason code for "use TLS" either; the connection is not acceptable as it is.
            return Rejection(
                _CALLING_AE_NOT_RECOGNIZED, f"{called.ae_title} accepts TLS connections only"
            )
        if called.allowed_calling_aes and calling_ae.strip() not in called.allowed_calling_aes:
            return Rejection(
                _CALLING_AE_NOT_RECOGNIZED,
                f"calling AE {calling_ae!r} is not allowed on {called.ae_title}",
            )
        if called.allowed_networks and not _address_in(address, called.allowed_networks):
            # DICOM has no reason code for an address; the calling AE's is the nearest.
            return Rejection(
                _CALLING_AE_NOT_RECOGNIZED,
                f"address {address} is not allowed on {called.ae_title}",
            )
        return None


def _address_in(address: str, networks: tuple[_Network, ...]) -> bool:
    try:
        ip = ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


class _AccessControlledACSE(ACSE):
    """pynetdicom's acceptor negotiation, preceded by the access policy.

    pynetdicom can only require one called AE title and one calling list for the whole AE;
    the node needs both per called AE title, and the address, so the check runs here.
    """

    def __init__(self, assoc: Any, policy: AccessPolicy) -> None:
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        request = cast(A_ASSOCIATE, self.requestor.primitive)
        called = str(request.called_ae_title).strip()
        calling = str(request.calling_ae_title).strip()
        address = str(self.requestor.address)
        tls = isinstance(getattr(self.assoc.dul.socket, "socket", None), ssl.SSLSocket)
        rejection = self._policy.check(called, calling, address, tls)
        if rejection is not None:
            log.warning(
                "association from %s@%s to %s rejected: %s",
                calling,
                address,
                called,
                rejection.reason,
            )
            self.requestor.ae_title = calling
            self.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, rejection.diagnostic)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        # Answer as the title that was called; handlers read it as the acceptor's.
        self.acceptor.ae_title = called
        super()._negotiate_as_acceptor()


class _ReusePortServer(ThreadedAssociationServer):
    """An association server whose port other processes may bind too (SO_REUSEPORT)."""

    def server_bind(self) -> None:
        sock = cast(socket.socket, self.socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StorageSCP:
    """The node's listening side. ``start()`` returns at once.

    ``port`` is the bound plain port, ``tls_port`` the bound TLS port; either may be None.
    """

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int | None,
        spool: Spool,
        index: Index,
        max_associations: int = 10,
        access: AccessPolicy | None = None,
        tls: tuple[int, ssl.SSLContext] | None = None,
        reuse_port: bool = False,
        network_timeout: float = 60.0,
        acse_timeout: float = 30.0,
    ) -> None:
        self.ae_title = ae_title
        # Several receiver processes listen on the same port(s): the kernel spreads the
        # connections over them (SO_REUSEPORT), so receiving uses more than one core.
        self._server_class = _ReusePortServer if reuse_port else ThreadedAssociationServer
        self.host = host
        self._requested_port = port
        self._tls = tls
        self.spool = spool
        self.index = index
        self.access = access or AccessPolicy({ae_title: CalledAE(ae_title)})
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_associations = max_associations
        # No PDU limit: a 512 KB slice then comes in a few PDUs instead of 32, and pynetdicom's
        # per-PDU Python work was a measured share of the per-instance time.
        self._ae.maximum_pdu_size = 0
        self._ae.network_timeout = network_timeout
        self._ae.acse_timeout = acse_timeout
        self._ae.dimse_timeout = network_timeout
        self._ae.add_supported_context(VERIFICATION_SOP_CLASS, _UNCOMPRESSED)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._association_ids: dict[int, int] = {}
        self._ids_lock = threading.Lock()

    @property
    def port(self) -> int | None:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        return self._tls[0] if self._tls else None

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        titles = ", ".join(sorted(self.access.called_aes))
        if self._requested_port is not None:
            self._server = self._serve(self._requested_port, None, handlers)
            log.debug("listening as %s on %s:%d", titles, self.host, self.port)
        if self._tls is not None:
            port, context = self._tls
            self._tls_server = self._serve(port, context, handlers)
            log.debug("listening as %s on %s:%d (TLS)", titles, self.host, self.tls_port)

    def _serve(
        self, port: int, context: ssl.SSLContext | None, handlers: list[Any]
    ) -> ThreadedAssociationServer:
        # AE.start_server(block=False) without its fixed server class: make_server takes one.
        server = self._ae.make_server(
            (self.host, port),
            ssl_context=context,
            evt_handlers=handlers,
            server_class=self._server_class,
        )
        thread = threading.Thread(
            target=server.serve_forever, name=f"dicom-ai-accept-{port}", daemon=True
        )
        thread.start()
        self._ae._servers.append(server)
        return server

    def stop(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None

    # -- handlers: never raise ---------------------------------------------------------------

    def _on_conn_open(self, event: Any) -> None:
        # Fires before the association negotiates: the access check goes in here.
        event.assoc.acse = _AccessControlledACSE(event.assoc, self.access)
        try:
            # C-STORE-RSPs are small: without this, Nagle + delayed ACK stall each exchange.
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError) as exc:
            log.debug("TCP_NODELAY not set: %s", exc)
        # pynetdicom's DUL reactor sleeps 1 ms whenever it finds nothing to do; each C-STORE
        # exchange pays that a few times. Measured: 300-slice ingest 170 -> 187 img/s; an idle
        # open association costs 13% of a core instead of 3.4% (the 60 s timeout closes it).
        event.assoc.dul._run_loop_delay = _DUL_IDLE_SLEEP_SECONDS

    def _on_conn_close(self, event: Any) -> None:
        _log_unreleased_end(event.assoc)
        with self._ids_lock:
            association_id = self._association_ids.pop(id(event.assoc), None)
        if association_id is None:
            return
        try:
            self.index.close_association(association_id)
        except Exception:
            log.exception("could not record the end of association %d", association_id)

    def _on_c_echo(self, event: Any) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return int(Status.SUCCESS)

    def _on_c_store(self, event: Any) -> int:
        try:
            self._store(event)
        except Exception as exc:
            status = _status_for(exc)
            requestor = event.assoc.requestor
            if isinstance(exc, DicomAIError):
                log.warning(
                    "C-STORE from %s@%s refused with 0x%04X: %s",
                    requestor.ae_title,
                    requestor.address,
                    status,
                    exc,
                )
            else:
                log.exception("C-STORE from %s failed unexpectedly", requestor.ae_title)
            return int(status)
        return int(Status.SUCCESS)

    def _association_id(self, event: Any) -> int:
        key = id(event.assoc)
        with self._ids_lock:
            known = self._association_ids.get(key)
        if known is not None:
            return known
        requestor = event.assoc.requestor
        new_id = self.index.open_association(
            str(requestor.ae_title), str(event.assoc.acceptor.ae_title), str(requestor.address)
        )
        with self._ids_lock:
            self._association_ids[key] = new_id
        return new_id

    def _store(self, event: Any) -> None:
        context_sop_class = UID(str(event.context.abstract_syntax))
        if context_sop_class not in _STORAGE_SOP_CLASSES:
            raise _UnsupportedSOPClass(f"SOP class {context_sop_class} is not a storage SOP class")
        data = event.encoded_dataset(include_meta=True)
        header = parse_header(data)
        if header.sop_class_uid != context_sop_class:
            raise _SOPClassMismatch(
                f"dataset SOP class {header.sop_class_uid} differs from the presentation "
                f"context's {context_sop_class}"
            )
        path = self.spool.instance_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        self.spool.write_atomic(path, data)
        self.index.add_instance(
            InstanceRecord(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                series_instance_uid=header.series_instance_uid,
                study_instance_uid=header.study_instance_uid,
                modality=header.modality,
                path=path,
                association_id=self._association_id(event),
            )
        )

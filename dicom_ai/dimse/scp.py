"""C-ECHO and C-STORE SCP.

The C-STORE handler does I/O only: the bytes as received go to the spool (temp file, fsync,
rename), a few header fields go to the index, and only then it answers Success. Pixel data is
never decoded here. Every failure maps, in ``_status_for``, to a DIMSE status and a log line;
no exception leaves a handler.

Who may associate is decided before any presentation context is negotiated, per called AE
title (``AccessPolicy``): an unknown called AE, a calling AE or an address not on that title's
list gets A-ASSOCIATE-RJ and a log line. One AE listens on a plain port, a TLS port, or both.
The association itself (PDUs, negotiation, timeouts) is the acceptor's: ``acceptor.Acceptor``
(``acceptor="fast"``, the node's own) or ``ae_acceptor.AEAcceptor`` (``"pynetdicom"``).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import build_context

from dicom_ai import metrics
from dicom_ai.dimse.acceptor import Acceptor
from dicom_ai.dimse.ae_acceptor import AEAcceptor
from dicom_ai.dimse.service import Association, CStoreRequest, Refusal, Rejection, SharedLimit
from dicom_ai.dimse.status import VERIFICATION_SOP_CLASS, Status
from dicom_ai.dimse.wire import UnencodableValueError
from dicom_ai.errors import DicomAIError, InputError, OutOfSpaceError, StorageError
from dicom_ai.store.header import MissingAttributeError, parse_data_set
from dicom_ai.store.index import InstanceRecord, ReceivingIndex
from dicom_ai.store.spool import Spool

__all__ = ["ACCEPTORS", "AccessPolicy", "CalledAE", "Listening", "Rejection", "StorageSCP"]

log = logging.getLogger(__name__)

_STORAGE_SOP_CLASSES = frozenset(
    UID(str(context.abstract_syntax)) for context in AllStoragePresentationContexts
)
_UNCOMPRESSED: list[str | UID] = [
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


# A-ASSOCIATE-RJ diagnostics, source service user (PS3.8 9.3.4).
_CALLING_AE_NOT_RECOGNIZED = 0x03
_CALLED_AE_NOT_RECOGNIZED = 0x07

# What the access policy's refusals count as (``rejected_<kind>``, see service.py).
REFUSED_CALLED_AE = "called_ae"
REFUSED_TLS_REQUIRED = "tls_required"
REFUSED_CALLING_AE = "calling_ae"
REFUSED_ADDRESS = "address"

_Network = IPv4Network | IPv6Network

# node.acceptor: which implementation runs the wire.
ACCEPTORS: dict[str, type[Acceptor] | type[AEAcceptor]] = {
    "fast": Acceptor,
    "pynetdicom": AEAcceptor,
}


@dataclass(frozen=True)
class CalledAE:
    """An AE title the node answers to; empty lists allow anyone."""

    ae_title: str
    allowed_calling_aes: frozenset[str] = frozenset()
    allowed_networks: tuple[_Network, ...] = ()
    require_tls: bool = False


@dataclass(frozen=True)
class AccessPolicy:
    called_aes: Mapping[str, CalledAE] = field(default_factory=dict)

    def check(
        self, called_ae: str, calling_ae: str, address: str, tls: bool = False
    ) -> Rejection | None:
        """None when the association may proceed, else why not."""
        called = self.called_aes.get(called_ae.strip())
        if called is None:
            return Rejection(
                _CALLED_AE_NOT_RECOGNIZED,
                f"called AE {called_ae!r} is not served",
                REFUSED_CALLED_AE,
            )
        if called.require_tls and not tls:
            # No reason code for "use TLS" either; the connection is not acceptable as it is.
            return Rejection(
                _CALLING_AE_NOT_RECOGNIZED,
                f"{called.ae_title} accepts TLS connections only",
                REFUSED_TLS_REQUIRED,
            )
        if called.allowed_calling_aes and calling_ae.strip() not in called.allowed_calling_aes:
            return Rejection(
                _CALLING_AE_NOT_RECOGNIZED,
                f"calling AE {calling_ae!r} is not allowed on {called.ae_title}",
                REFUSED_CALLING_AE,
            )
        if called.allowed_networks and not _address_in(address, called.allowed_networks):
            # DICOM has no reason code for an address; the calling AE's is the nearest.
            return Rejection(
                _CALLING_AE_NOT_RECOGNIZED,
                f"address {address} is not allowed on {called.ae_title}",
                REFUSED_ADDRESS,
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


@dataclass(frozen=True)
class Listening:
    """An SCP's listening sockets (plain, TLS), which other processes may accept on."""

    plain: socket.socket | None
    tls: socket.socket | None


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
        index: ReceivingIndex,
        max_associations: int = 10,
        access: AccessPolicy | None = None,
        tls: tuple[int, ssl.SSLContext] | None = None,
        network_timeout: float = 60.0,
        acse_timeout: float = 30.0,
        shared_limit: SharedLimit | None = None,
        acceptor: str = "fast",
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self._tls = tls
        self.spool = spool
        self.index = index
        self.access = access or AccessPolicy({ae_title: CalledAE(ae_title)})
        self.acceptor = acceptor
        self._acceptor = ACCEPTORS[acceptor](
            self,
            [build_context(VERIFICATION_SOP_CLASS, _UNCOMPRESSED)],
            maximum_associations=max_associations,
            network_timeout=network_timeout,
            acse_timeout=acse_timeout,
            shared_limit=shared_limit,
        )
        self._port: int | None = None
        self._tls_port: int | None = None
        self._association_ids: dict[int, int] = {}
        self._ids_lock = threading.Lock()
        # Called (on the association's thread) once its end is in the index: the node's
        # scheduler then looks at the series at once, not at its next round.
        self.on_association_ended: Callable[[], None] | None = None

    @property
    def port(self) -> int | None:
        return self._port if self._port is not None else self._requested_port

    @property
    def tls_port(self) -> int | None:
        if self._tls_port is not None:
            return self._tls_port
        return self._tls[0] if self._tls else None

    def start(self, shared: Listening | None = None) -> None:
        """Listen on the configured ports, or accept on ``shared``: the sockets another
        process's SCP listens on (``listening()``), so both take associations."""
        titles = ", ".join(sorted(self.access.called_aes))
        if self._requested_port is not None:
            plain = shared.plain if shared else None
            self._port = self._acceptor.serve(self.host, self._requested_port, listening=plain)
            log.debug("listening as %s on %s:%d", titles, self.host, self._port)
        if self._tls is not None:
            port, context = self._tls
            tls = shared.tls if shared else None
            self._tls_port = self._acceptor.serve(self.host, port, context, listening=tls)
            log.debug("listening as %s on %s:%d (TLS)", titles, self.host, self._tls_port)

    def listening(self) -> Listening:
        """The started SCP's listening sockets."""
        return Listening(
            None if self._port is None else self._acceptor.listening_socket(self._port),
            None if self._tls_port is None else self._acceptor.listening_socket(self._tls_port),
        )

    def stop(self) -> None:
        self._acceptor.stop()
        self._port = self._tls_port = None

    # -- the acceptor's service: never raises ------------------------------------------------

    def admit(self, association: Association) -> Rejection | None:
        return self.access.check(
            association.called_ae_title,
            association.calling_ae_title,
            association.address,
            association.tls,
        )

    def association_ended(self, association: Association) -> None:
        with self._ids_lock:
            association_id = self._association_ids.pop(id(association), None)
        if association_id is None:
            return
        try:
            self.index.close_association(association_id)
            if self.on_association_ended is not None:
                self.on_association_ended()
        except Exception:
            log.exception("could not record the end of association %d", association_id)

    def association_judged(self, association: Association, refusal: Refusal | None) -> None:
        """Count it (``dicom_ai_associations_total{result="accepted"|"rejected_<kind>"}``)
        in this process's index; a failure to count is logged, never raised."""
        result = "accepted" if refusal is None else f"rejected_{refusal.kind}"
        try:
            self.index.count(metrics.ASSOCIATIONS, {"result": result})
        except Exception:
            log.exception("could not count the association of %s", association.requestor)

    def c_echo(self, association: Association) -> int:
        log.info("C-ECHO from %s", association.calling_ae_title)
        return int(Status.SUCCESS)

    def c_store(self, request: CStoreRequest) -> int:
        try:
            self._store(request)
        except Exception as exc:
            status = _status_for(exc)
            requestor = request.association.requestor
            if isinstance(exc, DicomAIError):
                log.warning("C-STORE from %s refused with 0x%04X: %s", requestor, status, exc)
            else:
                log.exception("C-STORE from %s failed unexpectedly", requestor)
            return int(status)
        return int(Status.SUCCESS)

    def _association_id(self, association: Association) -> int:
        key = id(association)
        with self._ids_lock:
            known = self._association_ids.get(key)
        if known is not None:
            return known
        new_id = self.index.open_association(
            association.calling_ae_title, association.called_ae_title, association.address
        )
        with self._ids_lock:
            self._association_ids[key] = new_id
        return new_id

    def _store(self, request: CStoreRequest) -> None:
        context_sop_class = request.context.abstract_syntax
        if context_sop_class not in _STORAGE_SOP_CLASSES:
            raise _UnsupportedSOPClass(f"SOP class {context_sop_class} is not a storage SOP class")
        try:
            contents = request.file_contents()
        except UnencodableValueError as exc:
            raise InputError(f"the C-STORE-RQ's UIDs cannot go into a file: {exc}") from exc
        header = parse_data_set(request.data_set, request.context.transfer_syntax)
        if header.sop_class_uid != context_sop_class:
            raise _SOPClassMismatch(
                f"dataset SOP class {header.sop_class_uid} differs from the presentation "
                f"context's {context_sop_class}"
            )
        if header.sop_class_uid != request.affected_sop_class_uid:
            raise _SOPClassMismatch(
                f"dataset SOP class {header.sop_class_uid} differs from the command's "
                f"Affected SOP Class UID {request.affected_sop_class_uid}"
            )
        if header.sop_instance_uid != request.affected_sop_instance_uid:
            # As DCMTK's storescp answers it; the file meta would contradict its data set.
            raise _SOPClassMismatch(
                f"dataset SOP instance {header.sop_instance_uid} differs from the command's "
                f"Affected SOP Instance UID {request.affected_sop_instance_uid}"
            )
        path = self.spool.instance_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        self.spool.write_atomic(path, contents)
        self.index.add_instance(
            InstanceRecord(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                series_instance_uid=header.series_instance_uid,
                study_instance_uid=header.study_instance_uid,
                modality=header.modality,
                path=path,
                association_id=self._association_id(request.association),
                size=sum(len(piece) for piece in contents),
            )
        )

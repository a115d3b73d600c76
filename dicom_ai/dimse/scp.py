"""C-ECHO and C-STORE SCP.

The C-STORE handler does I/O only: the bytes as received go to the spool (temp file, fsync,
rename), a few header fields go to the index, and only then it answers Success. Pixel data is
never decoded here. Every failure maps, in ``_status_for``, to a DIMSE status and a log line;
no exception leaves a handler.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from dicom_ai.dimse.status import VERIFICATION_SOP_CLASS, Status
from dicom_ai.errors import DicomAIError, InputError, OutOfSpaceError, StorageError
from dicom_ai.store.header import parse_header
from dicom_ai.store.index import Index, InstanceRecord
from dicom_ai.store.spool import Spool

__all__ = ["StorageSCP"]

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
    if isinstance(exc, _SOPClassMismatch):
        return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InputError):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, StorageError):
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE


class StorageSCP:
    """The node's listening side. ``start()`` returns at once; ``port`` is the bound port."""

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        spool: Spool,
        index: Index,
        max_associations: int = 10,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self.spool = spool
        self.index = index
        self._ae = AE(ae_title=ae_title)
        self._ae.maximum_associations = max_associations
        # No PDU limit: a 512 KB slice then comes in a few PDUs instead of 32, and pynetdicom's
        # per-PDU Python work was a measured share of the per-instance time.
        self._ae.maximum_pdu_size = 0
        self._ae.network_timeout = 60
        self._ae.acse_timeout = 30
        self._ae.dimse_timeout = 60
        self._ae.add_supported_context(VERIFICATION_SOP_CLASS, _UNCOMPRESSED)
        self._server: ThreadedAssociationServer | None = None
        self._association_ids: dict[int, int] = {}
        self._ids_lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        self._server = self._ae.start_server(
            (self.host, self._requested_port),
            block=False,
            evt_handlers=handlers,  # type: ignore[arg-type]
        )
        log.info("listening as %s on %s:%d", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers: never raise ---------------------------------------------------------------

    def _on_conn_open(self, event: Any) -> None:
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

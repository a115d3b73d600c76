"""What an association acceptor hands the SCP, and what it asks of it, whichever acceptor
runs the wire (``acceptor.Acceptor`` or ``ae_acceptor.AEAcceptor``).

Also the one place where an association request is judged (``judge_request``): the
application context, the SCP's access check, then the association limit; the verdict is
told to the SCP (``DimseService.association_judged``), which counts it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_ai.dimse.wire import part10_header

__all__ = [
    "APPLICATION_CONTEXT",
    "AcceptedContext",
    "Association",
    "AssociationSlots",
    "CStoreRequest",
    "DimseService",
    "Refusal",
    "Rejection",
    "SharedLimit",
    "judge_request",
]

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)

# A-ASSOCIATE-RJ Result, Source and Reason/Diag. (PS3.8 9.3.4)
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SOURCE_SERVICE_USER, SOURCE_PRESENTATION = 0x01, 0x03
APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02  # source service user
LOCAL_LIMIT_EXCEEDED = 0x02  # source service provider, presentation related


# Why a request was refused, as the metrics count it (``rejected_<kind>``): a fixed
# vocabulary, never an AE title or an address. The access policy's kinds are scp.py's.
REFUSED_APPLICATION_CONTEXT = "application_context"
REFUSED_LIMIT = "limit"


@dataclass(frozen=True)
class Rejection:
    """Why an association request is refused: the A-ASSOCIATE-RJ diagnostic, a reason
    for the log (PS3.8 9.3.4; result rejected-permanent, source service user), and its
    kind for the metrics (a fixed word: no AE title, no address)."""

    diagnostic: int
    reason: str
    kind: str = "access"


@dataclass(frozen=True)
class Refusal:
    """A complete A-ASSOCIATE-RJ: result, source, diagnostic, why for the log, and the
    kind for the metrics."""

    result: int
    source: int
    diagnostic: int
    reason: str
    kind: str


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
        or joined here. Raises ``UnencodableValueError`` when the command's UIDs cannot go into the
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
    """What an acceptor asks of the SCP. None of these may raise; an exception is logged
    and answered with 0x0110 (processing failure)."""

    def admit(self, association: Association) -> Rejection | None: ...

    def c_echo(self, association: Association) -> int: ...

    def c_store(self, request: CStoreRequest) -> int: ...

    def association_ended(self, association: Association) -> None: ...

    def association_judged(self, association: Association, refusal: Refusal | None) -> None: ...


class AssociationSlots:
    """Open associations in this process, against the limit: this process's own, or
    ``shared``, counted across the processes that accept on the same socket. Each holder
    leaves a way to end its connection, for ``close_all``."""

    def __init__(self, limit: int, shared: SharedLimit | None = None) -> None:
        self.limit = limit
        self._shared = shared
        self._lock = threading.Lock()
        self._open: dict[Hashable, Callable[[], None]] = {}
        self._closed = False  # stopping: no new association, even one mid-handshake

    def take(self, holder: Hashable, close: Callable[[], None]) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._shared is not None:
                if not self._shared.acquire(False):
                    return False
            elif len(self._open) >= self.limit:
                return False
            self._open[holder] = close
            return True

    def release(self, holder: Hashable) -> None:
        with self._lock:
            if self._open.pop(holder, None) is not None and self._shared is not None:
                self._shared.release()

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            closers = list(self._open.values())
        for close in closers:
            close()


def judge_request(
    application_context: str,
    association: Association,
    service: DimseService,
    slots: AssociationSlots,
    holder: Hashable,
    close: Callable[[], None],
) -> Refusal | None:
    """None when the association may proceed (and then it holds a slot), else the
    A-ASSOCIATE-RJ to send; either way the service has been told."""
    refusal = _judge(application_context, association, service, slots, holder, close)
    try:
        service.association_judged(association, refusal)
    except Exception:  # counting it must not change the answer
        log.exception("could not count the association of %s", association.requestor)
    return refusal


def _judge(
    application_context: str,
    association: Association,
    service: DimseService,
    slots: AssociationSlots,
    holder: Hashable,
    close: Callable[[], None],
) -> Refusal | None:
    if application_context != APPLICATION_CONTEXT:
        return Refusal(
            REJECTED_PERMANENT,
            SOURCE_SERVICE_USER,
            APPLICATION_CONTEXT_NOT_SUPPORTED,
            f"application context {application_context} is not DICOM's",
            REFUSED_APPLICATION_CONTEXT,
        )
    refused = service.admit(association)
    if refused is not None:
        return Refusal(
            REJECTED_PERMANENT,
            SOURCE_SERVICE_USER,
            refused.diagnostic,
            refused.reason,
            refused.kind,
        )
    if not slots.take(holder, close):
        return Refusal(
            REJECTED_TRANSIENT,
            SOURCE_PRESENTATION,
            LOCAL_LIMIT_EXCEEDED,
            f"{slots.limit} associations are open already",
            REFUSED_LIMIT,
        )
    return None

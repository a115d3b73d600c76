"""C-ECHO and C-STORE SCU: send files to a peer in one association, per-instance status.

Files are sent as they are on disk (no re-encoding): one presentation context per
(SOP class, transfer syntax) pair, because pynetdicom needs an exact transfer-syntax match
to stream a file. TCP_NODELAY is set as soon as the association is up.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from dicom_ai.dimse import _compat
from dicom_ai.dimse.status import VERIFICATION_SOP_CLASS, SendResult
from dicom_ai.dimse.transport import set_nodelay
from dicom_ai.errors import DeliveryError, InputError

__all__ = ["Peer", "SendResult", "echo", "send_files"]

log = logging.getLogger(__name__)

_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``AE@HOST:PORT``, as on the command line."""
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(ae_title, host.strip("[]"), int(port))
        except ValueError as exc:
            raise ValueError(f"expected AE@HOST:PORT, got {text!r}") from exc

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _set_nodelay(assoc: Any) -> None:
    sock = _compat.association_socket(assoc)
    if sock is not None:
        set_nodelay(sock)


def _associate(ae: Any, peer: Peer, tls: ssl.SSLContext | None) -> Any:
    tls_args = (tls, peer.host) if tls is not None else None
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"no association with {peer}: {exc}") from exc
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "no answer or aborted"
        raise DeliveryError(f"no association with {peer} ({why})")
    _compat.pause_reactor_safely(assoc)
    return assoc


def echo(
    peer: Peer,
    calling_ae: str = "DICOM_AI",
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO; returns the status, raises DeliveryError when no association is possible."""
    ae = AE(ae_title=calling_ae)
    # connection_timeout also bounds the TLS handshake, done inside connect().
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = _associate(ae, peer, tls)
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def _file_context(path: Path) -> tuple[str, str]:
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except (InvalidDicomError, AttributeError, OSError) as exc:
        raise InputError(f"{path} is not a DICOM file with file meta: {exc}") from exc


def send_files(
    peer: Peer,
    paths: Sequence[Path],
    calling_ae: str = "DICOM_AI",
    timeout: float = 30.0,
    progress: Callable[[SendResult], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> list[SendResult]:
    """C-STORE ``paths`` in one association (or several, when they need >128 contexts)."""
    by_context: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        by_context.setdefault(_file_context(path), []).append(path)
    contexts = list(by_context)
    results: list[SendResult] = []
    for start in range(0, len(contexts), _MAX_CONTEXTS):
        batch = contexts[start : start + _MAX_CONTEXTS]
        batch_paths = [path for key in batch for path in by_context[key]]
        results.extend(_send_batch(peer, batch, batch_paths, calling_ae, timeout, progress, tls))
    return results


def _send_batch(
    peer: Peer,
    contexts: Sequence[tuple[str, str]],
    paths: Sequence[Path],
    calling_ae: str,
    timeout: float,
    progress: Callable[[SendResult], None] | None,
    tls: ssl.SSLContext | None,
) -> list[SendResult]:
    # Stream files from disk instead of decoding them first: they go as they are.
    _compat.pynetdicom_send_chunked_datasets()
    ae = AE(ae_title=calling_ae)
    # connection_timeout also bounds the TLS handshake, done inside connect().
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, transfer_syntax)
    assoc = _associate(ae, peer, tls)
    _set_nodelay(assoc)
    results: list[SendResult] = []
    try:
        for path in paths:
            if not assoc.is_established:
                results.append(SendResult(path, None))
                continue
            rsp = assoc.send_c_store(path)
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            result = SendResult(path, status)
            results.append(result)
            if progress is not None:
                progress(result)
    except BaseException:
        # An exception mid-send can leave the association thread alive: abort, don't hang.
        assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()
    return results

"""STOW-RS sender: store result files at a DICOMweb origin server, per-instance status.

All files go in one multipart/related request (PS3.18 10.5). The answer is read by SOP
Instance UID from the response's Referenced / Failed SOP Sequences, whatever the HTTP
status: PS3.18 uses 409 and Orthanc's plugin uses 400 for "some or all failed", with a
body that still says which. Only a failure that tells nothing about the instances (no
connection, timeout, TLS, an error without such a body) raises DeliveryError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dicom_ai.dimse.status import SendResult, Status
from dicom_ai.errors import DeliveryError, InputError

__all__ = ["stow_files"]

log = logging.getLogger(__name__)

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
# Larger than any request we build: send with Content-Length, never chunked transfer
# encoding, which some proxies and origin servers refuse on requests.
_NO_CHUNKING = 2**62


class _Session(requests.Session):
    """A session whose every request has our timeout, CA file and a Host header with port."""

    def __init__(self, timeout: float, ca_certificates: Path | None) -> None:
        super().__init__()
        self._timeout = timeout
        self._ca_certificates = ca_certificates

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        # Forced, not defaulted: dicomweb-client passes its own timeout (20 s) or, in older
        # versions, none at all.
        kwargs["timeout"] = self._timeout
        if self._ca_certificates is not None:
            # Per request: requests lets REQUESTS_CA_BUNDLE override ``session.verify``.
            kwargs["verify"] = str(self._ca_certificates)
        # dicomweb-client sets Host to the bare host name, dropping a non-default port.
        headers = kwargs.get("headers")
        if headers:
            kwargs["headers"] = {k: v for k, v in headers.items() if k.lower() != "host"}
        return super().request(*args, **kwargs)


def redacted_url(url: str) -> str:
    """``url`` without user:password, for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _read(path: Path) -> tuple[Dataset, str]:
    try:
        dataset = dcmread(path)
        uid = str(dataset.SOPInstanceUID)
    except (InvalidDicomError, AttributeError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path} is not a readable DICOM file: {exc}") from exc
    return dataset, uid


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The STOW-RS response body as a dataset, or None when it is not one.

    Read whatever the Content-Type says: Orthanc sends its 400 answers without one.
    """
    if not response.content:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None  # XML, HTML error pages, ...
    if not isinstance(body, dict) or not (
        _FAILED_SOP_SEQUENCE in body or _REFERENCED_SOP_SEQUENCE in body
    ):
        return None
    try:
        return Dataset.from_json(body)
    except (ValueError, TypeError, KeyError) as exc:
        log.debug("STOW-RS response is not valid DICOM JSON: %s", exc)
        return None


def _statuses(answer: Dataset) -> dict[str, int]:
    """SOP Instance UID -> status, from the response's sequences (PS3.18 Table 10.5.3-1)."""
    statuses: dict[str, int] = {}
    for item in answer.get("ReferencedSOPSequence", []):
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            # Stored, perhaps with a warning (0xB000 coerced, 0xB006 elements discarded, ...)
            warning = item.get("WarningReason")
            statuses[str(uid)] = int(warning) if warning is not None else Status.SUCCESS
    for item in answer.get("FailedSOPSequence", []):
        uid = item.get("ReferencedSOPInstanceUID")
        if uid:
            reason = item.get("FailureReason")
            statuses[str(uid)] = int(reason) if reason is not None else Status.PROCESSING_FAILURE
    return statuses


def stow_files(
    url: str,
    paths: Sequence[Path],
    timeout: float = 30.0,
    ca_certificates: Path | None = None,
) -> list[SendResult]:
    """STOW-RS ``paths`` to the DICOMweb service root ``url`` in one request.

    Returns one SendResult per path, in order: 0x0000 stored, a 0xB000-range warning
    (stored), a failure reason (not stored), or None when the answer does not name the
    instance. Raises InputError for a file that is not DICOM, DeliveryError when the
    server cannot be reached or answers an error that names no instance.
    """
    if not paths:
        return []
    where = redacted_url(url)
    read = [_read(path) for path in paths]
    uids = {uid for _, uid in read}

    with _Session(timeout, ca_certificates) as session:
        response: requests.Response | None = None

        def keep(r: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
            nonlocal response
            response = r
            return r

        session.hooks["response"].append(keep)
        try:
            client = DICOMwebClient(
                url.rstrip("/"),
                session=session,
                headers={"Accept": "application/dicom+json"},
                chunk_size=_NO_CHUNKING,
            )
        except ValueError as exc:
            raise DeliveryError(f"STOW-RS: bad DICOMweb URL {where}: {exc}") from exc
        # The deliverer retries with its own backoff; dicomweb-client's retries (5 tries,
        # exponential waits, also on connection errors) would only stall it.
        client.set_http_retry_params(retry=False)

        log.debug("STOW-RS %d instance(s) to %s", len(read), where)
        error: Exception | None = None
        try:
            client.store_instances([dataset for dataset, _ in read])
        except requests.HTTPError as exc:
            error = exc  # the body may still say which instances failed
        except OSError as exc:  # requests' errors: refused, timeout, TLS, bad URL
            raise DeliveryError(f"STOW-RS to {where} failed: {exc}") from exc
        except (ValueError, KeyError) as exc:
            error = exc  # dicomweb-client could not read the body; we read it below

    if response is None:
        raise DeliveryError(f"STOW-RS to {where}: no response ({error})") from error
    http_status = response.status_code
    answer = _response_dataset(response)
    statuses = _statuses(answer) if answer is not None else {}
    if not response.ok and not uids & statuses.keys():
        raise DeliveryError(
            f"STOW-RS to {where} failed: HTTP {http_status} {response.reason}"
            " with no per-instance answer"
        ) from error

    results = [
        SendResult(path, statuses.get(uid)) for path, (_, uid) in zip(paths, read, strict=True)
    ]
    stored = [uid for _, uid in read if uid in statuses and _is_stored(statuses[uid])]
    failed = [uid for _, uid in read if uid in statuses and not _is_stored(statuses[uid])]
    unanswered = [uid for _, uid in read if uid not in statuses]
    log.info(
        "STOW-RS to %s: HTTP %d, %d of %d instance(s) stored, %d failed, %d unanswered",
        where,
        http_status,
        len(stored),
        len(results),
        len(failed),
        len(unanswered),
    )
    for uid in failed:
        log.warning("STOW-RS to %s: instance %s failed: 0x%04X", where, uid, statuses[uid])
    for uid in unanswered:
        log.warning("STOW-RS to %s: no answer for instance %s", where, uid)
    return results


def _is_stored(status: int) -> bool:
    return status == Status.SUCCESS or 0xB000 <= status <= 0xBFFF

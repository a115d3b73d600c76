"""STOW-RS sender against a fake DICOMweb origin server on loopback.

The fake parses the multipart/related request for real (so a test sees which instances
were sent) and answers with status codes and DICOM JSON bodies each test chooses.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_ai.dicomweb import stow_files
from dicom_ai.errors import DeliveryError, InputError
from tests.peers import free_port
from tests.tls_certs import make_pki

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/dicom+json"
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    uids: list[str]
    part_types: list[str]


def stow_answer(
    stored: Sequence[str] = (),
    failed: dict[str, int | None] | None = None,
    warnings: dict[str, int] | None = None,
) -> bytes:
    """A PS3.18 STOW-RS response body in DICOM JSON."""
    answer = Dataset()
    referenced = []
    for uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = uid
        if warnings and uid in warnings:
            item.WarningReason = warnings[uid]
        referenced.append(item)
    failures = []
    for uid, reason in (failed or {}).items():
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = uid
        if reason is not None:
            item.FailureReason = reason
        failures.append(item)
    answer.ReferencedSOPSequence = referenced
    answer.FailedSOPSequence = failures
    return json.dumps(answer.to_json_dict()).encode()


def all_stored(uids: list[str]) -> Answer:
    return Answer(200, stow_answer(uids))


def _parse_multipart(content_type: str, body: bytes) -> tuple[list[str], list[str]]:
    """SOP Instance UIDs and part Content-Types of a multipart/related request body."""
    header = Message()
    header["Content-Type"] = content_type
    assert header.get_content_type() == "multipart/related"
    assert header.get_param("type") == "application/dicom"
    boundary = str(header.get_param("boundary")).encode()
    # RFC 2046: the CRLF before each delimiter belongs to it; the first may lack one.
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary)
    uids, types = [], []
    for part in parts[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.partition(b"\r\n\r\n")
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                types.append(value.strip())
        uids.append(str(dcmread(BytesIO(content)).SOPInstanceUID))
    return uids, types


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    origin: FakeOrigin


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        origin = self.server.origin
        # A fake that cannot read chunked bodies also checks that we send Content-Length.
        assert "chunked" not in self.headers.get("Transfer-Encoding", "")
        body = self.rfile.read(int(self.headers["Content-Length"]))
        uids, types = _parse_multipart(self.headers["Content-Type"], body)
        origin.requests.append(Received(self.path, dict(self.headers.items()), uids, types))
        answer = origin.answer(uids)
        if answer.delay:
            origin.release.wait(answer.delay)
        try:
            self.send_response(answer.status)
            if answer.content_type is not None and answer.body:
                self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class FakeOrigin:
    tls: ssl.SSLContext | None = None
    answer: Callable[[list[str]], Answer] = all_stored
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.origin = self
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/dicom-web"

    def __enter__(self) -> FakeOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()  # wake a handler that is sleeping on purpose
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def origin() -> Iterator[FakeOrigin]:
    with FakeOrigin() as fake:
        yield fake


def write_instances(directory: Path, count: int) -> list[Path]:
    """``count`` copies of pydicom's CT_small, each with its own SOP Instance UID."""
    ct_small = get_testdata_file("CT_small.dcm")
    assert isinstance(ct_small, str)
    source = dcmread(ct_small)
    paths = []
    for i in range(count):
        uid = generate_uid()
        source.SOPInstanceUID = uid
        source.file_meta.MediaStorageSOPInstanceUID = uid
        path = directory / f"instance{i}.dcm"
        source.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_all_stored_in_one_request(
    origin: FakeOrigin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_instances(tmp_path, 3)
    with caplog.at_level(logging.DEBUG):
        results = stow_files(origin.url, paths)
    assert [r.path for r in results] == paths
    assert [r.status for r in results] == [0, 0, 0] and all(r.ok for r in results)
    [request] = origin.requests
    assert request.path == "/dicom-web/studies"
    assert request.uids == [uid_of(p) for p in paths]
    assert request.part_types == ["application/dicom"] * 3
    assert request.headers["Accept"] == "application/dicom+json"
    # dicomweb-client would send "127.0.0.1" here; the port belongs in Host.
    assert request.headers["Host"] == f"127.0.0.1:{origin.port}"
    # UIDs and counts only: CT_small's patient name and ID never reach a log.
    patient = dcmread(paths[0], stop_before_pixels=True)
    assert any(
        uid_of(paths[0]) in r.getMessage() or "3 instance" in r.getMessage() for r in caplog.records
    )
    for record in caplog.records:
        assert str(patient.PatientName) not in record.getMessage()
        assert str(patient.PatientID) not in record.getMessage()


def test_trailing_slash_in_service_root(origin: FakeOrigin, tmp_path: Path) -> None:
    [result] = stow_files(origin.url + "/", write_instances(tmp_path, 1))
    assert result.ok and origin.requests[0].path == "/dicom-web/studies"


def test_one_failed_gets_its_failure_reason(origin: FakeOrigin, tmp_path: Path) -> None:
    paths = write_instances(tmp_path, 3)
    bad = uid_of(paths[1])

    def answer(uids: list[str]) -> Answer:
        stored = [uid for uid in uids if uid != bad]
        return Answer(202, stow_answer(stored, {bad: 0xA700}))

    origin.answer = answer
    results = stow_files(origin.url, paths)
    assert [r.status for r in results] == [0, 0xA700, 0]
    assert [r.ok for r in results] == [True, False, True]
    assert origin.requests[0].uids == [uid_of(p) for p in paths]


def test_409_with_failures_is_parsed_not_raised(origin: FakeOrigin, tmp_path: Path) -> None:
    paths = write_instances(tmp_path, 2)
    failed: dict[str, int | None] = {uid_of(paths[0]): 0xC122, uid_of(paths[1]): None}
    origin.answer = lambda uids: Answer(409, stow_answer(failed=failed))
    results = stow_files(origin.url, paths)
    # No FailureReason: a processing failure (0x0110).
    assert [r.status for r in results] == [0xC122, 0x0110]


def test_orthanc_style_400_without_content_type(origin: FakeOrigin, tmp_path: Path) -> None:
    # Orthanc's plugin answers a partly failed request with 400 and no Content-Type; an
    # instance it could not parse appears in neither sequence.
    paths = write_instances(tmp_path, 3)
    uids = [uid_of(p) for p in paths]
    body = stow_answer([uids[0], uids[1]], warnings={uids[1]: 0xB000})
    origin.answer = lambda _: Answer(400, body, content_type=None)
    results = stow_files(origin.url, paths)
    assert [r.status for r in results] == [0, 0xB000, None]
    assert [r.ok for r in results] == [True, False, False]


@pytest.mark.parametrize("status", [500, 503])
def test_http_error_without_body_raises(origin: FakeOrigin, tmp_path: Path, status: int) -> None:
    origin.answer = lambda _: Answer(status)
    with pytest.raises(DeliveryError, match=rf"{re.escape(origin.url)}.*HTTP {status}"):
        stow_files(origin.url, write_instances(tmp_path, 2))
    assert len(origin.requests) == 1  # dicomweb-client's own retries are off


def test_http_error_with_unrelated_body_raises(origin: FakeOrigin, tmp_path: Path) -> None:
    origin.answer = lambda _: Answer(500, b"<html>oops</html>", content_type="text/html")
    with pytest.raises(DeliveryError, match="HTTP 500"):
        stow_files(origin.url, write_instances(tmp_path, 1))


def test_success_without_body_leaves_status_unknown(origin: FakeOrigin, tmp_path: Path) -> None:
    origin.answer = lambda _: Answer(200)
    results = stow_files(origin.url, write_instances(tmp_path, 2))
    assert [r.status for r in results] == [None, None]


def test_nothing_listening_raises(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    started = time.monotonic()
    with pytest.raises(DeliveryError, match=re.escape(url)):
        stow_files(url, write_instances(tmp_path, 1))
    assert time.monotonic() - started < 5


def test_slow_server_times_out_promptly(origin: FakeOrigin, tmp_path: Path) -> None:
    origin.answer = lambda uids: Answer(200, stow_answer(uids), delay=30)
    paths = write_instances(tmp_path, 1)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="timed out"):
        stow_files(origin.url, paths, timeout=0.5)
    assert time.monotonic() - started < 3


def test_not_dicom_raises_input_error(origin: FakeOrigin, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(InputError, match=r"junk\.dcm"):
        stow_files(origin.url, [*write_instances(tmp_path, 1), junk])
    with pytest.raises(InputError):
        stow_files(origin.url, [tmp_path / "missing.dcm"])
    assert origin.requests == []


def test_no_paths_sends_nothing(origin: FakeOrigin) -> None:
    assert stow_files(origin.url, []) == []
    assert origin.requests == []


def test_https_verifies_with_the_given_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = make_pki(tmp_path / "pki")
    # requests prefers this variable to ``Session.verify``; the given CA must still win.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.rogue_certificate))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_certificate, pki.server_key)
    paths = write_instances(tmp_path, 1)
    with FakeOrigin(tls=context) as fake:
        [result] = stow_files(fake.url, paths, ca_certificates=pki.ca)
        assert result.ok and len(fake.requests) == 1
        # Without our CA (here: the environment's bundle) the server cannot be verified.
        with pytest.raises(DeliveryError, match=r"https://127\.0\.0\.1"):
            stow_files(fake.url, paths, timeout=5)
        assert len(fake.requests) == 1


def test_plain_http_server_on_https_url_raises(origin: FakeOrigin, tmp_path: Path) -> None:
    url = origin.url.replace("http://", "https://")
    with pytest.raises(DeliveryError):
        stow_files(url, write_instances(tmp_path, 1), timeout=5)

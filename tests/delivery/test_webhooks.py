"""Webhooks (pipeline/webhooks.py): signed JSON events to a real HTTP receiver, in order, at
least once, later when the receiver was down; and through a running node."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.config import WebhookConfig
from dicom_ai.errors import ConfigError
from dicom_ai.pipeline.webhooks import IDLE_SECONDS, WebhookSender
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import NodeProcess, StoreSCP, free_port, node_config, storescu, wait_until

SECRET = "s3cret-for-tests"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.71", "1.2.826.0.1.3680043.8.498.72"


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def signed_with(self, secret: str) -> bool:
        """The signature checked as a receiver would: HMAC over the raw body bytes."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("X-DicomAI-Signature", ""), expected)


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST and answers ``status``."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.status = 204
        self.received: list[Received] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.received.append(Received(self.path, dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)

    def kinds(self, path: str = "/hook") -> list[str]:
        return [r.headers["X-DicomAI-Event"] for r in self.received if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def _hook(url: str, **fields: Any) -> WebhookConfig:
    return WebhookConfig.model_validate({"url": url, "secret": SECRET, **fields})


def _index_with_series(tmp_path: Path) -> Index:
    index = Index(tmp_path / "index.sqlite3")
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    for n in range(2):
        index.add_instance(
            InstanceRecord(
                f"{SERIES}.{n}",
                "1.2.840.10008.5.1.4.1.1.2",
                SERIES,
                STUDY,
                "CT",
                Path(f"/spool/{n}.dcm"),
                association,
            )
        )
    index.close_association(association)
    return index


def _fail_one_finish_one(index: Index) -> tuple[int, int]:
    """Job A fails for good (job.failed), job B finishes (job.done); their ids."""
    plans = [RunPlan("ct-a", "model-a", ("pacs",)), RunPlan("ct-b", "model-b", ("pacs",))]
    index.start_run(SERIES, plans, "trace")
    jobs = {job.rule: job for job in index.claim_pending_jobs(4)}
    index.fail_job(jobs["ct-a"].id, "the model raised", retry=False)
    stages = {"load": 0.5, "infer": 1.25, "encode": 0.25}
    index.finish_job(jobs["ct-b"].id, [Path("/r/seg.dcm")], ("pacs",), stages=stages)
    return jobs["ct-a"].id, jobs["ct-b"].id


def _dead_letter(index: Index) -> None:
    (due,) = index.due_deliveries(now=1e12)
    index.delivery_failed(due.id, "association refused", None)


def test_events_arrive_signed_in_order_and_only_the_kinds_asked_for(
    tmp_path: Path, receiver: Receiver
) -> None:
    index = _index_with_series(tmp_path)
    jobs_hook = _hook(receiver.url("/hook"), events=["job.done", "job.failed"])
    dead_hook = _hook(receiver.url("/dead"), events=["delivery.dead_letter"], secret="other")
    sender = WebhookSender(index, [jobs_hook, dead_hook])
    assert sender.run_due(1000.0) == IDLE_SECONDS  # nothing yet; both URLs get their place
    failed_id, done_id = _fail_one_finish_one(index)
    _dead_letter(index)
    sender.run_due(1001.0)
    sender.close()

    assert receiver.kinds("/hook") == ["job.failed", "job.done"]
    assert receiver.kinds("/dead") == ["delivery.dead_letter"]
    for request in receiver.received:
        secret = "other" if request.path == "/dead" else SECRET
        assert request.signed_with(secret), request.headers
        assert not request.signed_with("wrong")
        assert request.headers["Content-Type"] == "application/json"
        assert b"Patient" not in request.body  # UIDs, never patient data
    failed, done = (r.json for r in receiver.received if r.path == "/hook")
    assert failed["event"] == "job.failed"
    assert failed["job"]["id"] == failed_id and failed["job"]["state"] == "failed"
    assert (failed["job"]["model"], failed["job"]["rule"]) == ("model-a", "ct-a")
    assert failed["job"]["error"] == "the model raised"
    assert done["event"] == "job.done"
    assert (done["study_instance_uid"], done["series_instance_uid"]) == (STUDY, SERIES)
    assert done["job"]["id"] == done_id and done["job"]["state"] == "done"
    assert (done["job"]["model"], done["job"]["rule"], done["job"]["run"]) == ("model-b", "ct-b", 1)
    assert done["job"]["stages"] == {"load": 0.5, "infer": 1.25, "encode": 0.25}
    assert done["job"]["started_at"] <= done["job"]["finished_at"]
    (dead,) = (r.json for r in receiver.received if r.path == "/dead")
    assert dead["delivery"]["destination"] == "pacs" and dead["delivery"]["state"] == "dead"
    assert dead["delivery"]["error"] == "association refused"
    assert dead["job"]["id"] == done_id and dead["series_instance_uid"] == SERIES
    # The delivery header is the event id: what a receiver drops duplicates by.
    ids = [int(r.headers["X-DicomAI-Delivery"]) for r in receiver.received if r.path == "/hook"]
    assert ids == sorted(ids) and len(set(ids)) == 2
    # Every URL's place moved past all three events, the skipped kind included.
    (last,) = {index.webhook_cursor(h.url)[0] for h in (jobs_hook, dead_hook)}
    assert [e.id for e in index.events_after(last)] == []

    # Nothing goes out twice.
    again = WebhookSender(index, [jobs_hook, dead_hook])
    again.run_due(1002.0)
    again.close()
    assert len(receiver.received) == 3
    index.close()


def test_a_receiver_that_is_down_gets_the_events_later_in_order_once(tmp_path: Path) -> None:
    index = _index_with_series(tmp_path)
    down = Receiver(free_port())  # nobody listens there yet
    hook = _hook(down.url(), retry_base_seconds=0.5, retry_max_seconds=2)
    sender = WebhookSender(index, [hook])
    sender.run_due(1000.0)
    start, _ = index.webhook_cursor(hook.url)
    _fail_one_finish_one(index)

    # Every attempt fails; the wait doubles up to the cap, the place stays.
    now = 2000.0
    delays: list[float] = []
    for _ in range(4):
        assert sender.run_due(now) == pytest.approx(min(0.5 * 2 ** len(delays), 2, IDLE_SECONDS))
        last, next_at = index.webhook_cursor(hook.url)
        assert last == start
        delays.append(next_at - now)
        # Before it is due nothing is tried: the answer is the time left.
        assert sender.run_due(now + delays[-1] / 2) == pytest.approx(delays[-1] / 2)
        now = next_at
    assert delays == [0.5, 1.0, 2.0, 2.0]

    down.start()  # the receiver comes up on that port
    try:
        sender.run_due(now)
        sender.run_due(now + 10)
        assert down.kinds() == ["job.failed", "job.done"]
        assert all(r.signed_with(SECRET) for r in down.received)
        # A receiver answering an error is a failure too; its place waits again.
        down.status = 500
        index.delivery_failed(index.due_deliveries(now=1e12)[0].id, "refused", None)
        sender.run_due(now + 20)
        assert index.webhook_cursor(hook.url)[1] == pytest.approx(now + 20.5)
        down.status = 200
        sender.run_due(now + 21)
    finally:
        down.stop()
        sender.close()
    assert down.kinds() == [
        "job.failed",
        "job.done",
        "delivery.dead_letter",
        "delivery.dead_letter",
    ]
    assert len({r.headers["X-DicomAI-Delivery"] for r in down.received}) == 3  # the retry
    index.close()


def test_a_failure_is_one_warning_naming_the_host_and_status_not_the_body(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    index = _index_with_series(tmp_path)
    receiver.status = 503
    sender = WebhookSender(index, [_hook(receiver.url("/hook?token=abc"))])
    sender.run_due(1000.0)
    _fail_one_finish_one(index)
    with caplog.at_level(logging.WARNING, logger="dicom_ai.pipeline.webhooks"):
        sender.run_due(1001.0)
    sender.close()
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert f"127.0.0.1:{receiver.port}" in message and "HTTP 503" in message
    assert "token" not in message and SERIES not in message and "model" not in message
    assert len(receiver.received) == 1  # the second event waits behind the first
    index.close()


class _BrokenIndex:
    def webhook_cursor(self, url: str) -> tuple[int, float]:
        raise RuntimeError("index is gone")


def test_run_due_never_raises_and_a_url_is_listed_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sender = WebhookSender(_BrokenIndex(), [_hook("http://127.0.0.1:9/x")])  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="dicom_ai.pipeline.webhooks"):
        assert sender.run_due(0.0) == IDLE_SECONDS
    assert "127.0.0.1:9" in caplog.text
    with pytest.raises(ConfigError, match="listed twice"):
        WebhookSender(_BrokenIndex(), [_hook("http://h/x"), _hook("http://h/x")])  # type: ignore[arg-type]


@pytest.mark.dcmtk
@pytest.mark.slow
def test_a_running_node_sends_job_done_and_dead_letter(
    tmp_path: Path, pacs: StoreSCP, receiver: Receiver
) -> None:
    spec = PhantomSpec(slices=16, rows=128, columns=128, pixel_spacing_mm=3.0)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: ct-body\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: ct-body\n"
        "    destinations: [pacs, nowhere]\n"
    )
    workdir = tmp_path / "node"
    config = node_config(
        workdir,
        pacs.port,
        rules=rules,
        destinations={"nowhere": {"ae_title": "NOWHERE", "host": "127.0.0.1", "port": free_port()}},
        delivery={"max_attempts": 1},
        webhooks=[{"url": receiver.url(), "secret": SECRET, "retry_base_seconds": 0.5}],
    )
    node = NodeProcess(workdir, config).start()
    try:
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(receiver.received) >= 2, 180, "job.done and a dead letter", 0.5)
        wait_until(lambda: len(pacs.files()) >= 2, 30, "SEG and SR at the PACS", 0.5)
    finally:
        node.stop()
    assert sorted(receiver.kinds()) == ["delivery.dead_letter", "job.done"]
    for request in receiver.received:
        assert request.signed_with(SECRET)
        assert spec.patient_name.encode() not in request.body
        assert spec.patient_id.encode() not in request.body
        body = request.json
        assert body["series_instance_uid"] == spec.series_instance_uid
        assert body["study_instance_uid"] == spec.study_instance_uid
        assert (body["job"]["model"], body["job"]["rule"]) == ("ct-body", "ct-body")
    (dead,) = (r.json for r in receiver.received if r.json["event"] == "delivery.dead_letter")
    assert dead["delivery"]["destination"] == "nowhere"
    (done,) = (r.json for r in receiver.received if r.json["event"] == "job.done")
    assert set(done["job"]["stages"]) >= {"load", "infer", "encode"}

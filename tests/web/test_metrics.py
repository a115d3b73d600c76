"""``/metrics``: the index's counters and histograms, and the scrape-time gauges, in
Prometheus' text format; refused associations counted by kind, in every receiving process."""

from __future__ import annotations

import logging
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from dicom_ai import metrics
from dicom_ai.dimse.scp import AccessPolicy, CalledAE, StorageSCP
from dicom_ai.store import index as index_module
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from dicom_ai.web.metrics import (
    CONTENT_TYPE,
    QUEUE_DEPTH,
    SPOOL_BYTES,
    SPOOL_FREE_BYTES,
    render,
)
from tests.peers import (
    NodeProcess,
    StoreSCP,
    echoscu,
    free_port,
    local_scp,
    node_config,
    storescu,
    wait_until,
)
from tests.raw_dicom import _associate_rq, read_pdu

_Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Every family, by the name the parser gives it (a counter's without ``_total``), and type.
_FAMILIES = {
    "dicom_ai_instances_received": "counter",
    "dicom_ai_associations": "counter",
    "dicom_ai_jobs": "counter",
    "dicom_ai_deliveries": "counter",
    "dicom_ai_purged_bytes": "counter",
    "dicom_ai_job_stage_seconds": "histogram",
    "dicom_ai_result_latency_seconds": "histogram",
    QUEUE_DEPTH: "gauge",
    SPOOL_FREE_BYTES: "gauge",
    SPOOL_BYTES: "gauge",
}


def _scrape(index: Index, spool_dir: Path) -> tuple[str, _Samples]:
    """The page's text and every sample, by name and sorted labels; each family checked
    to be there with its type."""
    body, content_type = render(index, spool_dir)
    assert content_type == CONTENT_TYPE
    return _parse(body.decode())


def _parse(text: str) -> tuple[str, _Samples]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: f.type for name, f in families.items()} == _FAMILIES
    samples: _Samples = {}
    for family in families.values():
        for sample in family.samples:
            samples[_key(sample)] = sample.value
    return text, samples


def _key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))


def _value(samples: _Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _of(samples: _Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def _buckets(samples: _Samples, name: str, **labels: str) -> dict[str, float]:
    """A histogram's cumulative buckets, by ``le``."""
    out = {}
    for (n, pairs), value in samples.items():
        given = dict(pairs)
        le = given.pop("le", None)
        if n == f"{name}_bucket" and le is not None and given == labels:
            out[le] = value
    return out


def _expected_buckets(up_to: float, above: int = 1) -> dict[str, float]:
    """Cumulative buckets of one observation that falls in the bucket of bound ``up_to``."""
    bounds = metrics.HISTOGRAMS[metrics.JOB_STAGE_SECONDS].buckets
    out = {repr(b): float(above if b >= up_to else 0) for b in bounds}
    out["+Inf"] = float(above)
    return out


@pytest.fixture
def free_bytes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """shutil.disk_usage answers 123456789 free bytes; the folders it was asked about."""
    asked: list[Path] = []

    def disk_usage(path: Path) -> Any:
        asked.append(Path(path))
        return SimpleNamespace(total=10**12, used=1, free=123456789)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The index's time.time(), set by the test."""
    now = [1_000_000.0]
    monkeypatch.setattr(index_module, "time", SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    db = Index(tmp_path / "index.sqlite3")
    yield db
    db.close()


def _add(index: Index, sop: str, series: str, association: int) -> None:
    index.add_instance(
        InstanceRecord(sop, "1.2.3", series, "9.9", "CT", Path(f"/s/{sop}.dcm"), association)
    )


# -- the page from the index -----------------------------------------------------------------


def test_every_metric_is_exposed_before_anything_is_counted(
    index: Index, tmp_path: Path, free_bytes: list[Path]
) -> None:
    text, samples = _scrape(index, tmp_path / "spool")
    for name, kind in _FAMILIES.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {exposed} " in text
        assert f"# TYPE {exposed} {kind}\n" in text
    assert samples == {
        ("dicom_ai_instances_received_total", ()): 0.0,
        (QUEUE_DEPTH, ()): 0.0,
        (SPOOL_FREE_BYTES, ()): 123456789.0,
        (SPOOL_BYTES, (("kind", "sources"),)): 0.0,
        (SPOOL_BYTES, (("kind", "results"),)): 0.0,
    }
    assert free_bytes == [tmp_path / "spool"]


def test_counts_histograms_and_gauges_from_the_index(
    index: Index, tmp_path: Path, clock: list[float], free_bytes: list[Path]
) -> None:
    start = clock[0]
    index.count(metrics.ASSOCIATIONS, {"result": "accepted"})  # as the SCP counts
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    index.count(metrics.ASSOCIATIONS, {"result": "rejected_called_ae"})
    index.count(metrics.ASSOCIATIONS, {"result": "rejected_called_ae"})
    for sop in ("1.1", "1.2", "1.3"):
        _add(index, sop, "5.5", association)
    index.start_run(
        "5.5",
        [RunPlan("ct", "ct-body", ("pacs", "archive")), RunPlan("lungs", "lungs", ("pacs",))],
        "",
    )
    body, lungs = sorted(index.claim_pending_jobs(2), key=lambda job: job.model)
    assert (body.model, lungs.model) == ("ct-body", "lungs")
    index.fail_job(body.id, "worker died", retry=True)
    index.fail_job(lungs.id, "broken model", retry=False)
    (body,) = index.claim_pending_jobs(1)
    clock[0] = start + 10
    # load 0.2 s (<= 0.25), infer 3 s (<= 5), encode 0.05 s (<= 0.05: le is inclusive)
    index.finish_job(
        body.id,
        [Path("/r/seg.dcm")],
        body.destinations,
        {"load": 0.2, "infer": 3.0, "encode": 0.05},
    )
    to_pacs, to_archive = sorted(index.due_deliveries(clock[0]), key=lambda d: d.destination)[::-1]
    assert (to_pacs.destination, to_archive.destination) == ("pacs", "archive")
    index.delivery_failed(to_pacs.id, "refused", clock[0] + 1)
    clock[0] = start + 12  # 12 s after the series' last instance
    index.delivery_succeeded(to_pacs.id)
    index.delivery_failed(to_archive.id, "refused", None)  # dead letter
    _add(index, "2.1", "6.6", association)
    index.start_run("6.6", [RunPlan("ct", "ct-body", ("pacs",))], "")  # waits for a worker

    text, samples = _scrape(index, tmp_path / "spool")

    assert _value(samples, "dicom_ai_instances_received_total") == 4
    assert _of(samples, "dicom_ai_associations_total") == {
        (("result", "accepted"),): 1,
        (("result", "rejected_called_ae"),): 2,
    }
    assert _of(samples, "dicom_ai_jobs_total") == {
        (("model", "ct-body"), ("state", "done")): 1,
        (("model", "ct-body"), ("state", "retried")): 1,
        (("model", "lungs"), ("state", "failed")): 1,
    }
    assert _of(samples, "dicom_ai_deliveries_total") == {
        (("destination", "pacs"), ("state", "failed")): 1,
        (("destination", "pacs"), ("state", "delivered")): 1,
        (("destination", "archive"), ("state", "dead_letter")): 1,
    }
    stage = metrics.JOB_STAGE_SECONDS
    for name, seconds, bound in (("load", 0.2, 0.25), ("infer", 3.0, 5.0), ("encode", 0.05, 0.05)):
        labels = {"model": "ct-body", "stage": name}
        assert _buckets(samples, stage, **labels) == _expected_buckets(bound)
        assert _value(samples, f"{stage}_count", **labels) == 1
        assert _value(samples, f"{stage}_sum", **labels) == pytest.approx(seconds)
    assert len(_of(samples, f"{stage}_count")) == 3
    latency = metrics.RESULT_LATENCY_SECONDS
    assert _buckets(samples, latency, model="ct-body") == _expected_buckets(30.0)
    assert _value(samples, f"{latency}_count", model="ct-body") == 1
    assert _value(samples, f"{latency}_sum", model="ct-body") == pytest.approx(12.0)
    assert len(_of(samples, f"{latency}_count")) == 1  # one delivery went out
    assert _value(samples, QUEUE_DEPTH) == 1
    assert _value(samples, SPOOL_FREE_BYTES) == 123456789
    # The text itself: cumulative buckets with +Inf, as Prometheus reads them.
    assert 'dicom_ai_job_stage_seconds_bucket{le="0.1",model="ct-body",stage="load"} 0.0' in text
    assert 'dicom_ai_job_stage_seconds_bucket{le="0.25",model="ct-body",stage="load"} 1.0' in text
    assert 'dicom_ai_job_stage_seconds_bucket{le="+Inf",model="ct-body",stage="load"} 1.0' in text
    assert "SCANNER" not in text and "127.0.0.1" not in text


def test_buckets_add_up_over_observations(index: Index, tmp_path: Path) -> None:
    association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
    plan = [RunPlan("ct", "ct-body", ())]
    for run, seconds in enumerate((0.01, 0.07, 0.3, 700.0, 0.02)):
        _add(index, f"1.{run}", "5.5", association)
        index.start_run("5.5", plan, "")
        (job,) = index.claim_pending_jobs(1)
        index.finish_job(job.id, [], (), {"infer": seconds})
    _, samples = _scrape(index, tmp_path)
    buckets = _buckets(samples, metrics.JOB_STAGE_SECONDS, model="ct-body", stage="infer")
    assert (buckets["0.05"], buckets["0.1"], buckets["0.25"], buckets["0.5"]) == (2, 3, 3, 4)
    assert (buckets["600.0"], buckets["+Inf"]) == (4, 5)
    values = list(buckets.values())
    assert values == sorted(values)  # cumulative
    labels = {"model": "ct-body", "stage": "infer"}
    assert _value(samples, f"{metrics.JOB_STAGE_SECONDS}_count", **labels) == 5
    assert _value(samples, f"{metrics.JOB_STAGE_SECONDS}_sum", **labels) == pytest.approx(700.4)


# -- refused associations, through both acceptors --------------------------------------------


@pytest.fixture(params=["fast", "pynetdicom"])
def guarded_scp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StorageSCP]:
    """The node's SCP in this process with an access list per called AE, and room for one
    association."""
    access = AccessPolicy(
        {
            "DICOM_AI": CalledAE("DICOM_AI", allowed_calling_aes=frozenset({"SCANNER"})),
            "SECURE": CalledAE("SECURE", require_tls=True),
            "ELSEWHERE": CalledAE("ELSEWHERE", allowed_networks=(IPv4Network("10.0.0.0/8"),)),
        }
    )
    with local_scp(
        tmp_path,
        access=access,
        max_associations=1,
        network_timeout=5.0,
        acse_timeout=5.0,
        acceptor=str(request.param),
    ) as scp:
        yield scp


def _requested(port: int, called: str, calling: str = "SCANNER") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate("127.0.0.1", port, ae_title=called)


def _refused_for_its_application_context(port: int) -> bool:
    rq = _associate_rq("DICOM_AI", "SCANNER", CTImageStorage, ExplicitVRLittleEndian)
    rq = rq.replace(b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.7")  # the same length
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(rq)
        pdu_type, _ = read_pdu(sock)
    return pdu_type == 0x03  # A-ASSOCIATE-RJ


def _associations(scp: StorageSCP, tmp_path: Path) -> dict[str, float]:
    assert isinstance(scp.index, Index)
    text, samples = _scrape(scp.index, tmp_path)
    for phi in ("SCANNER", "INTRUDER", "WRONG", "127.0.0.1"):
        assert phi not in text
    return {
        dict(labels)["result"]: value
        for labels, value in _of(samples, "dicom_ai_associations_total").items()
    }


def test_each_refusal_is_counted_by_its_kind(guarded_scp: StorageSCP, tmp_path: Path) -> None:
    port = guarded_scp.port
    assert port is not None
    for called, calling in (
        ("WRONG", "SCANNER"),
        ("WRONG", "SCANNER"),
        ("DICOM_AI", "INTRUDER"),
        ("SECURE", "SCANNER"),
        ("ELSEWHERE", "SCANNER"),
    ):
        assert _requested(port, called, calling).is_rejected, (called, calling)
    assert _refused_for_its_application_context(port)
    first = _requested(port, "DICOM_AI")
    assert first.is_established
    try:
        assert _requested(port, "DICOM_AI").is_rejected  # over the limit
    finally:
        first.release()
    # Counted before the A-ASSOCIATE-RJ goes out (judge_request tells the SCP).
    assert _associations(guarded_scp, tmp_path) == {
        "accepted": 1,  # counted when it is accepted, before any C-STORE
        "rejected_called_ae": 2,
        "rejected_calling_ae": 1,
        "rejected_tls_required": 1,
        "rejected_address": 1,
        "rejected_application_context": 1,
        "rejected_limit": 1,
    }


def test_a_count_that_fails_does_not_stop_the_refusal(
    guarded_scp: StorageSCP,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk I/O error")

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(guarded_scp.index, "count", broken)
    port = guarded_scp.port
    assert port is not None
    assert _requested(port, "WRONG").is_rejected
    assert "could not count the association" in caplog.text
    first = _requested(port, "DICOM_AI")  # the node still takes associations
    assert first.is_established
    first.release()


# -- through a running node ------------------------------------------------------------------

DELIVERY_TIMEOUT = 240


@pytest.mark.dcmtk
@pytest.mark.slow
def test_a_series_through_the_node(tmp_path: Path, pacs: StoreSCP) -> None:
    """One series received, run by ct-body and delivered; three associations refused for
    their called AE (by whichever receiving process took each)."""
    spec = PhantomSpec(slices=16, rows=128, columns=128, pixel_spacing_mm=3.125)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    web_port = free_port()
    config = node_config(
        tmp_path / "node", pacs.port, web={"enabled": True, "host": "127.0.0.1", "port": web_port}
    )
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        for _ in range(3):
            refused = echoscu(node.port, ae_title="WRONG")
            assert refused.returncode != 0, refused.stdout + refused.stderr
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(
            lambda: node.index_rows("SELECT id FROM deliveries WHERE state = 'delivered'") != [],
            DELIVERY_TIMEOUT,
            "the results delivered",
            0.5,
        )
        # The console's /metrics, over HTTP, as Prometheus scrapes it.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as page:
            assert page.headers["Content-Type"] == CONTENT_TYPE
            text, samples = _parse(page.read().decode())
    finally:
        node.stop()
    assert _value(samples, "dicom_ai_instances_received_total") == len(paths)
    assert _of(samples, "dicom_ai_associations_total") == {
        (("result", "accepted"),): 1,
        (("result", "rejected_called_ae"),): 3,
    }
    assert _of(samples, "dicom_ai_jobs_total") == {(("model", "ct-body"), ("state", "done")): 1}
    assert _of(samples, "dicom_ai_deliveries_total") == {
        (("destination", "pacs"), ("state", "delivered")): 1
    }
    latency = metrics.RESULT_LATENCY_SECONDS
    assert _value(samples, f"{latency}_count", model="ct-body") == 1
    assert _buckets(samples, latency, model="ct-body")["+Inf"] == 1
    stage = metrics.JOB_STAGE_SECONDS
    for name in ("load", "infer", "encode"):
        assert _value(samples, f"{stage}_count", model="ct-body", stage=name) == 1
        assert _buckets(samples, stage, model="ct-body", stage=name)["+Inf"] == 1
    assert _value(samples, QUEUE_DEPTH) == 0
    assert _value(samples, SPOOL_FREE_BYTES) > 0
    for phi in (spec.patient_name, spec.patient_id, "SCANNER", "WRONG", "127.0.0.1"):
        assert phi not in text

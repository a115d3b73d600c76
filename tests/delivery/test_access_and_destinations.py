"""Access policy per called AE, the config for several AEs/TLS/destinations, and the
deliverer's choice of transport (C-STORE, STOW-RS, return to sender), with fakes for peers."""

from __future__ import annotations

import time
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.config import (
    SENDER,
    Config,
    DeliveryConfig,
    DicomDestination,
    DicomWebDestination,
    bind_sender,
    load_config,
)
from dicom_ai.dimse.scp import AccessPolicy, CalledAE
from dicom_ai.dimse.status import SendResult
from dicom_ai.errors import ConfigError
from dicom_ai.node import access_policy
from dicom_ai.pipeline import delivery
from dicom_ai.pipeline.delivery import Deliverer
from dicom_ai.store.index import Index, InstanceRecord, RunPlan

POLICY = AccessPolicy(
    {
        "AI_CT": CalledAE("AI_CT", frozenset({"CT1", "CT2"})),
        "AI_MR": CalledAE("AI_MR", allowed_networks=(ip_network("10.1.0.0/16"),)),
        "AI_ALL": CalledAE("AI_ALL"),
        "AI_TLS": CalledAE("AI_TLS", require_tls=True),
    }
)


@pytest.mark.parametrize(
    ("called", "calling", "address", "diagnostic"),
    [
        ("AI_CT", "CT1", "192.0.2.7", None),
        ("AI_CT ", "CT2", "192.0.2.7", None),  # AE titles are space padded on the wire
        ("AI_CT", "MR1", "192.0.2.7", 0x03),
        ("AI_MR", "ANY", "10.1.200.3", None),
        ("AI_MR", "ANY", "::ffff:10.1.0.9", None),  # IPv4-mapped IPv6 from a dual-stack socket
        ("AI_MR", "ANY", "10.2.0.1", 0x03),
        ("AI_MR", "ANY", "not-an-address", 0x03),
        ("AI_ALL", "ANYONE", "203.0.113.1", None),
        ("DICOM_AI", "CT1", "192.0.2.7", 0x07),
        ("AI_TLS", "CT1", "192.0.2.7", 0x03),  # plain TCP to a TLS-only title
    ],
)
def test_access_policy(called: str, calling: str, address: str, diagnostic: int | None) -> None:
    rejection = POLICY.check(called, calling, address)
    assert (rejection.diagnostic if rejection else None) == diagnostic


def test_tls_only_title_accepts_tls() -> None:
    assert POLICY.check("AI_TLS", "CT1", "192.0.2.7", tls=True) is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_called_aes_replace_the_single_title(tmp_path: Path) -> None:
    _write(tmp_path / "ct.yaml", "rules: []\n")
    config = load_config(
        _write(
            tmp_path / "node.yaml",
            "called_aes:\n"
            "  AI_CT:\n"
            "    rules: ct.yaml\n"
            "    allowed_calling_aes: [CT1]\n"
            "    allowed_addresses: [10.0.0.0/8, 192.0.2.7]\n",
        )
    )
    table = config.called_ae_table()
    assert list(table) == ["AI_CT"] and table["AI_CT"].rules == tmp_path / "ct.yaml"
    policy = access_policy(config)
    assert policy.check("AI_CT", "CT1", "192.0.2.7") is None
    assert policy.check(config.node.ae_title, "CT1", "192.0.2.7") is not None
    # Without called_aes the node answers to its own title, anyone may call.
    assert list(Config().called_ae_table()) == ["DICOM_AI"]
    assert access_policy(Config()).check("DICOM_AI", "X", "203.0.113.9") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("destinations:\n  sender: {ae_title: A, host: h, port: 1}\n", "reserved"),
        ("rules: r.yaml\ncalled_aes:\n  A: {rules: r.yaml}\n", "drop top-level rules"),
        (
            "node: {tls: {port: 1, certificate: c, private_key: k, "
            "require_client_certificate: true}}\n",
            "needs ca_certificates",
        ),
        ("node: {port: null}\n", "must listen somewhere"),
        ("destinations:\n  web: {url: 'ftp://x'}\n", "destinations.web.dicomweb.url"),
        (
            "called_aes:\n  A: {rules: r.yaml, allowed_addresses: [10.0.0.300]}\n",
            ":2: called_aes.A.allowed_addresses",
        ),
        ("called_aes:\n  THIS_TITLE_IS_TOO_LONG: {rules: r.yaml}\n", "called_aes"),
        ("models:\n  mr-brain: {threshold: 0.3}\n", "threshold apply to bundles"),
        ("models:\n  m: {bundle: b, task: detect}\n", "models.m.task"),
        ("models:\n  m: {bundle: b, threshold: 1.5}\n", "models.m.threshold"),
    ],
)
def test_config_refuses(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path / "node.yaml", text))
    assert message in str(info.value)


def test_destination_kinds_and_resolved_paths(tmp_path: Path) -> None:
    config = load_config(
        _write(
            tmp_path / "node.yaml",
            "destinations:\n"
            "  pacs: {ae_title: PACS, host: pacs.local, port: 104,\n"
            "         tls: {ca_certificates: ca.pem}}\n"
            "  web: {url: 'https://pacs.local/dicom-web', ca_certificates: ca.pem}\n",
        )
    )
    pacs, web = config.destinations["pacs"], config.destinations["web"]
    assert isinstance(pacs, DicomDestination) and isinstance(web, DicomWebDestination)
    assert pacs.tls is not None and pacs.tls.ca_certificates == tmp_path / "ca.pem"
    assert web.ca_certificates == tmp_path / "ca.pem"
    assert config.has_destination(SENDER) and not config.has_destination("nowhere")


# -- the deliverer ----------------------------------------------------------------------------


class Recorder:
    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, target: Any, paths: Any, *args: Any, **kwargs: Any) -> list[SendResult]:
        self.calls.append((target, *args, kwargs))
        return [SendResult(p, self.status) for p in paths]


def _job(tmp_path: Path, calling_ae: str, destination: str) -> tuple[Index, list[Path]]:
    index = Index(tmp_path / "index.sqlite3")
    files = [tmp_path / "seg.dcm", tmp_path / "sr.dcm"]
    for f in files:
        f.write_bytes(b"x")
    association = index.open_association(calling_ae, "DICOM_AI", "192.0.2.7")
    index.add_instance(
        InstanceRecord(
            "1.1", "1.2.840.10008.5.1.4.1.1.2", "5.5", "9.9", "CT", files[0], association
        )
    )
    # The node binds `sender` to the calling AE when it plans the run.
    bound = bind_sender(destination, calling_ae)
    (job_id,) = index.start_run("5.5", [RunPlan("ct", "ct-body", (bound,))], "")
    index.claim_pending_jobs(1)
    index.finish_job(job_id, files, (bound,))
    return index, files


def _deliverer(index: Index, **destinations: Any) -> Deliverer:
    return Deliverer(
        index,
        destinations,
        "DICOM_AI",
        DeliveryConfig(max_attempts=3),
        senders={"CT1": DicomDestination(ae_title="CT1_STORE", host="192.0.2.7", port=4006)},
    )


def test_return_to_sender_uses_the_calling_ae_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _ = _job(tmp_path, "CT1", SENDER)
    scu = Recorder()
    monkeypatch.setattr(delivery, "send_files", scu)
    assert _deliverer(index).run_due() == 1
    ((peer, *_),) = scu.calls
    assert (peer.ae_title, peer.host, peer.port) == ("CT1_STORE", "192.0.2.7", 4006)
    assert [d.state for d in index.deliveries()] == ["delivered"]


def test_unknown_sender_is_dead_letter_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _ = _job(tmp_path, "STRANGER", SENDER)
    scu = Recorder()
    monkeypatch.setattr(delivery, "send_files", scu)
    assert _deliverer(index).run_due() == 0
    assert scu.calls == []
    (record,) = index.deliveries()
    assert record.state == "dead"
    assert record.destination == "sender:STRANGER"
    assert "calling AE 'STRANGER'" in (record.last_error or "")


def test_dicomweb_destination_goes_by_stow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index, _ = _job(tmp_path, "CT1", "web")
    stow, scu = Recorder(), Recorder()
    monkeypatch.setattr(delivery, "stow_files", stow)
    monkeypatch.setattr(delivery, "send_files", scu)
    web = DicomWebDestination(url="http://pacs.local/dicom-web")
    assert _deliverer(index, web=web).run_due() == 1
    assert scu.calls == []
    ((url, *_),) = stow.calls
    assert url == "http://pacs.local/dicom-web"


def test_dicomweb_failure_status_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _ = _job(tmp_path, "CT1", "web")
    monkeypatch.setattr(delivery, "stow_files", Recorder(status=0xA700))
    web = DicomWebDestination(url="http://pacs.local/dicom-web")
    assert _deliverer(index, web=web).run_due() == 0
    (record,) = index.deliveries()
    assert record.state == "pending" and "0xA700" in (record.last_error or "")


def test_each_called_ae_routes_its_batch_by_its_own_rules(tmp_path: Path) -> None:
    """One series reaches AI_CT and AI_ALL (not AI_MR): both titles' rules run, AI_MR's
    never; `sender` is bound to the calling AE of the title whose rule named it."""
    from dicom_ai.assembly import AssemblyPolicy
    from dicom_ai.node import check_rules_against_config
    from dicom_ai.pipeline.scheduler import JobSpecs, Scheduler
    from dicom_ai.routing import LiveRules
    from dicom_ai.store.spool import Spool
    from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
    from tests.inference.test_scheduler import FakeWorkers

    def rules(name: str, destination: str) -> str:
        path = _write(
            tmp_path / f"{name}.yaml",
            f"rules:\n  - name: {name}\n    match: {{Modality: {{equals: CT}}}}\n"
            f"    model: ct-body\n    destinations: [{destination}]\n",
        )
        return str(path)

    config = load_config(
        _write(
            tmp_path / "node.yaml",
            f"node: {{data_dir: data, port: 0}}\n"
            f"called_aes:\n"
            f"  AI_CT: {{rules: {rules('ct-a', 'pacs')}}}\n"
            f"  AI_ALL: {{rules: {rules('all-b', SENDER)}}}\n"
            f"  AI_MR: {{rules: {rules('mr-c', 'pacs')}}}\n",
        )
    )
    spec = PhantomSpec(slices=2, rows=16, columns=16)
    paths = write_phantom_ct(tmp_path / "ct", spec)
    index = Index(tmp_path / "index.sqlite3")
    rules = LiveRules(
        {title: called.rules for title, called in config.called_ae_table().items()},
        check=lambda r, p: check_rules_against_config(r, config, p),
    )
    pool = FakeWorkers(size=0)  # the jobs stay pending
    policy = AssemblyPolicy(quiet_seconds=5)
    specs = JobSpecs(config, Spool(tmp_path / "spool"))
    scheduler = Scheduler(index, pool, rules, policy, specs, max_job_attempts=3)
    try:
        for path, (calling, called) in zip(
            paths, [("CT1", "AI_CT"), ("PACS1", "AI_ALL")], strict=True
        ):
            association = index.open_association(calling, called, "192.0.2.7")
            index.add_instance(
                InstanceRecord(
                    path.stem,
                    "1.2.840.10008.5.1.4.1.1.2",
                    spec.series_instance_uid,
                    spec.study_instance_uid,
                    "CT",
                    path,
                    association,
                )
            )
        scheduler.step(time.time() + 10)  # quiet for longer than quiet_seconds
        jobs = {(j.rule, j.destinations) for j in index.jobs()}
    finally:
        index.close()
    assert jobs == {("ct-a", ("pacs",)), ("all-b", ("sender:PACS1",))}

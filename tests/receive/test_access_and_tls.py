"""Several called AE titles, access control, return to sender, DICOM TLS, and no PHI in logs.

Real peers over loopback: DCMTK echoscu/storescu/storescp (also with +tls) against the node.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import (
    REPO,
    NodeProcess,
    StoreSCP,
    echoscu,
    free_port,
    node_config,
    storescu,
    wait_until,
)
from tests.results_check import check_phantom_results
from tests.tls_certs import Pki, make_pki

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.slow]

DEADLINE = 120


def _rules(path: Path, name: str, model: str | None, destination: str, match: str) -> Path:
    target = "    model: null\n"
    if model:
        target = f"    model: {model}\n    destinations: [{destination}]\n"
    path.write_text(f"rules:\n  - name: {name}\n    match: {match}\n{target}")
    return path


CT = "{Modality: {equals: CT}}"


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomSpec, list[Path]]:
    spec = PhantomSpec(slices=12, rows=128, columns=128, pixel_spacing_mm=3.0)
    return spec, write_phantom_ct(tmp_path_factory.mktemp("small-ct"), spec)


def _another_ct(tmp_path: Path, **identity: Any) -> tuple[PhantomSpec, list[Path]]:
    spec = PhantomSpec(slices=12, rows=128, columns=128, pixel_spacing_mm=3.0, **identity)
    return spec, write_phantom_ct(tmp_path / "ct-b", spec)


def _rejected(result: subprocess.CompletedProcess[str], reason: str) -> bool:
    text = result.stdout + result.stderr
    return result.returncode != 0 and "Association Rejected" in text and reason in text


def test_called_aes_have_own_rules_and_access_lists(
    tmp_path: Path, pacs: StoreSCP, small_ct: tuple[PhantomSpec, list[Path]]
) -> None:
    spec_a, series_a = small_ct
    _, series_b = _another_ct(tmp_path)
    called_aes = {
        "AI_CT": {
            "rules": str(_rules(tmp_path / "ct.yaml", "ct-seg", "ct-body", "pacs", CT)),
            "allowed_calling_aes": ["CT_SCANNER"],
        },
        # Its rule would take any CT too; it must never see what AI_CT or AI_ALL receive.
        "AI_MR": {
            "rules": str(_rules(tmp_path / "mr.yaml", "mr-any", "ct-body", "pacs", CT)),
            "allowed_addresses": ["10.0.0.0/8"],
        },
        "AI_ALL": {"rules": str(_rules(tmp_path / "all.yaml", "archive-only", None, "pacs", CT))},
    }
    config = node_config(tmp_path / "node", pacs.port, called_aes=called_aes)
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert echoscu(node.port, "AI_CT", calling_ae="CT_SCANNER").returncode == 0
        assert echoscu(node.port, "AI_ALL", calling_ae="ANYONE").returncode == 0
        assert _rejected(
            echoscu(node.port, "AI_CT", calling_ae="INTRUDER"), "Calling AE Title Not Recognized"
        )
        # Loopback is not in 10.0.0.0/8.
        assert _rejected(
            echoscu(node.port, "AI_MR", calling_ae="CT_SCANNER"), "Calling AE Title Not Recognized"
        )
        unknown = echoscu(node.port, "DICOM_AI", calling_ae="CT_SCANNER")
        assert _rejected(unknown, "Called AE Title Not Recognized")
        refused = storescu(node.port, series_b, ae_title="AI_MR", calling_ae="CT_SCANNER")
        assert refused.returncode != 0

        sent = storescu(node.port, series_a, ae_title="AI_CT", calling_ae="CT_SCANNER")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent = storescu(node.port, series_b, ae_title="AI_ALL", calling_ae="ANYONE")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(
            lambda: len(node.index_rows("SELECT 1 FROM series WHERE runs = 1")) == 2,
            DEADLINE,
            "both series routed",
        )
        wait_until(lambda: len(pacs.files()) >= 2, DEADLINE, "results at the PACS", 0.5)
        time.sleep(1.0)
        jobs = node.index_rows("SELECT series_instance_uid, rule FROM jobs")
        notes = dict(node.index_rows("SELECT series_instance_uid, routed_note FROM series"))
    finally:
        node.stop()
    assert jobs == [(spec_a.series_instance_uid, "ct-seg")]
    assert all("archive-only" in note for uid, note in notes.items() if uid != jobs[0][0])
    assert "mr-any" not in node.log_text()
    check_phantom_results(pacs.files(), series_a, spec_a)
    log = node.log_text()
    assert "INTRUDER@127.0.0.1 to AI_CT rejected" in log
    assert "address 127.0.0.1 is not allowed on AI_MR" in log
    assert "called AE 'DICOM_AI' is not served" in log


def test_return_to_sender(
    tmp_path: Path, pacs: StoreSCP, small_ct: tuple[PhantomSpec, list[Path]]
) -> None:
    spec_a, series_a = small_ct
    _, series_b = _another_ct(tmp_path)
    modality = StoreSCP(tmp_path / "modality", ae_title="CT_WS").start()
    config = node_config(
        tmp_path / "node",
        pacs.port,
        rules=_rules(tmp_path / "rules.yaml", "back", "ct-body", "sender", CT),
        senders={"CT_SCANNER": {"ae_title": "CT_WS", "host": "127.0.0.1", "port": modality.port}},
    )
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        sent = storescu(node.port, series_a, calling_ae="CT_SCANNER")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent = storescu(node.port, series_b, calling_ae="STRANGER")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(modality.files()) >= 2, DEADLINE, "results at the sender", 0.5)
        wait_until(
            lambda: (
                sorted(node.index_rows("SELECT state FROM deliveries"))
                == [("dead",), ("delivered",)]
            ),
            DEADLINE,
            "one delivery done, the stranger's dead letter",
        )
        deliveries = node.index_rows("SELECT destination, state, last_error FROM deliveries")
    finally:
        node.stop()
        modality.stop()
    assert pacs.files() == []
    check_phantom_results(modality.files(), series_a, spec_a)
    states = sorted((d, s) for d, s, _ in deliveries)
    assert states == [("sender:CT_SCANNER", "delivered"), ("sender:STRANGER", "dead")]
    (error,) = [e for _, s, e in deliveries if s == "dead"]
    assert "calling AE 'STRANGER'" in error and "no entry in senders" in error


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_receive_and_send(
    tmp_path: Path, pki: Pki, small_ct: tuple[PhantomSpec, list[Path]]
) -> None:
    spec, series = small_ct
    # The PACS requires our client certificate (DCMTK's default -rc).
    pacs = StoreSCP(tmp_path / "pacs", tls=pki.dcmtk("server")).start()
    tls_port = free_port()
    config = node_config(
        tmp_path / "node",
        pacs.port,
        node={"tls": pki.node_tls(tls_port)},
        called_aes={
            "DICOM_AI": {"rules": str(REPO / "rules" / "default.yaml"), "require_tls": True}
        },
        destinations={
            "pacs": {
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "tls": {
                    "ca_certificates": str(pki.ca),
                    "certificate": str(pki.client_certificate),
                    "private_key": str(pki.client_key),
                },
            }
        },
    )
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        plain = storescu(tls_port, series[:1])
        assert plain.returncode != 0
        # The plain port is open, but this title takes TLS only.
        assert _rejected(echoscu(node.port), "Calling AE Title Not Recognized")
        assert storescu(node.port, series[:1]).returncode != 0
        rogue = storescu(tls_port, series[:1], options=pki.dcmtk("rogue"))
        assert rogue.returncode != 0
        no_client_cert = storescu(tls_port, series[:1], options=["+tla", "+cf", str(pki.ca)])
        assert no_client_cert.returncode != 0
        assert node.index_rows("SELECT 1 FROM instances") == []

        tls_options = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_certificate)]
        echo = subprocess.run(
            [
                *(sys.executable, "-m", "dicom_ai.cli", "echo", f"DICOM_AI@127.0.0.1:{tls_port}"),
                *(*tls_options, "--tls-key", str(pki.client_key)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert echo.returncode == 0 and "Success" in echo.stdout, echo.stdout + echo.stderr
        # A client that connects and says nothing must not hold up the TLS handshakes of others.
        with socket.create_connection(("127.0.0.1", tls_port)):
            sent = storescu(
                tls_port,
                series,
                options=pki.dcmtk("client"),
            )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, DEADLINE, "results at the TLS PACS", 0.5)
        time.sleep(1.0)
    finally:
        node.stop()
        pacs.stop()
    assert len(node.index_rows("SELECT 1 FROM instances")) == len(series)
    check_phantom_results(pacs.files(), series, spec)
    assert "(TLS)" in node.log_text()
    assert "DICOM_AI accepts TLS connections only" in node.log_text()


def test_no_phi_in_logs(tmp_path: Path, pacs: StoreSCP) -> None:
    """A series with a known patient, a rule on PatientID, a refused association and a
    refused instance: the INFO log names none of the patient's identifiers."""
    name, patient_id = "DOE^JANE^QUINN", "MRN8675309"
    spec, series = _another_ct(tmp_path, patient_name=name, patient_id=patient_id)
    rules = _rules(
        tmp_path / "rules.yaml", "by-mrn", "ct-body", "pacs", "{PatientID: {regex: '^MRN'}}"
    )
    config = node_config(
        tmp_path / "node",
        pacs.port,
        called_aes={
            "DICOM_AI": {"rules": str(rules), "allowed_calling_aes": ["SCANNER"]},
        },
    )
    garbage = tmp_path / "not-dicom.dcm"
    garbage.write_bytes(b"DOE^JANE^QUINN MRN8675309 " * 20)
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        assert storescu(node.port, series[:1], calling_ae="OTHER").returncode != 0
        sent = storescu(node.port, series)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, DEADLINE, "results at the PACS", 0.5)
    finally:
        node.stop()
    check_phantom_results(pacs.files(), series, spec)
    log = node.log_text()
    assert " INFO " in log and "by-mrn" in log  # the log is there and names the rule
    for identifier in (name, "DOE", "QUINN", patient_id, "8675309", "19700101"):
        assert identifier not in log, identifier

"""The REST API: every endpoint, 401/403 per role, CSRF, and the bad-input matrix.

The app runs in-process (FastAPI's TestClient) over a real index and accounts database;
the echo test calls a real DCMTK storescp.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicom_ai.config import Config
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from dicom_ai.web.accounts import Accounts
from dicom_ai.web.app import SESSION_COOKIE, create_app
from tests.peers import StoreSCP, free_port

CT_RULES = """
rules:
  - name: ct
    priority: 10
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs]
"""
NOTHING_RULES = """
rules:
  - name: mr-only
    priority: 10
    match: {Modality: {equals: MR}}
    model: mr-brain
    destinations: [pacs]
"""


@dataclass
class Env:
    client: TestClient
    tokens: dict[str, str]
    accounts: Accounts
    index: Index
    ct_series: str
    failed_job: int
    dead_delivery: int
    done_job: int
    phantom: PhantomSpec
    data_dir: Path

    def call(self, method: str, path: str, role: str | None = "admin", **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return self.client.request(method, path, headers=headers, **kw)


def _series(index: Index, paths: list[Path], spec: PhantomSpec, association: int) -> None:
    for n, path in enumerate(paths):
        index.add_instance(
            InstanceRecord(
                f"{spec.series_instance_uid}.{n + 1}",
                "1.2.840.10008.5.1.4.1.1.2",
                spec.series_instance_uid,
                spec.study_instance_uid,
                "CT",
                path,
                association,
            )
        )


def make_env(tmp_path: Path, destinations: dict[str, Any] | None = None, **web: Any) -> Env:
    rules = tmp_path / "rules.yaml"
    rules.write_text(CT_RULES)
    data_dir = tmp_path / "data"
    cfg = Config.model_validate(
        {
            "node": {"data_dir": str(data_dir)},
            "rules": str(rules),
            "destinations": destinations
            or {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
            "web": web,
        }
    )
    index = Index(data_dir / "index.sqlite3")
    association = index.open_association("CT_SCANNER", "DICOM_AI", "127.0.0.1")
    # Two series: one whose job fails, one whose job is done with a dead-letter delivery.
    specs = [PhantomSpec(slices=2, rows=32, columns=32) for _ in range(2)]
    for n, spec in enumerate(specs):
        _series(index, write_phantom_ct(data_dir / "spool" / f"s{n}", spec), spec, association)
    index.close_association(association)
    plan = [RunPlan("ct", "ct-body", ("pacs",))]
    (failed,) = index.start_run(specs[0].series_instance_uid, plan, "ct: Modality 'CT' equals 'CT'")
    (done,) = index.start_run(specs[1].series_instance_uid, plan, "ct: Modality 'CT' equals 'CT'")
    index.claim_pending_jobs(2)
    index.fail_job(failed, "ModelError: boom", retry=False)
    index.finish_job(
        done, [data_dir / "results" / "sr.dcm"], ("pacs",), {"load": 0.5}, "c0ffee (10.0.0.7)"
    )
    (delivery,) = index.deliveries()
    index.delivery_failed(delivery.id, "no association with PACS", None)
    accounts = Accounts(data_dir / "console.sqlite3")
    tokens = {}
    for role in ("viewer", "operator", "admin"):
        accounts.add_user(role, role, f"{role}-password")
        tokens[role] = accounts.new_token(role)
    client = TestClient(create_app(cfg, accounts), raise_server_exceptions=False)
    return Env(
        client,
        tokens,
        accounts,
        index,
        specs[0].series_instance_uid,
        failed,
        delivery.id,
        done,
        specs[0],
        data_dir,
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = make_env(tmp_path)
    yield made
    made.index.close()
    made.accounts.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One env for the tests that change nothing (refusals, bad input, headers)."""
    made = make_env(tmp_path_factory.mktemp("shared"))
    yield made
    made.index.close()
    made.accounts.close()


READS = [
    ("GET", "/api/v1/series"),
    ("GET", "/api/v1/jobs?state=failed"),
    ("GET", "/api/v1/deliveries?state=dead_letter"),
    ("GET", "/api/v1/destinations"),
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/rules"),
    ("GET", "/api/v1/dashboard"),
]
ACTIONS = [
    ("POST", "/api/v1/jobs/{job}/rerun"),
    ("POST", "/api/v1/deliveries/{delivery}/resubmit"),
    ("POST", "/api/v1/deliveries/{delivery}/discard"),
    ("POST", "/api/v1/destinations/pacs/echo"),
]
ADMIN = [("GET", "/api/v1/users"), ("GET", "/api/v1/audit")]


def _path(env: Env, template: str) -> str:
    return template.format(job=env.failed_job, delivery=env.dead_delivery, series=env.ct_series)


def test_healthz_answers_without_login(shared: Env) -> None:
    answer = shared.client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok" and answer.json()["index"] == "ok"


@pytest.mark.parametrize(
    ("method", "template"),
    [*READS, *ACTIONS, *ADMIN, ("GET", "/api/v1/series/{series}"), ("POST", "/api/v1/rules/test")],
)
def test_every_endpoint_needs_credentials(shared: Env, method: str, template: str) -> None:
    answer = shared.call(method, _path(shared, template), role=None)
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    wrong = shared.call(
        method, _path(shared, template), role=None, headers={"Authorization": "Bearer x"}
    )
    assert wrong.status_code == 401
    basic = shared.call(
        method, _path(shared, template), role=None, headers={"Authorization": "Basic x"}
    )
    assert basic.status_code == 401


def test_roles_viewer_reads_operator_acts_admin_manages(env: Env) -> None:
    for method, template in READS:
        for role in ("viewer", "operator", "admin"):
            assert env.call(method, template, role).status_code == 200, (role, template)
    for method, template in ACTIONS:
        answer = env.call(method, _path(env, template), "viewer")
        assert answer.status_code == 403, template
        assert "viewer may not" in answer.json()["detail"]
    for method, template in ADMIN:
        assert env.call(method, template, "viewer").status_code == 403
        assert env.call(method, template, "operator").status_code == 403
        assert env.call(method, template, "admin").status_code == 200
    new_user = {"name": "eve", "role": "admin", "password": "long-enough"}
    assert env.call("POST", "/api/v1/users", "operator", json=new_user).status_code == 403
    assert env.accounts.user("eve") is None


def test_series_list_filters_and_pages(env: Env) -> None:
    page = env.call("GET", "/api/v1/series?per_page=1").json()
    assert (page["total"], page["pages"], len(page["items"])) == (2, 2, 1)
    second = env.call("GET", "/api/v1/series?per_page=1&page=2").json()["items"][0]
    assert second["series_instance_uid"] != page["items"][0]["series_instance_uid"]
    assert env.call("GET", "/api/v1/series?modality=MR").json()["total"] == 0
    assert env.call("GET", "/api/v1/series?modality=CT&state=routed").json()["total"] == 2
    assert env.call("GET", "/api/v1/series?state=pending").json()["total"] == 0
    assert env.call("GET", "/api/v1/series?since=2999-01-01").json()["total"] == 0
    assert env.call("GET", "/api/v1/series?since=0").json()["total"] == 2
    item = page["items"][0]
    assert item["instances"] == 2 and item["modality"] == "CT"
    # No patient data in the list, for any role.
    assert "PHANTOM" not in env.call("GET", "/api/v1/series").text


def test_series_detail_and_patient_data_by_role(env: Env) -> None:
    viewer = env.call("GET", f"/api/v1/series/{env.ct_series}", "viewer").json()
    assert viewer["patient"] is None and "PHANTOM" not in str(viewer)
    assert len(viewer["instance_list"]) == 2
    assert viewer["instance_list"][0]["calling_ae"] == "CT_SCANNER"
    assert viewer["routing"] == "ct: Modality 'CT' equals 'CT'"
    (job,) = viewer["job_list"]
    assert (job["state"], job["model"], job["error"]) == ("failed", "ct-body", "ModelError: boom")
    assert job["ran_on"] is None  # on this machine
    operator = env.call("GET", f"/api/v1/series/{env.ct_series}", "operator").json()
    assert operator["patient"] == {"name": env.phantom.patient_name, "id": env.phantom.patient_id}
    views = [e for e in env.accounts.audit_entries() if e.action == "view.patient"]
    assert [(e.user, e.target) for e in views] == [("operator", env.ct_series)]
    done = env.call("GET", "/api/v1/jobs?state=done").json()["items"][0]
    detail = env.call("GET", f"/api/v1/series/{done['series_instance_uid']}").json()
    (job,) = detail["job_list"]
    assert job["stages"] == {"load": 0.5}
    assert job["ran_on"] == "c0ffee (10.0.0.7)"  # the Ray cluster node that ran it
    page = env.client.get(
        f"/series/{done['series_instance_uid']}",
        headers={"Authorization": f"Bearer {env.tokens['viewer']}"},
    )
    assert 'ran on cluster node <code class="uid">c0ffee (10.0.0.7)</code>' in page.text
    (delivery,) = job["deliveries"]
    assert delivery["state"] == "dead_letter"
    assert [a["ok"] for a in delivery["attempt_list"]] == [False]
    assert delivery["attempt_list"][0]["error"] == "no association with PACS"


def test_rerun_a_failed_job(env: Env) -> None:
    failed = env.call("GET", "/api/v1/jobs?state=failed").json()
    assert [j["id"] for j in failed["items"]] == [env.failed_job]
    answer = env.call("POST", f"/api/v1/jobs/{env.failed_job}/rerun", "operator")
    assert answer.status_code == 200 and answer.json()["state"] == "pending"
    assert env.index.job(env.failed_job).state == "pending"
    assert env.index.job(env.failed_job).attempts == 0
    again = env.call("POST", f"/api/v1/jobs/{env.failed_job}/rerun", "operator")
    assert again.status_code == 409 and "only a failed job" in again.json()["detail"]
    assert env.call("POST", f"/api/v1/jobs/{env.done_job}/rerun").status_code == 409
    assert env.call("POST", "/api/v1/jobs/999/rerun").status_code == 404
    (entry,) = [e for e in env.accounts.audit_entries() if e.action == "job.rerun"]
    assert (entry.user, entry.target) == ("operator", str(env.failed_job))


def test_resubmit_a_dead_letter(env: Env) -> None:
    dead = env.call("GET", "/api/v1/deliveries?state=dead_letter").json()
    assert [d["id"] for d in dead["items"]] == [env.dead_delivery]
    assert dead["items"][0]["series_instance_uid"]
    answer = env.call("POST", f"/api/v1/deliveries/{env.dead_delivery}/resubmit", "operator")
    assert answer.status_code == 200 and answer.json()["state"] == "pending"
    assert env.call("GET", "/api/v1/deliveries?state=dead_letter").json()["total"] == 0
    again = env.call("POST", f"/api/v1/deliveries/{env.dead_delivery}/resubmit")
    assert again.status_code == 409
    assert env.call("POST", "/api/v1/deliveries/12345/resubmit").status_code == 404


def test_discard_a_dead_letter_then_its_results_may_be_purged(env: Env) -> None:
    answer = env.call("POST", f"/api/v1/deliveries/{env.dead_delivery}/discard", "operator")
    assert answer.status_code == 200 and answer.json()["state"] == "discarded"
    assert env.call("GET", "/api/v1/deliveries?state=dead_letter").json()["total"] == 0
    again = env.call("POST", f"/api/v1/deliveries/{env.dead_delivery}/discard")
    assert again.status_code == 409 and "only a dead letter" in again.json()["detail"]
    (entry,) = [e for e in env.accounts.audit_entries() if e.action == "delivery.discard"]
    assert (entry.user, entry.target) == ("operator", str(env.dead_delivery))
    job_id = next(d.job_id for d in env.index.deliveries() if d.id == env.dead_delivery)
    due = env.index.results_due(time.time(), 0, limit=-1)
    assert str(job_id) in [c.key for c in due]


@pytest.mark.dcmtk
def test_echo_a_destination_with_a_real_storescp(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "pacs").start()
    try:
        env = make_env(
            tmp_path,
            destinations={
                "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port},
                "down": {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()},
            },
        )
        answer = env.call("POST", "/api/v1/destinations/pacs/echo", "operator").json()
        assert answer["ok"] is True and "0x0000" in answer["detail"]
        down = env.call("POST", "/api/v1/destinations/down/echo", "operator").json()
        assert down["ok"] is False and "no association" in down["detail"]
        assert env.call("POST", "/api/v1/destinations/nope/echo").status_code == 404
        assert env.call("POST", "/api/v1/destinations/a%20b/echo").status_code == 400
        names = [d["name"] for d in env.call("GET", "/api/v1/destinations").json()]
        assert names == ["down", "pacs"]
    finally:
        scp.stop()


def test_rules_test_on_an_upload_and_on_a_received_series(env: Env) -> None:
    dicom = next((env.data_dir / "spool" / "s0").iterdir()).read_bytes()
    answer = env.call(
        "POST",
        "/api/v1/rules/test",
        "viewer",
        files={"file": ("ct.dcm", dicom, "application/dicom")},
        data={"calling_ae": "CT1"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["decisions"][0]["model"] == "ct-body"
    assert body["trace"][0]["matched"] is True and body["calling_ae"] == "CT1"
    by_uid = env.call(
        "POST", "/api/v1/rules/test", data={"series_instance_uid": env.ct_series}
    ).json()
    assert by_uid["series_instance_uid"] == env.ct_series
    assert by_uid["calling_ae"] == "CT_SCANNER"
    bad = env.call("POST", "/api/v1/rules/test", files={"file": ("x.dcm", b"not dicom", "x/y")})
    assert bad.status_code == 400 and "not a DICOM" in bad.json()["detail"]
    assert env.call("POST", "/api/v1/rules/test").status_code == 400
    empty = env.call("POST", "/api/v1/rules/test", files={"file": ("x.dcm", b"", "x/y")})
    assert empty.status_code == 400


def test_rules_check_and_replay(env: Env) -> None:
    assert env.call("POST", "/api/v1/rules/check", json={"text": CT_RULES}).json()["valid"]
    bad = env.call("POST", "/api/v1/rules/check", json={"text": "rules:\n  - name: [\n"})
    assert bad.status_code == 400 and "candidate" in bad.json()["detail"]
    unknown = env.call(
        "POST", "/api/v1/rules/check", json={"text": CT_RULES.replace("ct-body", "nope")}
    )
    assert unknown.status_code == 400 and "unknown model(s) nope" in unknown.json()["detail"]
    same = env.call("POST", "/api/v1/rules/replay", json={"text": CT_RULES, "count": 10}).json()
    assert (same["series"], same["changed"], same["unchanged"]) == (2, [], 2)
    changed = env.call("POST", "/api/v1/rules/replay", json={"text": NOTHING_RULES}).json()
    assert len(changed["changed"]) == 2
    row = changed["changed"][0]
    assert row["current"] == ["ct: ct-body -> pacs"] and row["candidate"] == []
    assert (
        env.call("POST", "/api/v1/rules/replay", json={"text": CT_RULES, "count": 0}).status_code
        == 400
    )
    rules = env.call("GET", "/api/v1/rules").json()
    assert rules[0]["called_ae"] == "DICOM_AI" and "ct-body" in rules[0]["text"]


def test_models_and_dashboard(env: Env) -> None:
    models = {m["id"]: m for m in env.call("GET", "/api/v1/models").json()}
    assert models["ct-body"]["builtin"] is True
    env.index.record_model_check("ct-body", "ok", None)
    assert env.call("GET", "/api/v1/models").json()[0]["check"]["state"] == "ok"
    board = env.call("GET", "/api/v1/dashboard").json()
    assert sum(h["instances"] for h in board["received_per_hour"]) == 4
    assert (board["failed_jobs"], board["dead_letters"]) == (1, 1)
    assert board["disk"]["free_bytes"] > 0


def test_users_through_the_api(env: Env) -> None:
    new = {"name": "eve", "role": "viewer", "password": "long-enough"}
    assert env.call("POST", "/api/v1/users", json=new).status_code == 200
    assert env.call("POST", "/api/v1/users", json=new).status_code == 400  # exists
    weak = env.call("POST", "/api/v1/users", json={**new, "name": "bob", "password": "short"})
    assert weak.status_code == 400 and "at least 8" in weak.json()["detail"]
    bad_role = env.call("POST", "/api/v1/users", json={**new, "name": "bob", "role": "root"})
    assert bad_role.status_code == 400
    assert "eve" in [u["name"] for u in env.call("GET", "/api/v1/users").json()]
    assert env.call("DELETE", "/api/v1/users/eve").status_code == 200
    assert env.call("DELETE", "/api/v1/users/eve").status_code == 404
    assert env.call("DELETE", "/api/v1/users/admin").status_code == 409  # oneself
    actions = [e.action for e in env.accounts.audit_entries()]
    assert actions.count("user.add") == 1 and actions.count("user.remove") == 1


def test_a_session_needs_its_csrf_token_for_actions(env: Env) -> None:
    user = env.accounts.user("operator")
    assert user is not None
    session_id, session = env.accounts.new_session(user)
    env.client.cookies.set(SESSION_COOKIE, session_id)
    try:
        assert env.client.get("/api/v1/series").status_code == 200  # reads need no token
        path = f"/api/v1/jobs/{env.failed_job}/rerun"
        refused = env.client.post(path)
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
        assert env.client.post(path, headers={"X-CSRF-Token": "wrong"}).status_code == 403
        assert env.index.job(env.failed_job).state == "failed"
        ok = env.client.post(path, headers={"X-CSRF-Token": session.csrf_token})
        assert ok.status_code == 200
    finally:
        env.client.cookies.clear()


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/series?page=0",
        "/api/v1/series?page=abc",
        "/api/v1/series?page=-1",
        "/api/v1/series?per_page=0",
        "/api/v1/series?per_page=100000",
        "/api/v1/series?state=bogus",
        "/api/v1/series?modality=ct%3Bdrop",
        "/api/v1/series?since=yesterday",
        "/api/v1/series/abc",
        "/api/v1/series/1.2.03",
        "/api/v1/series/" + "1." * 40 + "1",
        "/api/v1/jobs?state=nope",
        "/api/v1/jobs?page=99999999999999999999999",
        "/api/v1/deliveries?state=lost",
        "/api/v1/audit?limit=0",
    ],
)
def test_bad_input_is_a_400_with_a_message(shared: Env, path: str) -> None:
    answer = shared.call("GET", path)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/api/v1/jobs/abc/rerun", {}),
        ("POST", "/api/v1/jobs/0/rerun", {}),
        ("POST", "/api/v1/jobs/99999999999999999999999/rerun", {}),
        ("POST", "/api/v1/deliveries/1.5/resubmit", {}),
        ("POST", "/api/v1/rules/replay", {"json": {"count": 3}}),
        (
            "POST",
            "/api/v1/rules/replay",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
        ),
        ("POST", "/api/v1/rules/check", {"json": {"text": 5}}),
        ("POST", "/api/v1/users", {"json": {"name": "x"}}),
    ],
)
def test_bad_bodies_and_ids_are_400s(shared: Env, method: str, path: str, kwargs: Any) -> None:
    answer = shared.call(method, path, **kwargs)
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"]


def test_unknown_series_is_404_and_answers_carry_security_headers(shared: Env) -> None:
    answer = shared.call("GET", "/api/v1/series/1.2.3.4")
    assert answer.status_code == 404
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-store"


def test_openapi_lists_the_contract(shared: Env) -> None:
    paths = shared.client.get("/api/v1/openapi.json").json()["paths"]
    for path in (
        "/api/v1/series",
        "/api/v1/series/{series_uid}",
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}/rerun",
        "/api/v1/deliveries",
        "/api/v1/deliveries/{delivery_id}/resubmit",
        "/api/v1/destinations/{name}/echo",
        "/api/v1/rules/test",
        "/api/v1/models",
    ):
        assert path in paths, path


def test_metrics_token_when_configured(tmp_path: Path) -> None:
    env = make_env(tmp_path, metrics_token="scrape-me")
    assert env.client.get("/metrics").status_code == 401
    wrong = env.client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = env.client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert ok.status_code == 200 and "dicom_ai_instances_received_total 4.0" in ok.text


def test_the_audit_log_is_append_only(env: Env) -> None:
    env.call("POST", f"/api/v1/jobs/{env.failed_job}/rerun")
    db = sqlite3.connect(env.data_dir / "console.sqlite3")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE audit SET user = 'nobody'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM audit")
    finally:
        db.close()
    assert [e.action for e in env.accounts.audit_entries()] == ["job.rerun"]


def test_a_replay_that_backtracks_is_stopped_and_the_console_answers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_ai.web import console

    monkeypatch.setattr(console, "REPLAY_SECONDS", 3.0)
    # (\d|\d)+x on a 40-digit UID backtracks for hours; re holds the interpreter lock.
    evil = CT_RULES.replace(
        "match: {Modality: {equals: CT}}", r"match: {SeriesInstanceUID: {regex: '(\d|\d)+x'}}"
    )
    started = time.monotonic()
    answer = env.call("POST", "/api/v1/rules/replay", json={"text": evil, "count": 2})
    assert answer.status_code == 400, answer.text
    assert "took longer than 3 s" in answer.json()["detail"]
    assert time.monotonic() - started < 15
    assert env.client.get("/healthz").status_code == 200
    assert not [e for e in env.accounts.audit_entries() if e.action == "rules.replay"]


def test_a_failed_login_keeps_no_unknown_name(env: Env) -> None:
    """A name nobody has is often a password typed into the wrong field."""
    for name in ("admin", "correct horse battery"):
        with pytest.raises(Exception, match="wrong user name or password"):
            env.client.app.state.console.login(name, "wrong", "10.0.0.9")  # type: ignore[attr-defined]
    failed = [e.user for e in env.accounts.audit_entries() if e.action == "login.failed"]
    assert failed == ["admin", "(unknown)"]

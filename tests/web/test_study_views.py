"""The console's study views: the studies API and page, the dashboard's study tile, and
study jobs (roles, urgent) among the jobs. The index is a real one, its studies made and
decided through `Index` and routing/studies.py as the scheduler does; no instance file is
read, so none is written."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dicom_ai.config import Config
from dicom_ai.routing import parse_rules
from dicom_ai.routing.rules import Study
from dicom_ai.routing.studies import decide
from dicom_ai.store.index import Index, InstanceRecord, RunPlan, StudyClaim, StudyWait
from dicom_ai.web.accounts import Accounts
from dicom_ai.web.app import create_app

RULES = """
rules:
  - name: tumour
    match: {Modality: {equals: MR}}
    model: ct-body
    destinations: [pacs]
    study:
      reference: t1c
      deadline_seconds: 90
      roles:
        - {name: t1c, match: {SeriesDescription: {regex: "^T1C"}}}
        - {name: t1, match: {SeriesDescription: {regex: "^T1$"}}}
        - {name: flair, match: {SeriesDescription: {regex: "FLAIR"}}, required: false}
"""
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ROOT = "1.2.826.0.1.3680043.8.498.4242"
HTML = {"accept": "text/html"}


def _rule_study() -> Study:
    study = parse_rules(RULES).rules[0].study
    assert study is not None
    return study


STUDY = _rule_study()


def uid(*parts: int) -> str:
    return ".".join([ROOT, *map(str, parts)])


@dataclass
class Made:
    client: TestClient
    token: str
    viewer: str
    waiting: str  # study UIDs
    started: str
    failed: str
    elsewhere: str
    series: dict[str, str]  # "<study>/<role>" -> series UID
    started_job: int
    failed_job: int

    def get(self, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or self.token}", **kw.pop("headers", {})}
        return self.client.get(path, headers=headers, **kw)

    def studies(self, query: str = "") -> dict[str, dict[str, Any]]:
        answer = self.get(f"/api/v1/studies{query}")
        assert answer.status_code == 200, answer.text
        return {s["study_instance_uid"]: s for s in answer.json()["items"]}


def _series(index: Index, association: int, study: str, series: str, instances: int) -> None:
    for n in range(instances):
        index.add_instance(
            InstanceRecord(
                f"{series}.{n + 1}", MR_IMAGE, series, study, "MR", Path("/nowhere"), association
            )
        )


def _member(
    index: Index,
    association: int,
    study: str,
    series: str,
    roles: tuple[str, ...],
    urgent: bool = False,
    called_ae: str = "DICOM_AI",
    deadline_seconds: float = STUDY.deadline_seconds,
) -> None:
    """A series of ``study`` routed to the study rule (its run as the scheduler starts it)."""
    _series(index, association, study, series, 2)
    claim = StudyClaim(called_ae, roles, (), deadline_seconds)
    plan = RunPlan("tumour", "ct-body", ("pacs",), urgent=urgent, study=claim)
    index.start_run(series, [plan], "tumour: study member")


def _wait(index: Index, study: str, now: float) -> StudyWait:
    (found,) = [s for s in index.studies_to_decide(now) if s.study_instance_uid == study]
    return found


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    root = tmp_path_factory.mktemp("studies")
    rules = root / "rules.yaml"
    rules.write_text(RULES)
    data = root / "data"
    index = Index(data / "index.sqlite3")
    association = index.open_association("MR1", "DICOM_AI", "127.0.0.1")
    s = {}
    # Waiting: only T1 came; T1C (required) and FLAIR (optional) are missing.
    waiting = uid(1)
    s["w/t1"] = uid(1, 2)
    _member(index, association, waiting, s["w/t1"], ("t1",))
    # Started at its deadline without the optional FLAIR; urgent (the ED's T1C).
    started = uid(2)
    s["s/t1c"], s["s/t1"] = uid(2, 1), uid(2, 2)
    _member(index, association, started, s["s/t1c"], ("t1c",), urgent=True)
    _member(index, association, started, s["s/t1"], ("t1",))
    # Failed at its deadline: the required T1 never came.
    failed = uid(3)
    s["f/t1c"] = uid(3, 1)
    _member(index, association, failed, s["f/t1c"], ("t1c",))
    # Its rule belongs to a called AE the console does not know: no rule to ask.
    elsewhere = uid(4)
    s["e/t1"] = uid(4, 2)
    _member(index, association, elsewhere, s["e/t1"], ("t1",), False, "OTHER_AE", 60.0)
    index.close_association(association)

    now = time.time()
    study = _wait(index, waiting, now)
    decision = decide(STUDY, study.members, study.deadline_at, now, study.last_run)
    assert decision.action == "wait"
    index.settle_study(study, "waiting", decision.note)

    study = _wait(index, started, now)
    late = study.deadline_at + 1
    decision = decide(STUDY, study.members, study.deadline_at, late, study.last_run)
    assert decision.action == "start", decision
    roles = [(r, m.series_instance_uid if m else None) for r, m in decision.selection.chosen]
    started_job = index.start_study_run(
        study, roles, "t1c", "channels", decision.selection.key, decision.note
    )

    study = _wait(index, failed, now)
    decision = decide(STUDY, study.members, study.deadline_at, late, study.last_run)
    assert (decision.action, decision.note) == ("fail", "required role t1 missing")
    failed_job = index.settle_study(study, "failed", decision.note)
    assert failed_job is not None

    study = _wait(index, elsewhere, now)
    index.settle_study(study, "waiting", "waiting for t1c (required); deadline in 60 s")
    index.close()

    accounts = Accounts(data / "console.sqlite3")
    accounts.add_user("ada", "admin", "correct horse battery")
    accounts.add_user("vic", "viewer", "correct horse battery")
    config = Config.model_validate({"node": {"data_dir": str(data)}, "rules": str(rules)})
    app = create_app(config, accounts)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Made(
            client,
            accounts.new_token("ada"),
            accounts.new_token("vic"),
            waiting,
            started,
            failed,
            elsewhere,
            s,
            started_job,
            failed_job,
        )
    app.state.console.close()
    accounts.close()


def _text(page: str) -> str:
    """The page's text, tags and runs of white space dropped."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


# -- the API ----------------------------------------------------------------------------------


def test_a_waiting_study_shows_roles_found_missing_and_its_deadline(made: Made) -> None:
    studies = made.studies()
    assert list(studies) == [made.elsewhere, made.failed, made.started, made.waiting]
    w = studies[made.waiting]
    assert (w["state"], w["rule"], w["model"], w["runs"], w["urgent"]) == (
        "waiting",
        "tumour",
        "ct-body",
        0,
        False,
    )
    assert w["roles_from"] == "rule"
    assert w["roles_found"] == [{"role": "t1", "series_instance_uid": made.series["w/t1"]}]
    assert w["roles_missing"] == [
        {"role": "t1c", "required": True},
        {"role": "flair", "required": False},
    ]
    assert w["note"].startswith("waiting for t1c (required), flair (optional); deadline in ")
    assert w["deadline_at"] == pytest.approx(w["first_received"] + 90)
    assert 0 < w["deadline_in_seconds"] <= 90 and w["deadline_passed"] is False
    assert [m["series_instance_uid"] for m in w["members"]] == [made.series["w/t1"]]
    assert w["members"][0]["roles"] == ["t1"] and w["members"][0]["instances"] == 2
    assert w["jobs"] == []


def test_a_started_study_shows_its_jobs_roles_and_urgency(made: Made) -> None:
    st = made.studies()[made.started]
    assert (st["state"], st["runs"], st["urgent"], st["roles_from"]) == (
        "started",
        1,
        True,
        "last job",
    )
    assert st["roles_found"] == [
        {"role": "t1c", "series_instance_uid": made.series["s/t1c"]},
        {"role": "t1", "series_instance_uid": made.series["s/t1"]},
    ]
    assert st["roles_missing"] == [{"role": "flair", "required": False}]
    (job,) = st["jobs"]
    assert (job["id"], job["state"], job["priority"], job["urgent"]) == (
        made.started_job,
        "pending",
        1,
        True,
    )
    assert job["study_instance_uid"] == made.started
    assert job["series_instance_uid"] == made.series["s/t1c"]
    assert (job["reference_role"], job["role_input"]) == ("t1c", "channels")
    assert job["roles"] == [
        {"role": "t1c", "series_instance_uid": made.series["s/t1c"]},
        {"role": "t1", "series_instance_uid": made.series["s/t1"]},
        {"role": "flair", "series_instance_uid": None},
    ]


def test_a_failed_study_names_the_missing_role_and_its_failed_job(made: Made) -> None:
    f = made.studies("?state=failed")
    assert list(f) == [made.failed]
    study = f[made.failed]
    assert study["note"] == "required role t1 missing"
    assert study["roles_missing"] == [
        {"role": "t1", "required": True},
        {"role": "flair", "required": False},
    ]
    assert [(j["id"], j["state"], j["error"]) for j in study["jobs"]] == [
        (made.failed_job, "failed", "required role t1 missing")
    ]


def test_a_study_whose_rule_is_not_loaded_shows_its_series_roles_and_note(made: Made) -> None:
    e = made.studies("?state=waiting")[made.elsewhere]
    assert e["called_ae"] == "OTHER_AE" and e["roles_from"] == "members"
    assert e["roles_found"] == [{"role": "t1", "series_instance_uid": made.series["e/t1"]}]
    assert e["roles_missing"] is None
    assert e["note"] == "waiting for t1c (required); deadline in 60 s"


def test_jobs_list_study_and_series_jobs_alike(made: Made) -> None:
    jobs = {j["id"]: j for j in made.get("/api/v1/jobs").json()["items"]}
    assert set(jobs) == {made.started_job, made.failed_job}
    assert jobs[made.started_job]["urgent"] is True
    assert jobs[made.failed_job]["urgent"] is False and jobs[made.failed_job]["roles"] == []


def test_the_studies_api_reads_for_any_role_and_refuses_bad_input(made: Made) -> None:
    assert made.get("/api/v1/studies", made.viewer).status_code == 200
    assert made.client.get("/api/v1/studies").status_code == 401
    answer = made.get("/api/v1/studies?state=done")
    assert answer.status_code == 400
    assert "one of dropped, failed, overdue, started, waiting" in answer.text
    assert made.get("/api/v1/studies?per_page=0").status_code == 400
    paged = made.get("/api/v1/studies?per_page=1&page=2").json()
    assert (paged["total"], paged["pages"], len(paged["items"])) == (4, 4, 1)
    assert "/api/v1/studies" in made.get("/api/v1/openapi.json").json()["paths"]


def test_the_dashboard_counts_studies_by_state(made: Made) -> None:
    counts = made.get("/api/v1/dashboard").json()["studies"]
    assert counts == {"waiting": 2, "overdue": 0, "started": 1, "failed": 1, "dropped": 0}
    page = made.get("/", headers=HTML).text
    assert 'href="/studies" id="studies-tile"' in page
    assert re.search(r'id="studies-waiting">2<', page)
    assert re.search(r'id="studies-failed">1<', page)


# -- the pages --------------------------------------------------------------------------------


def _row(page: str, study: str) -> str:
    found = re.search(rf'<tr [^>]*data-study="{re.escape(study)}".*?</tr>', page, re.S)
    assert found, page
    return _text(found.group(0))


def test_the_studies_page_shows_roles_found_missing_and_the_deadline(made: Made) -> None:
    page = made.get("/studies", headers=HTML)
    assert page.status_code == 200
    assert '<a href="/studies" class="active"' in page.text  # in the nav
    assert 'data-live="/fragments/studies?page=1"' in page.text
    waiting = _row(page.text, made.waiting)
    assert f"t1 {made.series['w/t1']}" in waiting
    assert "t1c required" in waiting and "flair optional" in waiting
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d in \d+ s", waiting), waiting
    started = _row(page.text, made.started)
    assert "started urgent" in started and "1 run" in started
    assert f"t1c {made.series['s/t1c']}" in started and f"t1 {made.series['s/t1']}" in started
    assert "flair optional" in started and f"{made.started_job} pending urgent" in started
    failed = _row(page.text, made.failed)
    assert "t1 required" in failed and "required role t1 missing" in failed
    assert f"{made.failed_job} failed" in failed
    elsewhere = _row(page.text, made.elsewhere)
    assert "the rule is not loaded" in elsewhere and "waiting for t1c (required)" in elsewhere
    assert "deadline in 60 s" not in elsewhere  # the note's count, stale: the column counts


def test_the_studies_fragment_filters_by_state(made: Made) -> None:
    fragment = made.get("/fragments/studies?state=started", headers=HTML)
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert made.started in fragment.text and made.waiting not in fragment.text
    assert "1 study, page 1 of 1" in _text(fragment.text)
    bad = made.get("/studies?state=nonsense", headers=HTML)
    assert bad.status_code == 400 and "one of dropped, failed" in html.unescape(bad.text)


def test_a_series_page_shows_the_study_jobs_it_is_an_input_of(made: Made) -> None:
    for series, this in ((made.series["s/t1c"], "t1c"), (made.series["s/t1"], "t1")):
        page = made.get(f"/fragments/series/{series}", headers=HTML).text
        assert f'id="job-{made.started_job}"' in page, series
        roles = re.search(rf'id="job-{made.started_job}-roles">(.*?)</p>', page, re.S)
        assert roles, page
        text = _text(roles.group(1))
        assert f"{made.started} ), channels:" in text
        assert f"{this} " + ("(reference) " if this == "t1c" else "") + "this series" in text
        assert "flair missing" in text
    failures = made.get("/failures", headers=HTML).text
    assert f"{made.series['f/t1c']} study job" in _text(failures)
    # Failed for a missing role: nothing to rerun on (Index.rerun_job refuses it).
    assert f'id="rerun-{made.failed_job}"' not in failures
    assert "runs when the role's series comes" in html.unescape(failures)

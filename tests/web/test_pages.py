"""The console's pages through FastAPI's TestClient: logging in and its throttle, the
cookies' flags, CSRF on every form, what each role sees and may do, patient data only for
the roles that may see it, the security headers, and bad input answered as a page (never
a 500). The index is a real one with rows made through `Index`; the instance files are
real DICOM files, so the patient's name is read where the node would read it."""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from dicom_ai.config import Config
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from dicom_ai.web.accounts import Accounts
from dicom_ai.web.app import SESSION_COOKIE, create_app

PASSWORD = "correct horse battery"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
HTML = {"accept": "text/html,application/xhtml+xml"}


@dataclass
class Node:
    """What the index holds: a series whose job failed, one with a dead letter, one done."""

    config: Config
    accounts: Accounts
    failed: PhantomSpec
    dead: PhantomSpec
    done: PhantomSpec
    failed_job: int
    dead_delivery: int


def _add_series(index: Index, directory: Path, spec: PhantomSpec, association: int) -> None:
    for path in write_phantom_ct(directory, spec):
        from pydicom import dcmread

        ds = dcmread(path, stop_before_pixels=True)
        index.add_instance(
            InstanceRecord(
                str(ds.SOPInstanceUID),
                CT_IMAGE,
                spec.series_instance_uid,
                spec.study_instance_uid,
                "CT",
                path,
                association,
            )
        )


@dataclass(frozen=True)
class _Made:
    data: Path
    failed: PhantomSpec
    dead: PhantomSpec
    done: PhantomSpec
    failed_job: int
    dead_delivery: int


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> _Made:
    """The index, spool and accounts, made once; each test gets a copy (`node`)."""
    data = tmp_path_factory.mktemp("console") / "data"
    small = {"slices": 2, "rows": 16, "columns": 16}
    failed = PhantomSpec(**small, patient_name="DOE^JANE", patient_id="PID-FAILED")  # type: ignore[arg-type]
    dead = PhantomSpec(**small, patient_name="ROE^RICHARD", patient_id="PID-DEAD")  # type: ignore[arg-type]
    done = PhantomSpec(**small, patient_name="POE^EDGAR", patient_id="PID-DONE")  # type: ignore[arg-type]
    index = Index(data / "index.sqlite3")
    try:
        association = index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
        plan = [RunPlan("ct-body", "ct-body", ("pacs",))]
        for spec, name in ((failed, "failed"), (dead, "dead"), (done, "done")):
            _add_series(index, data / "spool" / name, spec, association)
            index.start_run(spec.series_instance_uid, plan, "ct-body: ct-body -> pacs")
        jobs = {j.series_instance_uid: j for j in index.claim_pending_jobs(3)}
        failed_job = jobs[failed.series_instance_uid].id
        index.fail_job(failed_job, "the worker process died (killed by signal SIGSEGV)", False)
        for spec in (dead, done):
            job = jobs[spec.series_instance_uid]
            index.finish_job(
                job.id, [data / "seg.dcm"], job.destinations, {"load": 0.2, "infer": 1.5}
            )
        by_job = {d.job_id: d for d in index.due_deliveries(2**40)}
        dead_delivery = by_job[jobs[dead.series_instance_uid].id].id
        index.delivery_failed(dead_delivery, "association rejected", None)
        index.delivery_succeeded(by_job[jobs[done.series_instance_uid].id].id)
    finally:
        index.close()
    accounts = Accounts(data / "console.sqlite3")
    for name, role in (("ada", "admin"), ("olga", "operator"), ("vic", "viewer")):
        accounts.add_user(name, role, PASSWORD)
    accounts.close()
    return _Made(data, failed, dead, done, failed_job, dead_delivery)


@pytest.fixture
def node(made: _Made, tmp_path: Path) -> Iterator[Node]:
    # The copied index names the instance files where `made` wrote them; they are only read.
    data = tmp_path / "data"
    shutil.copytree(made.data, data)
    config = Config.model_validate(
        {
            "node": {"data_dir": str(data)},
            "web": {"login_attempts": 3, "login_pause_seconds": 60},
        }
    )
    accounts = Accounts(data / "console.sqlite3")
    yield Node(
        config, accounts, made.failed, made.dead, made.done, made.failed_job, made.dead_delivery
    )
    accounts.close()


@pytest.fixture
def app_client(node: Node) -> Iterator[TestClient]:
    app = create_app(node.config, node.accounts)
    with TestClient(app, headers=HTML) as client:
        yield client
    app.state.console.close()


def _login_token(page: str) -> str:
    found = re.search(r'name="login_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def _post_login(client: TestClient, user: str, password: str) -> Response:
    form = client.get("/login")
    assert form.status_code == 200
    answer: Response = client.post(
        "/login",
        data={"user": user, "password": password, "login_token": _login_token(form.text)},
        follow_redirects=False,
    )
    return answer


def _login(client: TestClient, user: str) -> TestClient:
    answer = _post_login(client, user, PASSWORD)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/"
    return client


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def _detail(page: str) -> str:
    """The message of an error page, unescaped."""
    found = re.search(r'<p class="detail" id="error-detail">(.*?)</p>', page, re.S)
    assert found, page
    return html.unescape(found.group(1))


def _token_of(client: TestClient) -> str:
    return _csrf(client.get("/").text)


def _job_state(node: Node, job_id: int) -> str:
    index = Index(node.config.node.data_dir / "index.sqlite3")
    try:
        return index.job(job_id).state.value
    finally:
        index.close()


def _delivery_state(node: Node, delivery_id: int) -> str:
    index = Index(node.config.node.data_dir / "index.sqlite3")
    try:
        (delivery,) = [d for d in index.deliveries() if d.id == delivery_id]
        return delivery.state.value
    finally:
        index.close()


# -- logging in ------------------------------------------------------------------------------


def test_pages_ask_to_log_in(app_client: TestClient) -> None:
    for path in ("/", "/series", "/failures", "/rules", "/users", "/audit"):
        answer = app_client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        wanted = "/login" if path == "/" else f"/login?next={quote(path, safe='')}"
        assert answer.headers["location"] == wanted
    # A live refresh (no text/html in Accept) gets a plain 401 to act on, not a page.
    answer = app_client.get("/fragments/dashboard", headers={"accept": "*/*"})
    assert answer.status_code == 401
    assert answer.json() == {"detail": "log in, or send Authorization: Bearer TOKEN"}


def test_login_goes_back_to_the_page_asked_for_and_only_to_this_console(
    app_client: TestClient,
) -> None:
    asked = app_client.get("/series?modality=CT&page=1", follow_redirects=False)
    form = app_client.get(asked.headers["location"])
    assert 'name="next_page" value="/series?modality=CT&amp;page=1"' in form.text
    answer = app_client.post(
        "/login",
        data={
            "user": "olga",
            "password": PASSWORD,
            "login_token": _login_token(form.text),
            "next_page": "/series?modality=CT&page=1",
        },
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/series?modality=CT&page=1"
    app_client.cookies.clear()
    for elsewhere in ("//evil.example/x", "https://evil.example/", "/\\evil", "/login", "x"):
        form = app_client.get("/login", params={"next": elsewhere})
        answer = app_client.post(
            "/login",
            data={
                "user": "olga",
                "password": PASSWORD,
                "login_token": _login_token(form.text),
                "next_page": elsewhere,
            },
            follow_redirects=False,
        )
        assert answer.headers["location"] == "/", elsewhere
        app_client.cookies.clear()


def test_login_sets_a_strict_http_only_session_cookie(app_client: TestClient) -> None:
    answer = _post_login(app_client, "olga", PASSWORD)
    assert answer.status_code == 303
    (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)]
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "path", "max-age"} <= flags
    assert "samesite=strict" in cookie.lower()
    assert "secure" not in flags  # plain HTTP here
    assert "Path=/" in cookie
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))  # type: ignore[union-attr]
    assert 12 * 3600 - 60 <= max_age <= 12 * 3600
    page = app_client.get("/")
    assert page.status_code == 200
    assert 'id="current-user">olga<' in page.text
    assert 'id="current-role">operator<' in page.text


def test_cookies_are_secure_under_https(app_client: TestClient) -> None:
    app_client.app.state.secure_cookies = True  # type: ignore[attr-defined]
    https = TestClient(app_client.app, base_url="https://testserver", headers=HTML)
    form = https.get("/login")
    login_cookie = form.headers["set-cookie"]
    assert "secure" in login_cookie.lower() and "samesite=strict" in login_cookie.lower()
    answer = https.post(
        "/login",
        data={"user": "olga", "password": PASSWORD, "login_token": _login_token(form.text)},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)]
    assert "; secure" in cookie.lower() and "httponly" in cookie.lower()
    assert answer.headers["strict-transport-security"] == "max-age=31536000"


def test_a_wrong_password_is_refused_and_logins_pause(app_client: TestClient) -> None:
    answer = _post_login(app_client, "olga", "not the password")
    assert answer.status_code == 401
    assert "Wrong user name or password." in answer.text
    assert SESSION_COOKIE not in answer.headers.get("set-cookie", "")
    assert _post_login(app_client, "nobody", PASSWORD).status_code == 401
    assert _post_login(app_client, "olga", "").status_code == 401
    # web.login_attempts (3) failures from this address: even the right password waits.
    paused = _post_login(app_client, "olga", PASSWORD)
    assert paused.status_code == 429
    assert "too many failed logins; try again in 60 s" in paused.text
    assert SESSION_COOKIE not in paused.headers.get("set-cookie", "")
    assert app_client.get("/", follow_redirects=False).status_code == 303


def test_login_needs_the_token_of_its_form(app_client: TestClient) -> None:
    """A login posted from elsewhere (no form cookie, or another token) does not log in."""
    app_client.get("/login")
    answer = app_client.post(
        "/login",
        data={"user": "olga", "password": PASSWORD, "login_token": "forged"},
        follow_redirects=False,
    )
    assert answer.status_code == 403
    assert "The login form expired" in answer.text
    fresh = TestClient(app_client.app, headers=HTML)
    answer = fresh.post(
        "/login", data={"user": "olga", "password": PASSWORD}, follow_redirects=False
    )
    assert answer.status_code == 403


def test_logout_ends_the_session(app_client: TestClient, node: Node) -> None:
    _login(app_client, "olga")
    session_id = app_client.cookies[SESSION_COOKIE]
    refused = app_client.post("/logout", follow_redirects=False)
    assert refused.status_code == 403  # without the CSRF token
    answer = app_client.post(
        "/logout", data={"csrf_token": _token_of(app_client)}, follow_redirects=False
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?done=logout"
    assert node.accounts.session(session_id) is None
    assert app_client.get("/", follow_redirects=False).headers["location"] == "/login"
    assert "You are logged out." in app_client.get("/login?done=logout").text
    actions = [e.action for e in node.accounts.audit_entries()]
    assert actions == ["login", "logout"]


# -- CSRF and roles --------------------------------------------------------------------------


def test_a_form_post_needs_the_sessions_csrf_token(app_client: TestClient, node: Node) -> None:
    _login(app_client, "olga")
    url = f"/jobs/{node.failed_job}/rerun"
    for data in ({}, {"csrf_token": "wrong"}, {"csrf_token": ""}):
        answer = app_client.post(url, data=data, follow_redirects=False)
        assert answer.status_code == 403, data
        assert "missing or wrong CSRF token; reload the page" in answer.text
        assert 'id="error-detail"' in answer.text  # the error page, in the console's frame
    assert _job_state(node, node.failed_job) == "failed"
    page = app_client.get("/failures")
    assert f'id="rerun-{node.failed_job}"' in page.text
    answer = app_client.post(
        url, data={"csrf_token": _csrf(page.text), "back": "/failures"}, follow_redirects=False
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/failures?done=rerun"
    assert _job_state(node, node.failed_job) == "pending"
    assert "The job is queued to run again." in app_client.get("/failures?done=rerun").text
    # Rerunning it again is a conflict, shown as a page.
    again = app_client.post(url, data={"csrf_token": _csrf(page.text)}, follow_redirects=False)
    assert again.status_code == 409
    assert "only a failed job can be rerun" in again.text


def test_the_back_field_goes_only_to_console_pages(app_client: TestClient, node: Node) -> None:
    _login(app_client, "olga")
    token = _token_of(app_client)
    answer = app_client.post(
        f"/deliveries/{node.dead_delivery}/resubmit",
        data={"csrf_token": token, "back": "https://evil.example/"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/failures?done=resubmit"
    assert _delivery_state(node, node.dead_delivery) == "pending"


def test_a_resubmit_from_the_series_page_goes_back_there(
    app_client: TestClient, node: Node
) -> None:
    _login(app_client, "ada")
    uid = node.dead.series_instance_uid
    page = app_client.get(f"/series/{uid}")
    assert f'id="resubmit-{node.dead_delivery}"' in page.text
    answer = app_client.post(
        f"/deliveries/{node.dead_delivery}/resubmit",
        data={"csrf_token": _csrf(page.text), "back": f"/series/{uid}"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == f"/series/{uid}?done=resubmit"
    assert _delivery_state(node, node.dead_delivery) == "pending"


def test_discard_from_the_failures_page(app_client: TestClient, node: Node) -> None:
    _login(app_client, "ada")
    page = app_client.get("/failures")
    assert f'id="discard-{node.dead_delivery}"' in page.text
    answer = app_client.post(
        f"/deliveries/{node.dead_delivery}/discard",
        data={"csrf_token": _csrf(page.text), "back": "/failures"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/failures?done=discard"
    assert _delivery_state(node, node.dead_delivery) == "discarded"
    assert "its results may now be purged" in app_client.get("/failures?done=discard").text


def test_a_viewer_sees_no_action_and_may_not_act(app_client: TestClient, node: Node) -> None:
    _login(app_client, "vic")
    failures = app_client.get("/failures")
    assert failures.status_code == 200
    assert node.failed.series_instance_uid in failures.text  # the failure is listed
    assert "Rerun" not in failures.text and "Resubmit" not in failures.text
    assert "Discard" not in failures.text
    series = app_client.get(f"/series/{node.failed.series_instance_uid}")
    assert "Rerun" not in series.text
    assert "C-ECHO" not in app_client.get("/destinations").text
    token = _csrf(failures.text)  # the logout form's
    for url in (
        f"/jobs/{node.failed_job}/rerun",
        f"/deliveries/{node.dead_delivery}/resubmit",
        f"/deliveries/{node.dead_delivery}/discard",
        "/destinations/pacs/echo",
    ):
        answer = app_client.post(url, data={"csrf_token": token}, follow_redirects=False)
        assert answer.status_code == 403, url
        assert "role viewer may not do this (act)" in answer.text
    assert _job_state(node, node.failed_job) == "failed"
    assert _delivery_state(node, node.dead_delivery) == "dead"


def test_the_nav_shows_what_the_role_may_use(app_client: TestClient) -> None:
    _login(app_client, "olga")
    page = app_client.get("/").text
    for path in ("/series", "/failures", "/rules", "/models", "/destinations"):
        assert f'<a href="{path}"' in page
    assert '<a href="/users"' not in page and '<a href="/audit"' not in page
    for path in ("/users", "/audit"):
        answer = app_client.get(path)
        assert answer.status_code == 403, path
        assert "role operator may not do this (admin)" in answer.text
    token = _csrf(page)
    answer = app_client.post(
        "/users", data={"csrf_token": token, "name": "eve", "role": "admin", "password": "x" * 9}
    )
    assert answer.status_code == 403


def test_an_admin_manages_users_and_reads_the_audit_log(app_client: TestClient, node: Node) -> None:
    _login(app_client, "ada")
    page = app_client.get("/users")
    assert '<a href="/users"' in page.text and '<a href="/audit"' in page.text
    token = _csrf(page.text)
    weak = app_client.post(
        "/users", data={"csrf_token": token, "name": "eve", "role": "viewer", "password": "short"}
    )
    assert weak.status_code == 400
    assert "the password needs at least 8 characters" in weak.text
    added = app_client.post(
        "/users",
        data={"csrf_token": token, "name": "eve", "role": "viewer", "password": PASSWORD},
        follow_redirects=False,
    )
    assert added.headers["location"] == "/users?done=user-added"
    user = node.accounts.user("eve")
    assert user is not None and user.role.value == "viewer"
    removed = app_client.post(
        "/users/eve/remove", data={"csrf_token": token}, follow_redirects=False
    )
    assert removed.headers["location"] == "/users?done=user-removed"
    assert node.accounts.user("eve") is None
    myself = app_client.post("/users/ada/remove", data={"csrf_token": token})
    assert myself.status_code == 409
    audit = app_client.get("/audit").text
    for action in ("login", "user.add", "user.remove"):
        assert f"<code>{action}</code>" in audit


# -- patient data ----------------------------------------------------------------------------


def test_the_patient_is_shown_to_an_operator_not_to_a_viewer(
    app_client: TestClient, node: Node
) -> None:
    uid = node.done.series_instance_uid
    _login(app_client, "olga")
    page = app_client.get(f"/series/{uid}")
    assert page.status_code == 200
    assert 'id="patient-name">POE^EDGAR<' in page.text
    assert 'id="patient-id">PID-DONE<' in page.text
    views = [e for e in node.accounts.audit_entries() if e.action == "view.patient"]
    assert [(e.user, e.target) for e in views] == [("olga", uid)]
    # The live refresh of the page carries no patient data, and is not a view of it.
    fragment = app_client.get(f"/fragments/series/{uid}", headers={"accept": "*/*"})
    assert fragment.status_code == 200
    assert "POE" not in fragment.text and "PID-DONE" not in fragment.text
    assert 'class="state state-delivered delivery-state"' in fragment.text
    assert len([e for e in node.accounts.audit_entries() if e.action == "view.patient"]) == 1

    viewer = TestClient(app_client.app, headers=HTML)
    _login(viewer, "vic")
    page = viewer.get(f"/series/{uid}")
    assert page.status_code == 200
    assert uid in page.text
    assert "POE" not in page.text and "PID-DONE" not in page.text
    assert 'id="patient' not in page.text
    for path in ("/", "/series", "/failures"):
        text = viewer.get(path).text
        for phi in ("POE", "DOE", "ROE", "PID-"):
            assert phi not in text, (path, phi)


# -- what the pages show ---------------------------------------------------------------------


def test_the_dashboard_counts(app_client: TestClient) -> None:
    _login(app_client, "vic")
    page = app_client.get("/").text
    assert 'id="received-24h">6<' in page  # three series of two instances
    assert 'id="failed-jobs">1<' in page
    assert 'id="dead-letters">1<' in page
    assert 'id="queue-pending">0<' in page
    assert 'data-live="/fragments/dashboard"' in page
    assert '<td>ct-body</td><td class="num">1</td>' in page  # one latency sample
    fragment = app_client.get("/fragments/dashboard", headers={"accept": "*/*"})
    assert fragment.status_code == 200
    assert 'id="received-24h">6<' in fragment.text
    assert "<html" not in fragment.text


def test_the_series_list_filters_and_pages(app_client: TestClient, node: Node) -> None:
    _login(app_client, "vic")
    page = app_client.get("/series").text
    for spec in (node.failed, node.dead, node.done):
        assert f'href="/series/{spec.series_instance_uid}"' in page
    assert "3 series, page 1 of 1" in page
    assert "0 series" in app_client.get("/series?modality=MR").text
    assert "3 series" in app_client.get("/series?state=routed&modality=CT").text
    assert "0 series" in app_client.get("/series?state=pending").text
    assert "0 series" in app_client.get("/series?since=2999-01-01T00:00").text
    assert "3 series" in app_client.get("/series?since=2000-01-01T00:00").text
    page = app_client.get("/series?page=2")
    assert page.status_code == 200 and "No series" in page.text
    live = app_client.get("/fragments/series?modality=CT", headers={"accept": "*/*"})
    assert live.status_code == 200 and "3 series" in live.text


def test_the_series_page(app_client: TestClient, node: Node) -> None:
    _login(app_client, "olga")
    uid = node.failed.series_instance_uid
    page = app_client.get(f"/series/{uid}").text
    assert f'data-live="/fragments/series/{uid}"' in page
    assert 'id="series-instances">2<' in page
    assert "the worker process died (killed by signal SIGSEGV)" in page
    assert f'id="rerun-{node.failed_job}"' in page
    assert f'name="back" value="/series/{uid}"' in page
    done = app_client.get(f"/series/{node.done.series_instance_uid}").text
    assert "infer <strong>1.50 s</strong>" in done and "load <strong>0.20 s</strong>" in done
    assert 'class="state state-delivered delivery-state"' in done
    missing = app_client.get("/series/1.2.3.4")
    assert missing.status_code == 404 and "no series 1.2.3.4" in missing.text


def test_rules_check_test_and_replay(app_client: TestClient, node: Node) -> None:
    _login(app_client, "vic")
    page = app_client.get("/rules")
    assert page.status_code == 200
    assert "name: ct-body" in page.text  # the running file
    token = _csrf(page.text)

    candidate = (
        "rules:\n"
        "  - name: ct-to-brain\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: mr-brain\n"
        "    destinations: [pacs]\n"
    )
    checked = app_client.post("/rules/check", data={"csrf_token": token, "text": candidate})
    assert checked.status_code == 200
    assert 'id="check-result"' in checked.text and "Valid: 1 rule." in checked.text
    bad = app_client.post(
        "/rules/check",
        data={"csrf_token": token, "text": candidate.replace("mr-brain", "nope")},
    )
    assert bad.status_code == 400
    assert "candidate: rules name unknown model(s) nope" in bad.text
    assert "model: nope" in bad.text  # the edit is kept in the textarea

    replayed = app_client.post(
        "/rules/replay", data={"csrf_token": token, "text": candidate, "count": "10"}
    )
    assert replayed.status_code == 200, replayed.text
    assert 'id="replay-changed-count">3<' in replayed.text
    assert "ct-body: ct-body -&gt; pacs" in replayed.text
    assert "ct-to-brain: mr-brain -&gt; pacs" in replayed.text
    same = app_client.post(
        "/rules/replay", data={"csrf_token": token, "text": page_rules(page.text), "count": "2"}
    )
    assert 'id="replay-changed-count">0<' in same.text
    assert "Replayed 2 series" in same.text
    too_many = app_client.post(
        "/rules/replay", data={"csrf_token": token, "text": candidate, "count": "0"}
    )
    assert too_many.status_code == 400 and "count 0: between 1 and 1000" in too_many.text

    uid = node.done.series_instance_uid
    tested = app_client.post("/rules/test", data={"csrf_token": token, "series_instance_uid": uid})
    assert tested.status_code == 200, tested.text
    assert "routed by ct-body" in tested.text
    upload = next((node.config.node.data_dir / "spool" / "done").iterdir()).read_bytes()
    tested = app_client.post(
        "/rules/test",
        data={"csrf_token": token, "calling_ae": "CT_ER_1"},
        files={"file": ("slice.dcm", upload, "application/dicom")},
    )
    assert tested.status_code == 200, tested.text
    assert "the uploaded file: CT, sent by CT_ER_1" in tested.text
    junk = app_client.post(
        "/rules/test",
        data={"csrf_token": token},
        files={"file": ("junk.dcm", b"not dicom", "application/dicom")},
    )
    assert junk.status_code == 400 and "not a DICOM Part 10 file" in junk.text
    nothing = app_client.post("/rules/test", data={"csrf_token": token})
    assert nothing.status_code == 400 and "give a DICOM file or a series UID" in nothing.text


def page_rules(page: str) -> str:
    """The running rules as the page shows them in its <pre> (unescaped)."""
    found = re.search(r'<pre class="rules" id="running-1">(.*?)</pre>', page, re.S)
    assert found
    return html.unescape(found.group(1))


def test_models_and_destinations(app_client: TestClient) -> None:
    _login(app_client, "olga")
    models = app_client.get("/models").text
    assert 'id="model-ct-body"' in models and 'id="model-mr-brain"' in models
    assert "built in" in models
    page = app_client.get("/destinations")
    assert 'id="echo-pacs"' in page.text
    echoed = app_client.post("/destinations/pacs/echo", data={"csrf_token": _csrf(page.text)})
    assert echoed.status_code == 200
    assert 'id="echo-result"' in echoed.text and "no good answer" in echoed.text  # nothing there
    unknown = app_client.post("/destinations/nope/echo", data={"csrf_token": _csrf(page.text)})
    assert unknown.status_code == 404


# -- headers and bad input -------------------------------------------------------------------


def test_security_headers_on_pages(app_client: TestClient) -> None:
    for answer in (app_client.get("/login"), _login(app_client, "vic").get("/")):
        headers = answer.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "style-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store"
        # Nothing inline that the CSP would block.
        assert "<script>" not in answer.text and "style=" not in answer.text
        assert " on" + "click=" not in answer.text
    css = app_client.get("/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = app_client.get("/static/console.js")
    assert js.status_code == 200 and "data-live" not in js.headers.get("cache-control", "")


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/series/abc", 400, "series UID 'abc' is not a DICOM UID"),
        ("/series/1..2", 400, "is not a DICOM UID"),
        ("/series/" + "1" * 80, 400, "is not a DICOM UID"),
        ("/series?page=0", 400, "page 0: between 1 and"),
        ("/series?page=abc", 400, "page: Input should be a valid integer"),
        ("/series?page=-1", 400, "page -1: between 1 and"),
        ("/series?state=bogus", 400, "state 'bogus': one of pending, routed"),
        ("/series?modality=%3Cscript%3E", 400, "a DICOM modality such as CT or MR"),
        ("/series?since=yesterday", 400, "epoch seconds or ISO 8601"),
        ("/failures?jobs_page=0", 400, "page 0: between 1 and"),
        ("/failures?dead_page=x", 400, "Input should be a valid integer"),
        ("/audit?limit=0", 400, "limit 0: between 1 and 5000"),
        ("/audit?limit=many", 400, "Input should be a valid integer"),
        ("/fragments/series/abc", 400, "is not a DICOM UID"),
        ("/nowhere", 404, "Not Found"),
    ],
)
def test_bad_input_is_a_page_naming_it(
    app_client: TestClient, path: str, status: int, detail: str
) -> None:
    _login(app_client, "ada")
    answer = app_client.get(path)
    assert answer.status_code == status, answer.text
    assert detail in _detail(answer.text)
    assert answer.headers["content-type"].startswith("text/html")
    assert "<script>" not in answer.text  # what was sent is escaped
    assert 'id="current-user">ada<' in answer.text  # the page keeps the nav


def test_bad_form_input_is_refused(app_client: TestClient, node: Node) -> None:
    _login(app_client, "ada")
    token = _token_of(app_client)
    for url, data, status in (
        ("/jobs/abc/rerun", {"csrf_token": token}, 400),
        ("/jobs/999999/rerun", {"csrf_token": token}, 404),
        ("/deliveries/1e3/resubmit", {"csrf_token": token}, 400),
        ("/deliveries/999999/resubmit", {"csrf_token": token}, 404),
        ("/destinations/a%20b/echo", {"csrf_token": token}, 400),
        ("/rules/replay", {"csrf_token": token, "text": "rules: [", "count": "5"}, 400),
        ("/rules/replay", {"csrf_token": token, "text": "x", "count": "five"}, 400),
        ("/rules/test", {"csrf_token": token, "series_instance_uid": "x'; --"}, 400),
        (
            "/users",
            {"csrf_token": token, "name": "<b>", "role": "viewer", "password": PASSWORD},
            400,
        ),
        ("/users", {"csrf_token": token, "name": "bob", "role": "root", "password": PASSWORD}, 400),
        ("/users/nobody/remove", {"csrf_token": token}, 404),
        ("/login", {"user": "x" * 300, "password": "y"}, 400),
    ):
        answer = app_client.post(url, data=data, follow_redirects=False)
        assert answer.status_code == status, (url, data, answer.text)
        assert "<b>" not in answer.text


def test_no_page_answers_500(app_client: TestClient, node: Node) -> None:
    """Every page, for every role, with and without data in the query."""
    uids = [s.series_instance_uid for s in (node.failed, node.dead, node.done)]
    paths = [
        "/",
        "/series",
        "/series?page=1&state=routed&modality=CT&since=0",
        "/failures",
        "/failures?jobs_page=2&dead_page=2",
        "/rules",
        "/models",
        "/destinations",
        "/users",
        "/audit",
        "/audit?limit=5000",
        "/fragments/dashboard",
        "/fragments/failures",
        "/fragments/series",
        *[f"/series/{uid}" for uid in uids],
        *[f"/fragments/series/{uid}" for uid in uids],
        "/login",
    ]
    for user in ("ada", "olga", "vic"):
        client = _login(TestClient(app_client.app, headers=HTML), user)
        for path in paths:
            answer = client.get(path)
            assert answer.status_code in (200, 403), (user, path, answer.status_code)
            assert "internal error" not in answer.text

"""Attacks on the console, kept as regression tests: stored XSS, CSRF on every unsafe
route, token and session edge cases, login throttling, hostile input (huge, negative,
unicode, NUL, SQL, traversal, open redirects, oversized and malformed bodies), patient data
where it must not be, and the security headers on every kind of answer.

Built on `tests.web.test_api.make_env` (a real index and accounts database, TestClient);
each attack asserts an answer below 500 with a message, and that nothing changed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from dicom_ai.errors import NotAuthenticated, TooManyRequests
from dicom_ai.store.index import RunPlan
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from dicom_ai.web.accounts import Accounts
from dicom_ai.web.app import SESSION_COOKIE
from dicom_ai.web.console import MAX_UPLOAD
from dicom_ai.web.pages import LOGIN_COOKIE
from tests.web.test_api import CT_RULES, Env, _series, make_env

# A corpus of about 120 attacks (30 s): the full suite runs it, the inner loop does not.
pytestmark = pytest.mark.slow

HTML = {"accept": "text/html,application/xhtml+xml"}
# One payload per way out of a context: element text, a quoted attribute, a script tag.
XSS = {
    "script": "<script>alert('x')</script>",
    "attr": '"><img src=x onerror=alert(1)>',
    "svg": "<svg onload=alert(2)>",
}
HOSTILE_NAME = "'\"<b>EVIL^PATIENT</b>"  # also patient data: must show only where allowed
HOSTILE_PID = "PID-<i>666</i>"


# -- the environment: make_env, plus a series full of markup -----------------------------------


@dataclass
class Hostile:
    env: Env
    uid: str
    failed_job: int
    dead_delivery: int


def _add_hostile(env: Env) -> Hostile:
    """A series whose every stored string is markup: calling AE, series description,
    routing note, rule, model, destination, stage, errors, model checks; and a patient
    whose name and ID carry markup too."""
    index = env.index
    spec = PhantomSpec(
        slices=1,
        rows=16,
        columns=16,
        patient_name=HOSTILE_NAME,
        patient_id=HOSTILE_PID,
        series_description=XSS["script"],
    )
    paths = write_phantom_ct(env.data_dir / "spool" / "hostile", spec)
    association = index.open_association(XSS["attr"][:16], "DICOM_AI", "127.0.0.1")
    _series(index, paths, spec, association)
    index.close_association(association)
    plans = [
        RunPlan(XSS["attr"], XSS["script"], ("pacs",)),
        RunPlan("r2", XSS["svg"], (XSS["attr"],)),
        RunPlan("r3", XSS["script"], (XSS["svg"],)),
    ]
    failed, dead, delivered = index.start_run(spec.series_instance_uid, plans, XSS["script"])
    index.claim_pending_jobs(10)
    index.fail_job(failed, XSS["script"] + XSS["attr"], retry=False)
    index.finish_job(dead, [env.data_dir / "x.dcm"], (XSS["attr"],), {XSS["attr"]: 0.5})
    index.finish_job(delivered, [env.data_dir / "y.dcm"], (XSS["svg"],), {"load": 0.1})
    by_job = {d.job_id: d for d in index.deliveries()}
    index.delivery_failed(by_job[dead].id, XSS["script"], None)
    index.delivery_succeeded(by_job[delivered].id)
    index.record_model_check(XSS["script"], XSS["attr"], XSS["svg"])
    index.record_model_check("ct-body", XSS["attr"], XSS["script"])
    return Hostile(env, spec.series_instance_uid, failed, by_job[dead].id)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = make_env(tmp_path, login_attempts=3, login_pause_seconds=60)
    yield made
    made.client.app.state.console.close()  # type: ignore[attr-defined]
    made.index.close()
    made.accounts.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One env for the attacks that change nothing (refusals, bad input)."""
    made = make_env(tmp_path_factory.mktemp("shared"), login_attempts=3, login_pause_seconds=60)
    yield made
    made.client.app.state.console.close()  # type: ignore[attr-defined]
    made.index.close()
    made.accounts.close()


@pytest.fixture
def hostile(env: Env) -> Hostile:
    return _add_hostile(env)


def _login(env: Env, role: str, client: TestClient | None = None) -> TestClient:
    """A browser (HTML) client logged in as ``role`` through the login form."""
    browser = client or TestClient(env.client.app, headers=HTML)
    form = browser.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert token, form.text
    answer = browser.post(
        "/login",
        data={"user": role, "password": f"{role}-password", "login_token": token.group(1)},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return browser


def _csrf(client: TestClient) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text)
    assert found
    return found.group(1)


def _no_markup(text: str, page: bool) -> None:
    """Only the console's own script tag; no element or attribute from the data."""
    scripts = re.findall(r"<script[^>]*>", text)
    assert scripts == (['<script src="/static/console.js" defer>'] if page else []), scripts
    for raw in ("<img", "<svg onload", "<b>", "<i>", "onerror=alert(1)>"):
        assert raw not in text, raw


def _fine(answer: Response) -> None:
    """An answer a client can act on: below 500, a message, no traceback."""
    assert answer.status_code < 500, (answer.status_code, answer.text[:500])
    assert "Traceback" not in answer.text and 'File "' not in answer.text


# -- stored XSS ----------------------------------------------------------------------------


def test_stored_markup_is_escaped_on_every_page_and_fragment(hostile: Hostile) -> None:
    env = hostile.env
    # A failed login under a hostile user name: echoed into the form.
    browser = TestClient(env.client.app, headers=HTML)
    form = browser.get("/login").text
    token = re.search(r'name="login_token" value="([^"]+)"', form)
    assert token
    failed = browser.post(
        "/login",
        data={"user": XSS["attr"], "password": "x", "login_token": token.group(1)},
    )
    assert failed.status_code == 401
    _no_markup(failed.text, page=True)  # the name is echoed into value="..."
    assert 'value="&#34;&gt;&lt;img' in failed.text
    admin = _login(env, "admin")
    pages = [
        "/",
        "/series",
        f"/series/{hostile.uid}",
        "/failures",
        "/models",
        "/destinations",
        "/rules",
        "/users",
        "/audit",
    ]
    for path in pages:
        answer = admin.get(path)
        assert answer.status_code == 200, (path, answer.text)
        _no_markup(answer.text, page=True)
    for path in (
        "/fragments/dashboard",
        "/fragments/series",
        f"/fragments/series/{hostile.uid}",
        "/fragments/failures",
    ):
        answer = admin.get(path)
        assert answer.status_code == 200, path
        _no_markup(answer.text, page=False)
    detail = admin.get(f"/series/{hostile.uid}").text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in detail  # shown, escaped
    assert "EVIL^PATIENT" in detail  # the operator-level role sees the (escaped) patient
    failures = admin.get("/failures").text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in failures
    # A failed login under an unknown name keeps no name (it may be a mistyped password).
    audit = admin.get("/audit").text
    assert "&#34;&gt;&lt;img" not in audit and "(unknown)" in audit


def test_rules_results_escape_what_the_header_and_the_candidate_carry(hostile: Hostile) -> None:
    env = hostile.env
    # Running rules that quote the header's SeriesDescription (markup) in their reasons.
    rules = env.data_dir.parent / "rules.yaml"
    rules.write_text(
        CT_RULES.replace(
            "match: {Modality: {equals: CT}}",
            "match: {Modality: {equals: CT}, SeriesDescription: {exists: true}}",
        )
    )
    admin = _login(env, "admin")
    token = _csrf(admin)
    tested = admin.post(
        "/rules/test", data={"csrf_token": token, "series_instance_uid": hostile.uid}
    )
    assert tested.status_code == 200, tested.text
    assert "SeriesDescription is present" in tested.text
    _no_markup(tested.text, page=True)
    upload = next((env.data_dir / "spool" / "hostile").iterdir()).read_bytes()
    uploaded = admin.post(
        "/rules/test",
        data={"csrf_token": token, "calling_ae": "<b>x</b>"},
        files={"file": ("<img src=x onerror=alert(1)>.dcm", upload, "application/dicom")},
    )
    _fine(uploaded)
    _no_markup(uploaded.text, page=True)
    for text in (
        f"rules:\n  - name: '{XSS['attr']}'\n    model: ct-body\n",
        f"rules: [{XSS['script']}]",
        CT_RULES.replace("ct-body", XSS["svg"]),
        CT_RULES.replace("pacs", XSS["script"]),
    ):
        for action in ("check", "replay"):
            answer = admin.post(f"/rules/{action}", data={"csrf_token": token, "text": text})
            _fine(answer)
            assert answer.status_code == 400, (action, text, answer.text)
            _no_markup(answer.text, page=True)
    replayed = admin.post(
        "/rules/replay", data={"csrf_token": token, "text": CT_RULES.replace("ct-body", "mr-brain")}
    )
    assert replayed.status_code == 200
    _no_markup(replayed.text, page=True)


def test_error_pages_escape_what_the_request_carried(env: Env) -> None:
    admin = _login(env, "admin")
    for path in (
        "/series/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "/series?state=%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        "/series?since=%3Csvg%20onload%3Dalert(2)%3E",
        "/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        "/audit?limit=%3Cb%3E",
    ):
        answer = admin.get(path)
        assert 400 <= answer.status_code < 500, path
        _no_markup(answer.text, page=True)
    answer = env.call("GET", "/api/v1/series/%3Cscript%3E")
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_no_template_or_module_turns_escaping_off() -> None:
    web = Path(__file__).parents[2] / "dicom_ai" / "web"
    for path in [*web.glob("templates/*.html"), *web.glob("*.py")]:
        text = path.read_text()
        for unsafe in ("|safe", "| safe", "Markup(", "autoescape false", "autoescape=False"):
            assert unsafe not in text, (path.name, unsafe)
    script = (web / "static" / "console.js").read_text()
    # innerHTML only ever takes a fragment of this console, fetched same-origin.
    assert script.count("innerHTML") == 1
    assert 'credentials: "same-origin"' in script
    assert "eval(" not in script and "document.write" not in script


# -- CSRF ----------------------------------------------------------------------------------


def _unsafe_routes(env: Env) -> list[tuple[str, str]]:
    return [
        ("POST", "/logout"),
        ("POST", f"/jobs/{env.failed_job}/rerun"),
        ("POST", f"/deliveries/{env.dead_delivery}/resubmit"),
        ("POST", "/rules/check"),
        ("POST", "/rules/test"),
        ("POST", "/rules/replay"),
        ("POST", "/destinations/pacs/echo"),
        ("POST", "/users"),
        ("POST", "/users/viewer/remove"),
        ("POST", f"/api/v1/jobs/{env.failed_job}/rerun"),
        ("POST", f"/api/v1/deliveries/{env.dead_delivery}/resubmit"),
        ("POST", "/api/v1/destinations/pacs/echo"),
        ("POST", "/api/v1/rules/check"),
        ("POST", "/api/v1/rules/test"),
        ("POST", "/api/v1/rules/replay"),
        ("POST", "/api/v1/users"),
        ("DELETE", "/api/v1/users/viewer"),
    ]


def _forgeries(other_token: str) -> list[dict[str, Any]]:
    """What another site can make a browser send (and a few it cannot, refused anyway)."""
    new_user = {"name": "mallory", "role": "admin", "password": "long-enough-1"}
    return [
        {},
        {"data": {**new_user, "text": CT_RULES, "series_instance_uid": "1.2.3"}},
        {"data": {**new_user, "csrf_token": ""}},
        {"data": {**new_user, "csrf_token": other_token}},
        {"files": {"csrf_token": ("t.txt", b"x", "text/plain")}, "data": new_user},
        {"files": {"file": ("a.dcm", b"DICM", "application/dicom")}, "data": new_user},
        {"content": json.dumps(new_user), "headers": {"content-type": "text/plain"}},
        {"json": {**new_user, "text": CT_RULES, "csrf_token": other_token}},
        {"params": {"csrf_token": other_token}, "data": new_user},
        {"headers": {"x-csrf-token": other_token}, "data": new_user},
        {"headers": {"x-csrf-token": ""}, "data": new_user},
        {
            "content": b"csrf_token=x&name=mallory",
            "headers": {"content-type": "Application/X-WWW-Form-Urlencoded"},
        },
    ]


def test_every_unsafe_route_refuses_a_session_request_without_its_csrf_token(env: Env) -> None:
    admin = _login(env, "admin")
    other = _login(env, "operator")
    other_token = _csrf(other)  # a real token, of another session
    for method, path in _unsafe_routes(env):
        for forgery in _forgeries(other_token):
            answer = admin.request(method, path, follow_redirects=False, **forgery)
            assert answer.status_code in (400, 403), (method, path, forgery, answer.text)
            if answer.status_code == 400:  # a body the route cannot read: never acted on
                assert "CSRF" not in answer.text
    assert env.index.job(env.failed_job).state == "failed"
    assert [d.state.value for d in env.index.deliveries() if d.id == env.dead_delivery] == ["dead"]
    assert {u.name for u in env.accounts.users()} == {"viewer", "operator", "admin"}
    actions = {e.action for e in env.accounts.audit_entries()}
    assert actions <= {"login", "view.patient"}, actions
    assert admin.get("/", follow_redirects=False).status_code == 200  # not logged out
    # The session's own token works, in a form and in the header.
    token = _csrf(admin)
    ok = admin.post(f"/jobs/{env.failed_job}/rerun", data={"csrf_token": token})
    assert ok.status_code == 200 and env.index.job(env.failed_job).state == "pending"
    api = admin.post(
        f"/api/v1/deliveries/{env.dead_delivery}/resubmit", headers={"X-CSRF-Token": token}
    )
    assert api.status_code == 200


def test_csrf_holds_for_multipart_and_json_with_the_right_token(env: Env) -> None:
    admin = _login(env, "admin")
    token = _csrf(admin)
    dicom = next((env.data_dir / "spool" / "s0").iterdir()).read_bytes()
    answer = admin.post(
        "/api/v1/rules/test",
        data={"csrf_token": token},
        files={"file": ("ct.dcm", dicom, "application/dicom")},
    )
    assert answer.status_code == 200, answer.text
    checked = admin.post(
        "/api/v1/rules/check", json={"text": CT_RULES}, headers={"X-CSRF-Token": token}
    )
    assert checked.status_code == 200
    # The token in the JSON body is not read: only the header or a form field.
    refused = admin.post("/api/v1/rules/check", json={"text": CT_RULES, "csrf_token": token})
    assert refused.status_code == 403


def test_a_bearer_token_ignores_the_cookie_and_needs_no_csrf(env: Env) -> None:
    viewer = _login(env, "viewer")
    # A request with a token is the token's user, whatever session cookie rides along.
    answer = viewer.post(
        f"/api/v1/jobs/{env.failed_job}/rerun",
        headers={"Authorization": f"Bearer {env.tokens['operator']}"},
    )
    assert answer.status_code == 200
    wrong = viewer.post(
        f"/api/v1/deliveries/{env.dead_delivery}/resubmit",
        headers={"Authorization": "Bearer nope"},
    )
    assert wrong.status_code == 401  # not a fallback to the cookie


# -- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Bearer\t",
        "Basic dmlld2VyOnZpZXdlci1wYXNzd29yZA==",
        "Token {viewer}",
        "Bearer Bearer {viewer}",
        "Bearer {viewer} {viewer}",
        "Bearer {viewer}x",
        "Bearer {viewer_upper}",
        "Bearer " + "A" * 100_000,
        "Bearer dai_\u00e9\u00fc",
        "Bearer {viewer}\x00",
        "Bearer ' OR '1'='1",
        "Bearer %00",
    ],
)
def test_token_edge_cases_are_401s(shared: Env, value: str) -> None:
    token = shared.tokens["viewer"]
    header = value.format(viewer=token, viewer_upper=token.upper())
    raw = header.encode("latin-1", errors="replace")
    answer = shared.client.get("/api/v1/series", headers={"Authorization": raw})
    _fine(answer)
    assert answer.status_code == 401, (value[:40], answer.text)
    assert answer.headers["www-authenticate"] == "Bearer"


def test_token_scheme_and_spacing_that_are_fine(env: Env) -> None:
    for value in ("Bearer {t}", "bearer {t}", "BEARER {t}", "Bearer  {t} "):
        header = value.format(t=env.tokens["viewer"])
        assert env.client.get("/api/v1/series", headers={"Authorization": header}).is_success


def test_session_cookie_edge_cases(shared: Env) -> None:
    for value in ("", "x", "A" * 129, "A" * 10_000, "' OR 1=1 --", "\u00e9", "a;b", "%00"):
        cookie = f"{SESSION_COOKIE}={value}".encode("latin-1")
        answer = shared.client.get("/api/v1/series", headers={"cookie": cookie})
        assert answer.status_code == 401, value[:20]
    twice = f"{SESSION_COOKIE}=x; {SESSION_COOKIE}=y"
    assert shared.client.get("/api/v1/series", headers={"cookie": twice}).status_code == 401


def test_login_issues_a_new_session_id_never_the_one_the_browser_brought(env: Env) -> None:
    planted = "attacker-chosen-session-id"
    first = _login_answer(env, "operator", "operator-password", cookie=planted)
    issued = _session_cookie(first)
    assert issued and issued != planted
    attacker = TestClient(env.client.app)
    attacker.cookies.set(SESSION_COOKIE, planted)
    assert attacker.get("/api/v1/series").status_code == 401
    # Logging in again, with the session cookie one has, is a new session id too.
    again = _login_answer(env, "operator", "operator-password", cookie=issued)
    assert _session_cookie(again) not in (issued, planted)


def _session_cookie(answer: Response) -> str:
    assert answer.status_code == 303, answer.text
    for cookie in answer.headers.get_list("set-cookie"):
        if cookie.startswith(f"{SESSION_COOKIE}="):
            return cookie.split(";")[0].split("=", 1)[1]
    raise AssertionError("no session cookie")


def test_an_expired_session_is_refused(env: Env) -> None:
    short = Accounts(env.data_dir / "console.sqlite3", session_seconds=-1)
    try:
        user = short.user("admin")
        assert user is not None
        session_id, session = short.new_session(user)
    finally:
        short.close()
    client = TestClient(env.client.app)
    client.cookies.set(SESSION_COOKIE, session_id)
    assert client.get("/api/v1/series").status_code == 401
    refused = client.post("/api/v1/users", headers={"X-CSRF-Token": session.csrf_token})
    assert refused.status_code == 401
    page = TestClient(env.client.app, headers=HTML)
    page.cookies.set(SESSION_COOKIE, session_id)
    assert page.get("/series", follow_redirects=False).headers["location"].startswith("/login")


def test_a_removed_user_loses_sessions_and_tokens(env: Env) -> None:
    env.accounts.add_user("eve", "operator", "eve-password")
    token = env.accounts.new_token("eve")
    eve = _login(env, "eve")
    assert eve.get("/series").status_code == 200
    assert env.call("DELETE", "/api/v1/users/eve").status_code == 200
    assert eve.get("/series", follow_redirects=False).status_code == 303  # to /login
    assert (
        env.client.get("/api/v1/series", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )
    # Re-adding the name does not bring the old token or session back.
    env.accounts.add_user("eve", "admin", "eve-password-2")
    assert (
        env.client.get("/api/v1/series", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )
    assert eve.get("/users", follow_redirects=False).status_code == 303


def test_logging_out_ends_the_session_server_side(env: Env) -> None:
    admin = _login(env, "admin")
    stolen = admin.cookies.get(SESSION_COOKIE)
    assert admin.post("/logout", data={"csrf_token": _csrf(admin)}).status_code == 200
    replay = TestClient(env.client.app)
    replay.cookies.set(SESSION_COOKIE, stolen or "")
    assert replay.get("/api/v1/series").status_code == 401


def test_login_throttle_cannot_be_bypassed_by_case_space_or_address(env: Env) -> None:
    console = env.client.app.state.console  # type: ignore[attr-defined]
    for n in range(3):  # three failures for one name, each from another address
        with pytest.raises(NotAuthenticated):
            console.login("viewer", "wrong", f"10.0.0.{n}")
    with pytest.raises(TooManyRequests):  # the name is paused, wherever it comes from
        console.login("viewer", "viewer-password", "10.0.1.1")
    for n, name in enumerate(("VIEWER", "Viewer", " viewer", "viewer ", "viewer\n", "viewer\x00")):
        # Another spelling is another (unknown) user: it never opens the paused account.
        with pytest.raises(NotAuthenticated):
            console.login(name, "viewer-password", f"10.0.2.{n}")
    for n in range(3):  # an address is paused for every name
        with pytest.raises(NotAuthenticated):
            console.login(f"nobody{n}", "wrong", "10.0.3.1")
    with pytest.raises(TooManyRequests):
        console.login("operator", "operator-password", "10.0.3.1")
    session_id, _ = console.login("operator", "operator-password", "10.0.4.1")
    assert session_id


def test_parallel_logins_do_not_get_past_the_throttle(env: Env) -> None:
    """Attempts that start together must not all pass the check before any failure is
    counted: at most login_attempts passwords are checked per window."""
    console = env.client.app.state.console  # type: ignore[attr-defined]
    threads = 8
    start = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(n: int) -> None:
        start.wait()
        try:
            console.login("operator", f"guess-{n}", f"10.9.0.{n}")
            outcome = "in"
        except TooManyRequests:
            outcome = "paused"
        except NotAuthenticated:
            outcome = "checked"
        with lock:
            outcomes.append(outcome)

    workers = [threading.Thread(target=attempt, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert outcomes.count("in") == 0
    assert outcomes.count("checked") <= 3, outcomes


def test_unknown_and_known_names_cost_the_same_hash(env: Env, monkeypatch: Any) -> None:
    calls: list[str] = []
    real = env.accounts._hasher

    class Counting:
        def verify(self, stored: str, password: str) -> bool:
            calls.append(stored)
            return bool(real.verify(stored, password))

    monkeypatch.setattr(env.accounts, "_hasher", Counting())
    assert env.accounts.authenticate("no-such-user", "whatever-pw") is None
    assert env.accounts.authenticate("viewer", "whatever-pw") is None
    assert len(calls) == 2 and calls[0] != calls[1]
    assert calls[0].startswith("$argon2id$") and calls[1].startswith("$argon2id$")
    # And over HTTP both are the same answer.
    a = _login_answer(env, "no-such-user", "whatever-pw")
    b = _login_answer(env, "viewer", "whatever-pw")
    assert a.status_code == b.status_code == 401
    assert "Wrong user name or password." in a.text and "Wrong user name or password." in b.text


def _login_answer(
    env: Env, user: str, password: str, cookie: str | None = None, **form: str
) -> Response:
    browser = TestClient(env.client.app, headers=HTML, client=(f"10.7.{len(user)}.1", 1))
    page = browser.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token
    if cookie is not None:  # a session cookie the browser has (or was given) as it logs in
        browser.cookies.set(SESSION_COOKIE, cookie)
    answer: Response = browser.post(
        "/login",
        data={"user": user, "password": password, "login_token": token.group(1), **form},
        follow_redirects=False,
    )
    return answer


def test_user_names_with_control_characters_are_refused(env: Env) -> None:
    """A user name lands in logs and the audit log: no newline may sneak in at its end."""
    for name in ("eve\n", "eve\r\n", "eve\x00", "ev e", "\u00e9ve", "eve/../x", "", "e" * 65):
        answer = env.call(
            "POST", "/api/v1/users", json={"name": name, "role": "viewer", "password": "x" * 12}
        )
        assert answer.status_code == 400, (name, answer.text)
    assert {u.name for u in env.accounts.users()} == {"viewer", "operator", "admin"}


# -- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/series?page=99999999999999999999999999999999",
        "/api/v1/series?page=-99999999999",
        "/api/v1/series?per_page=-1",
        "/api/v1/series?page=%00",
        "/api/v1/series?page=1e3",
        "/api/v1/series?state=%00",
        "/api/v1/series?state=routed%27%20OR%201%3D1",
        "/api/v1/series?modality=CT%00",
        "/api/v1/series?modality=CT%0A",
        "/api/v1/series?modality=%E2%80%AE",
        "/api/v1/series?modality=" + "C" * 10_000,
        "/api/v1/series?since=%00",
        "/api/v1/series?since=9999-99-99",
        "/api/v1/series?since=" + "9" * 5000,
        "/api/v1/series?since=nan",
        "/api/v1/series?since=-inf",
        "/api/v1/series/1.2.3%00",
        "/api/v1/series/1.2.3%0A",
        "/api/v1/series/1.2.3'%20OR%20'1'='1",
        "/api/v1/series/%E2%91%A0.2",
        "/api/v1/series/" + "1" * 10_000,
        "/api/v1/jobs?state=failed%27--",
        "/api/v1/jobs?per_page=501",
        "/api/v1/deliveries?page=0",
        "/api/v1/audit?limit=-1",
        "/api/v1/audit?limit=5001",
        "/api/v1/audit?limit=99999999999999999999999",
    ],
)
def test_hostile_query_and_path_values_are_400s(shared: Env, path: str) -> None:
    answer = shared.call("GET", path)
    _fine(answer)
    assert answer.status_code == 400, (path[:80], answer.text)
    assert answer.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/series/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/series?since=-1e308",
        "/api/v1/series?since=0001-01-01T00:00:00",
        "/api/v1/series?since=9999-12-31T23:59:59%2B14:00",
        "/api/v1/series?since=0001-01-01T00:00:00-23:59",
        "/api/v1/series?page=10000000&per_page=500",
        "/api/v1/series/1.2.3.4.5",
        "/api/v1/users/%00",
        "/api/v1/destinations",
    ],
)
def test_odd_but_valid_values_never_500(shared: Env, path: str) -> None:
    answer = shared.call("GET", path)
    _fine(answer)


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/api/v1/jobs/-1/rerun", {}),
        ("POST", "/api/v1/jobs/%00/rerun", {}),
        ("POST", "/api/v1/jobs/9223372036854775808/rerun", {}),
        ("POST", "/api/v1/deliveries/0x10/resubmit", {}),
        ("POST", "/api/v1/destinations/..%2F..%2Fetc/echo", {}),
        ("POST", "/api/v1/destinations/..%5C..%5Cwin/echo", {}),
        ("POST", "/api/v1/destinations/pacs%0A/echo", {}),
        ("POST", "/api/v1/destinations/..../echo", {}),
        ("POST", "/api/v1/destinations/%E2%80%AEpacs/echo", {}),
        ("DELETE", "/api/v1/users/..%2F..%2Fadmin", {}),
        ("DELETE", "/api/v1/users/admin%00", {}),
        ("DELETE", "/api/v1/users/%27%20OR%20%271%27%3D%271", {}),
        ("POST", "/api/v1/rules/replay", {"json": {"text": CT_RULES, "count": 10**30}}),
        ("POST", "/api/v1/rules/replay", {"json": {"text": CT_RULES, "count": -1}}),
        ("POST", "/api/v1/rules/replay", {"json": {"text": CT_RULES, "called_ae": "\x00"}}),
        ("POST", "/api/v1/rules/replay", {"json": {"text": CT_RULES, "called_ae": "X" * 9999}}),
        ("POST", "/api/v1/rules/check", {"json": {"text": "\x00"}}),
        ("POST", "/api/v1/rules/check", {"json": {"text": "rules: " + "[" * 5000}}),
        ("POST", "/api/v1/rules/check", {"json": {"text": "a" * ((1 << 20) + 1)}}),
        ("POST", "/api/v1/rules/check", {"json": {"text": "!!python/object:os.system x"}}),
        ("POST", "/api/v1/rules/check", {"json": ["not", "an", "object"]}),
        (
            "POST",
            "/api/v1/rules/check",
            {"content": "[" * 100_000, "headers": {"content-type": "application/json"}},
        ),
        (
            "POST",
            "/api/v1/rules/check",
            {
                "content": '{"text": ' + "9" * 5000 + "}",
                "headers": {"content-type": "application/json"},
            },
        ),
        (
            "POST",
            "/api/v1/rules/check",
            {"content": b'{"text": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        ),
        ("POST", "/api/v1/users", {"json": {"name": "x", "role": "viewer", "password": 5}}),
        ("POST", "/api/v1/users", {"json": {"name": "x", "role": "\x00", "password": "x" * 9}}),
        ("POST", "/api/v1/rules/test", {"data": {"series_instance_uid": "1.2.3'--"}}),
        ("POST", "/api/v1/rules/test", {"data": {"series_instance_uid": "1.2.3.999"}}),
        (
            "POST",
            "/api/v1/rules/test",
            {"data": {"called_ae": "NOPE\x00"}, "files": {"file": ("a", b"x", "x/y")}},
        ),
    ],
)
def test_hostile_bodies_and_ids_are_4xx_with_a_message(
    shared: Env, method: str, path: str, kwargs: Any
) -> None:
    answer = shared.call(method, path, **kwargs)
    _fine(answer)
    assert 400 <= answer.status_code < 500, (path, answer.text[:300])
    assert answer.json()["detail"]


def test_a_dicom_upload_with_hostile_calling_ae_is_refused(shared: Env) -> None:
    dicom = next((shared.data_dir / "spool" / "s0").iterdir()).read_bytes()
    for ae in ("CT\n", "CT\\X", "\x00", "A" * 17, "\u00c4"):
        answer = shared.call(
            "POST",
            "/api/v1/rules/test",
            files={"file": ("ct.dcm", dicom, "application/dicom")},
            data={"calling_ae": ae},
        )
        assert answer.status_code == 400, (ae, answer.text)


def test_a_yaml_alias_bomb_is_refused_quickly(env: Env) -> None:
    lines = ["x0: &a0 {Modality: {equals: CT}}"]
    for n in range(1, 7):
        lines.append(f"x{n}: &a{n} {{any: [{', '.join([f'*a{n - 1}'] * 10)}]}}")
    bomb = "\n".join(lines) + "\nrules:\n  - name: r\n    match: *a6\n    model: null\n"
    started = time.monotonic()
    for path in ("/api/v1/rules/check", "/api/v1/rules/replay"):
        answer = env.call("POST", path, "viewer", json={"text": bomb})
        assert answer.status_code == 400, answer.text
        assert "alias" in answer.json()["detail"]
    assert time.monotonic() - started < 5


def test_redirect_targets_stay_on_this_console(env: Env) -> None:
    hostile = [
        "//evil.example/",
        "///evil.example/",
        "/\\evil.example/",
        "\\\\evil.example/",
        "/\t/evil.example/",
        "/\n/evil.example/",
        "https://evil.example/",
        "javascript:alert(1)",
        "/login?next=//evil.example",
        " //evil.example",
        "/\x00/evil.example",
    ]
    for target in hostile:
        answer = _login_answer(env, "admin", "admin-password", next_page=target)
        assert answer.status_code == 303, (target, answer.text)
        assert answer.headers["location"] == "/", (target, answer.headers["location"])
    # Percent-encoded slashes are a path on this console, not another host.
    encoded = _login_answer(env, "admin", "admin-password", next_page="/%2F%2Fevil.example")
    assert encoded.headers["location"] == "/%2F%2Fevil.example"
    too_long = _login_answer(env, "admin", "admin-password", next_page="/" + "a" * 2000)
    assert too_long.status_code == 400
    # GET /login?next=... when logged in goes there at once: the same rule.
    admin = _login(env, "admin")
    for target in [*hostile, "/" + "a" * 2000]:
        answer = admin.get("/login", params={"next": target}, follow_redirects=False)
        assert answer.status_code == 303
        assert not answer.headers["location"].startswith(("//", "/\\"))
        assert not re.search(r"[\x00-\x20\\]", answer.headers["location"])


def test_back_fields_only_name_console_pages(env: Env) -> None:
    admin = _login(env, "admin")
    token = _csrf(admin)
    for back in (
        "/failures\n",
        "/failures\nLocation: https://evil.example",
        "//evil.example",
        "/series/1.2.3/../../../evil",
        "/series/1.2\r\n",
        "https://evil.example/failures",
    ):
        answer = admin.post(
            f"/jobs/{env.failed_job}/rerun",
            data={"csrf_token": token, "back": back},
            follow_redirects=False,
        )
        if answer.status_code == 409:  # the job was rerun by an earlier round
            continue
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/failures?done=rerun", (back, answer.headers)


def test_oversized_bodies_are_refused_before_they_are_read(env: Env) -> None:
    big = {"text": "a" * (5 << 20)}
    # Without credentials, the body is not taken in: 413 (not read, then 401).
    assert env.call("POST", "/api/v1/rules/check", role=None, json=big).status_code == 413
    assert env.call("POST", "/api/v1/rules/check", json=big).status_code == 413
    answer = env.call("POST", "/api/v1/rules/check", json=big)
    assert answer.json()["detail"] and answer.headers["content-security-policy"]
    # A declared length over the limit is refused without waiting for the body.
    declared = env.call(
        "POST",
        "/api/v1/rules/test",
        role=None,
        content=b"x" * 10,
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(1 << 40)},
    )
    assert declared.status_code == 413
    # A body with no declared length (chunked) is counted as it comes.
    chunks = (b"a" * (1 << 20) for _ in range(6))
    streamed = env.call(
        "POST", "/api/v1/rules/check", content=chunks, headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    # The upload route allows a DICOM file up to MAX_UPLOAD.
    upload = env.call(
        "POST",
        "/api/v1/rules/test",
        files={"file": ("big.dcm", b"\0" * (6 << 20), "application/dicom")},
    )
    assert upload.status_code == 400 and "not a DICOM" in upload.json()["detail"]
    assert MAX_UPLOAD >= 6 << 20
    # The page form too, and as a page; and a form the CSRF check reads first.
    admin = _login(env, "admin")
    multipart = admin.post(
        f"/jobs/{env.failed_job}/rerun",
        data={"csrf_token": _csrf(admin)},
        files={"f": ("f", b"\0" * (5 << 20), "x/y")},
    )
    assert multipart.status_code == 413 and env.index.job(env.failed_job).state == "failed"
    page = admin.post("/rules/check", data={"csrf_token": _csrf(admin), "text": "a" * (5 << 20)})
    assert page.status_code == 413 and "text/html" in page.headers["content-type"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),
        ("multipart/form-data; boundary=", b"--\r\n"),
        ("multipart/form-data; boundary=b", b"garbage without boundaries"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="f'),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nDICM',
        ),
        (
            "multipart/form-data; boundary=b",
            b"".join(
                b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % n
                for n in range(1500)
            )
            + b"--b--\r\n",
        ),
        ("application/x-www-form-urlencoded", b"%%%&&&==\xff\xfe"),
        ("application/x-www-form-urlencoded", b"series_instance_uid=%00"),
    ],
)
def test_malformed_multipart_and_forms_are_4xx(shared: Env, content_type: str, body: bytes) -> None:
    answer = shared.call(
        "POST", "/api/v1/rules/test", content=body, headers={"content-type": content_type}
    )
    _fine(answer)
    assert 400 <= answer.status_code < 500, answer.text
    # Through a session (the CSRF check reads the form first) and as a page.
    admin = _login(shared, "admin")
    for path in ("/rules/test", f"/jobs/{shared.failed_job}/rerun", "/api/v1/rules/test"):
        answer = admin.post(path, content=body, headers={"content-type": content_type})
        _fine(answer)
        assert 400 <= answer.status_code < 500, (path, answer.text[:300])
    assert shared.index.job(shared.failed_job).state == "failed"


def test_static_files_do_not_leave_their_folder(shared: Env) -> None:
    for path in (
        "/static/../app.py",
        "/static/..%2Fapp.py",
        "/static/%2e%2e/app.py",
        "/static/..%5Capp.py",
        "/static/%00",
        "/static/console.js%00.py",
    ):
        answer = shared.client.get(path)
        assert answer.status_code in (400, 404), (path, answer.status_code)
        assert "create_app" not in answer.text


def test_a_bug_is_a_500_without_a_traceback(env: Env, monkeypatch: Any) -> None:
    console = env.client.app.state.console  # type: ignore[attr-defined]

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("secret internals /etc/shadow")

    monkeypatch.setattr(console.view, "dashboard", broken)
    answer = env.call("GET", "/api/v1/dashboard")
    assert answer.status_code == 500
    assert "secret internals" not in answer.text and "Traceback" not in answer.text
    assert answer.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    page = _login(env, "admin").get("/")
    assert page.status_code == 500 and "secret internals" not in page.text


# -- patient data ----------------------------------------------------------------------------


PATIENT = ("PHANTOM^CT", "PHANTOM-0001", "EVIL^PATIENT", "PID-")


def _has_patient(text: str) -> bool:
    return any(p in text for p in PATIENT)


def test_no_patient_data_in_lists_fragments_or_api_for_any_role(hostile: Hostile) -> None:
    env = hostile.env
    api = [
        "/api/v1/series",
        "/api/v1/series?per_page=500",
        "/api/v1/jobs",
        "/api/v1/deliveries",
        "/api/v1/dashboard",
        "/api/v1/models",
        "/api/v1/rules",
        "/metrics",
        "/healthz",
    ]
    pages = ["/", "/series", "/failures", "/models", "/destinations", "/rules"]
    fragments = [
        "/fragments/dashboard",
        "/fragments/series",
        "/fragments/failures",
        f"/fragments/series/{hostile.uid}",
        f"/fragments/series/{env.ct_series}",
    ]
    for role in ("viewer", "operator", "admin"):
        for path in api:
            answer = env.call("GET", path, role)
            assert answer.status_code == 200 and not _has_patient(answer.text), (role, path)
        browser = _login(env, role)
        for path in pages + fragments:
            answer = browser.get(path)
            assert answer.status_code == 200 and not _has_patient(answer.text), (role, path)
    audit = env.call("GET", "/api/v1/audit?limit=5000").text
    assert not _has_patient(audit)
    assert all(e.action != "view.patient" for e in env.accounts.audit_entries())
    for event in env.index.events_after(0, 1000):  # what webhooks send
        assert not _has_patient(json.dumps(event.body)), event


def test_patient_data_only_for_roles_that_may_and_every_view_audited(hostile: Hostile) -> None:
    env = hostile.env
    for role, sees in (("viewer", False), ("operator", True), ("admin", True)):
        before = len([e for e in env.accounts.audit_entries() if e.action == "view.patient"])
        answer = env.call("GET", f"/api/v1/series/{hostile.uid}", role)
        assert _has_patient(answer.text) is sees, role
        page = _login(env, role).get(f"/series/{hostile.uid}")
        assert _has_patient(page.text) is sees, role
        views = [e for e in env.accounts.audit_entries() if e.action == "view.patient"]
        assert len(views) - before == (2 if sees else 0), role
        assert all(e.target == hostile.uid and not _has_patient(str(e.detail)) for e in views)
    assert not _has_patient(env.call("GET", "/api/v1/audit").text)


def test_a_viewer_cannot_query_patient_data_through_a_replay(hostile: Hostile) -> None:
    """A candidate that matches on the patient's name or ID, replayed over the received
    series, says which series match: an oracle for patient data. Only a role that may see
    patient data may replay one (and the replay is audited)."""
    env = hostile.env
    oracle = CT_RULES.replace(
        "match: {Modality: {equals: CT}}",
        "match: {Modality: {equals: CT}, PatientName: {regex: '^EVIL'}}",
    )
    nested = CT_RULES.replace(
        "match: {Modality: {equals: CT}}",
        "match: {any: [{not: {PatientBirthDate: {gt: 19700101}}}]}",
    )
    for text in (oracle, nested):
        refused = env.call("POST", "/api/v1/rules/replay", "viewer", json={"text": text})
        assert refused.status_code == 403, refused.text
        assert "patient" in refused.json()["detail"]
        browser = _login(env, "viewer")
        page = browser.post("/rules/replay", data={"csrf_token": _csrf(browser), "text": text})
        assert page.status_code == 403
        assert not _has_patient(page.text)
    allowed = env.call("POST", "/api/v1/rules/replay", "operator", json={"text": oracle})
    assert allowed.status_code == 200
    (entry,) = [e for e in env.accounts.audit_entries() if e.action == "rules.replay"]
    assert entry.user == "operator" and entry.detail.get("patient") is True
    # Checking such a candidate reads no series: any role may.
    assert env.call("POST", "/api/v1/rules/check", "viewer", json={"text": oracle}).is_success


def test_no_patient_data_in_logs(hostile: Hostile, caplog: pytest.LogCaptureFixture) -> None:
    env = hostile.env
    caplog.set_level(logging.DEBUG)
    env.call("GET", f"/api/v1/series/{hostile.uid}", "operator")
    env.call("GET", f"/api/v1/series/{env.ct_series}", "admin")
    _login(env, "operator").get(f"/series/{hostile.uid}")
    _login_answer(env, "EVIL^PATIENT", "PHANTOM-0001")  # typed into the wrong field
    env.call("POST", "/api/v1/rules/test", "operator", data={"series_instance_uid": hostile.uid})
    env.call("POST", "/api/v1/rules/replay", "operator", json={"text": CT_RULES})
    env.call("POST", f"/api/v1/jobs/{hostile.failed_job}/rerun", "operator")
    env.call("POST", f"/api/v1/deliveries/{hostile.dead_delivery}/resubmit", "operator")
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            assert not _has_patient(record.getMessage()), record.getMessage()


# -- headers and cookies ---------------------------------------------------------------------


def _secure_headers(answer: Response, cache: bool = True) -> None:
    csp = answer.headers["content-security-policy"]
    for part in ("default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"):
        assert part in csp, (answer.url, csp)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    if cache:
        assert answer.headers["cache-control"] == "no-store", answer.url


def test_every_kind_of_answer_carries_the_security_headers(env: Env) -> None:
    admin = _login(env, "admin")
    for answer in (
        admin.get("/"),
        admin.get("/series/abc"),  # 400 page
        admin.get("/nowhere"),  # 404 page
        admin.post("/jobs/1/rerun"),  # 403: no CSRF token
        env.call("GET", "/api/v1/series"),
        env.call("GET", "/api/v1/series", role=None),  # 401
        env.call("PUT", "/api/v1/series"),  # 405
        env.call("POST", "/api/v1/rules/check", json={"text": "a" * (5 << 20)}),  # 413
        env.client.get("/healthz"),
        env.client.get("/metrics"),
        env.client.get("/api/v1/openapi.json"),
        TestClient(env.client.app, headers=HTML).get("/login"),
        TestClient(env.client.app, headers=HTML).get("/series", follow_redirects=False),
    ):
        _secure_headers(answer)
    _secure_headers(env.client.get("/static/console.js"), cache=False)


def test_cookies_are_http_only_strict_and_scoped(env: Env) -> None:
    browser = TestClient(env.client.app, headers=HTML)
    form = browser.get("/login")
    (login_cookie,) = form.headers.get_list("set-cookie")
    assert login_cookie.startswith(f"{LOGIN_COOKIE}=")
    lowered = login_cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/login" in lowered
    answer = _login_answer(env, "admin", "admin-password")
    (session,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)]
    lowered = session.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    assert "domain=" not in lowered  # host-only

"""The console in a real browser (Debian's Chromium, headless, through chromedriver) against
a real node: DCMTK's storescu sends, DCMTK storescp is the PACS and, once it comes up, the
archive.

One node for the module, with what an operator meets in a day: a CT series that went
through ct-body (its SEG and SR at the PACS; the copy for the archive, which was down, a
dead letter after its one attempt), and a series whose model crashes its worker (a failed
job). Users are made with ``dicom-ai users add``. Each test logs in and works the pages as
an operator would: the dashboard after the series went through, the failed job rerun from
its page, the dead letter resubmitted from the failures page once the archive is up, and a
rules edit replayed against the series received. Screenshots of each step go to
``tests/artifacts/console/`` (tests/web/browser.py); the browser's console must stay free
of errors (a CSP violation would show there).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.failing_models import make_crashing_bundle
from tests.peers import NodeProcess, StoreSCP, free_port, node_config, storescu, wait_until
from tests.web.browser import Browser

pytestmark = [pytest.mark.browser, pytest.mark.dcmtk, pytest.mark.slow]

PASSWORD = "a long enough password"
SETTLE_TIMEOUT = 300  # a busy 2-core machine: worker start, ct-body, a crash, deliveries

RULES = """\
rules:
  - name: crashing
    priority: 20
    match: {SeriesDescription: {equals: Crash me}}
    model: crashing
    destinations: [pacs]
  - name: ct-body
    priority: 10
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs, archive]
"""

# The edit to replay: the crashing rule gone, so its series would go to ct-body.
CANDIDATE = """\
rules:
  - name: ct-body
    priority: 10
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs, archive]
"""


@dataclass
class Site:
    node: NodeProcess
    pacs: StoreSCP
    archive: StoreSCP  # not started until a test brings it up
    good: PhantomSpec
    crash: PhantomSpec
    instances: int
    url: str


def _add_user(node: NodeProcess, name: str, role: str) -> None:
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_ai.cli",
            "users",
            "add",
            name,
            "--role",
            role,
            "--config",
            str(node.config_path),
        ],
        input=f"{PASSWORD}\n{PASSWORD}\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert f"user {name} added ({role})" in added.stdout


def _one(node: NodeProcess, sql: str, *args: object) -> tuple[object, ...]:
    rows = node.index_rows(sql, *args)
    assert len(rows) == 1, rows
    return rows[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console-browser")
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # the crashing worker writes no core
    good = PhantomSpec(slices=16, rows=128, columns=128, pixel_spacing_mm=3.125)
    crash = PhantomSpec(
        slices=4, rows=16, columns=16, series_description="Crash me", patient_name="CRASH^ME"
    )
    good_paths = write_phantom_ct(tmp / "good", good)
    crash_paths = write_phantom_ct(tmp / "crash", crash)
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    web_port = free_port()
    pacs = StoreSCP(tmp / "pacs").start()
    archive = StoreSCP(tmp / "archive", ae_title="ARCHIVE")  # down for now
    config = node_config(
        tmp / "node",
        pacs.port,
        rules,
        {"crashing": {"bundle": str(make_crashing_bundle(tmp / "bundles")), "device": "cpu"}},
        destinations={
            "archive": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}
        },
        pipeline={"max_job_attempts": 1},
        delivery={"max_attempts": 1},
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
    )
    node = NodeProcess(tmp / "node", config)
    try:
        node.start()
        for name, role in (("ada", "admin"), ("olga", "operator"), ("vic", "viewer")):
            _add_user(node, name, role)
        for paths in (good_paths, crash_paths):
            sent = storescu(node.port, paths)
            assert sent.returncode == 0, sent.stdout + sent.stderr

        def settled() -> bool:
            jobs = node.index_rows("SELECT state FROM jobs")
            deliveries = node.index_rows("SELECT destination, state FROM deliveries")
            return sorted(s for (s,) in jobs) == ["done", "failed"] and sorted(deliveries) == [
                ("archive", "dead"),
                ("pacs", "delivered"),
            ]

        wait_until(settled, SETTLE_TIMEOUT, "a job done, a job failed, a dead letter", 0.5)
        assert len(pacs.files()) == 2  # SEG and SR
        yield Site(
            node,
            pacs,
            archive,
            good,
            crash,
            len(good_paths) + len(crash_paths),
            f"http://127.0.0.1:{web_port}",
        )
    finally:
        node.stop()
        archive.stop()
        pacs.stop()
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    log = node.log_text()
    for phi in (good.patient_name, good.patient_id, crash.patient_name):
        assert phi not in log, f"{phi} in the node's log"


@pytest.fixture
def browser(site: Site) -> Iterator[Browser]:
    chromium = Browser(site.url)
    try:
        yield chromium
        assert chromium.problems() == [], "the browser's console logged errors"
    finally:
        chromium.close()


def test_login(site: Site, browser: Browser) -> None:
    browser.open("/")
    assert browser.path == "/login"  # not logged in: sent to the login page
    browser.fill("#user", "olga")
    browser.fill("#password", "not the password")
    browser.allow("/login", 401)
    browser.submit("#login")
    assert browser.text("#login-error") == "Wrong user name or password."
    browser.screenshot("01-login-refused")
    browser.fill("#user", "olga")
    browser.fill("#password", PASSWORD)
    browser.submit("#login")
    assert browser.path == "/"
    assert browser.text("#current-user") == "olga"
    assert browser.text("#current-role") == "operator"
    cookie = browser.driver.get_cookie("dicom_ai_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The nav shows what an operator may use, and no more.
    nav = [a.text for a in browser.find_all("header nav a")]
    assert nav == ["Dashboard", "Series", "Studies", "Failures", "Rules", "Models", "Destinations"]
    browser.submit("#logout")
    assert browser.path == "/login"  # ?done=logout, said once, then dropped from the URL
    assert browser.text("#flash") == "You are logged out."


def test_dashboard_after_a_series_went_through(site: Site, browser: Browser) -> None:
    browser.login("vic", PASSWORD)
    assert browser.path == "/"
    assert browser.text("#received-24h") == str(site.instances)
    assert browser.text("#failed-jobs") == "1"
    assert browser.text("#queue-pending") == "0"
    latency = browser.text("#latency")
    assert "ct-body" in latency and " s" in latency  # one result delivered: p50 = p95
    bars = browser.find_all("svg.chart rect.bar")
    assert len(bars) == 24
    assert max(int(b.get_attribute("height") or 0) for b in bars) == 120  # the hour received
    # The dashboard is live: its refresh comes round and says so.
    browser.wait(lambda: browser.text("#live-status").startswith("live ·"), 15, "a live refresh")
    browser.screenshot("02-dashboard")
    browser.open("/series")
    assert site.good.series_instance_uid in browser.text("#series-table")
    browser.screenshot("03-series-list")
    # A viewer sees the series but not the patient, and no action.
    browser.open(f"/series/{site.good.series_instance_uid}")
    assert site.good.patient_name not in browser.page_text()
    assert not browser.has("button.rerun, button.resubmit")
    browser.screenshot("04-series-as-viewer")
    browser.open("/models")
    assert "crashing" in browser.text("#models") and "built in" in browser.text("#models")
    browser.screenshot("04b-models")


def test_a_failed_job_rerun_from_its_page(site: Site, browser: Browser) -> None:
    uid = site.crash.series_instance_uid
    job_id, attempts = _one(
        site.node, "SELECT id, attempts FROM jobs WHERE series_instance_uid = ?", uid
    )
    assert attempts == 1
    crash_line = f"job {job_id} (crashing on series {uid}) failed"
    assert site.node.log_text().count(crash_line) == 1

    browser.login("olga", PASSWORD)
    browser.open("/failures")
    assert browser.has(f"#failed-job-{job_id}")
    browser.click(f"#failed-job-{job_id} a")  # to the series' page
    browser.wait_loaded()
    assert browser.path == f"/series/{uid}"
    assert browser.text("#patient-name") == "CRASH^ME"  # an operator may see it
    job = f"#job-{job_id}"
    assert browser.text(f"{job} .job-state") == "failed"
    assert "killed by signal SIGSEGV" in browser.text(job)
    browser.screenshot("05-failed-job")

    browser.submit(f"#rerun-{job_id}")
    assert browser.path == f"/series/{uid}"
    assert browser.text("#flash") == "The job is queued to run again."
    assert browser.text(f"{job} .job-state") in ("pending", "running")
    browser.screenshot("06-job-rerun")
    # The same page, not reloaded, follows the job as it runs again and fails again.
    browser.wait(
        lambda: browser.text(f"{job} .job-state") == "failed", SETTLE_TIMEOUT, "the rerun to end"
    )
    assert "killed by signal SIGSEGV" in browser.text(job)
    browser.screenshot("07-job-failed-again")
    assert site.node.log_text().count(crash_line) == 2  # it ran again
    assert _one(site.node, "SELECT state, attempts FROM jobs WHERE id = ?", job_id) == (
        "failed",
        1,
    )


def test_a_dead_letter_resubmitted(site: Site, browser: Browser) -> None:
    (delivery_id,) = _one(site.node, "SELECT id FROM deliveries WHERE state = 'dead'")
    browser.login("olga", PASSWORD)
    browser.open("/destinations")
    browser.submit("#echo-archive")  # the archive is down
    assert "no good answer" in browser.text("#echo-result")
    browser.screenshot("08-echo-archive-down")

    site.archive.start()
    browser.submit("#echo-archive")
    assert "answered" in browser.text("#echo-result")
    assert "C-ECHO answered 0x0000" in browser.text("#echo-result")
    browser.screenshot("09-echo-archive-up")

    browser.open("/failures")
    row = f"#dead-letter-{delivery_id}"
    assert "archive" in browser.text(row)
    browser.screenshot("10-failures")
    browser.submit(f"#resubmit-{delivery_id}")
    assert browser.path == "/failures"
    assert browser.text("#flash") == "The delivery is queued to go out again."
    # The failures page, live, drops the dead letter once it went out.
    browser.wait(lambda: not browser.has(row), 60, "the dead letter to leave the page")
    assert "No dead letters." in browser.text("#failures")
    browser.screenshot("11-dead-letter-resubmitted")
    wait_until(lambda: len(site.archive.files()) == 2, 30, "SEG and SR at the archive")
    # storescp writes the files before the node has its responses and records them.
    wait_until(
        lambda: (
            _one(site.node, "SELECT state FROM deliveries WHERE id = ?", delivery_id)
            == ("delivered",)
        ),
        30,
        "the delivery recorded as delivered",
    )
    browser.open(f"/series/{site.good.series_instance_uid}")
    states = [e.text for e in browser.find_all(".delivery-state")]
    assert states == ["delivered", "delivered"]
    browser.screenshot("12-series-delivered")


def test_rules_replay(site: Site, browser: Browser) -> None:
    browser.login("vic", PASSWORD)
    browser.open("/rules")
    assert "name: crashing" in browser.text("#running-1")
    browser.set_value("#candidate", CANDIDATE.replace("ct-body\n    priority", "ct-body\n    prio"))
    browser.allow("/rules/check", 400)
    browser.submit("#check")
    assert "unknown field 'prio'; did you mean 'priority'?" in browser.text("#rules-error")
    browser.screenshot("13-rules-check-refused")

    browser.set_value("#candidate", CANDIDATE)
    browser.submit("#check")
    assert browser.text("#check-result") == "Valid: 1 rule."
    browser.fill("#replay-count", "10")
    browser.submit("#replay")
    assert browser.text("#replay-changed-count") == "1"
    changed = browser.text("#replay-changed")
    assert site.crash.series_instance_uid in changed
    assert site.good.series_instance_uid not in changed
    assert "crashing: crashing -> pacs" in changed
    assert "ct-body: ct-body -> pacs, archive" in changed
    assert "Replayed 2 series" in browser.text("#replay-result")
    browser.screenshot("14-rules-replay")

    browser.fill("#test-series-uid", site.good.series_instance_uid)
    browser.submit("#test-series")
    assert "routed by ct-body" in browser.text("#test-result")
    browser.screenshot("15-rules-test")


def test_an_admin_manages_users_and_reads_the_audit_log(site: Site, browser: Browser) -> None:
    browser.login("ada", PASSWORD)
    nav = [a.text for a in browser.find_all("header nav a")]
    assert nav[-2:] == ["Users", "Audit log"]
    browser.open("/users")
    browser.fill("#add-user-form input[name=name]", "nina")
    browser.find("#add-user-form select[name=role]").send_keys("operator")
    browser.fill("#add-user-form input[name=password]", PASSWORD)
    browser.submit("#add-user-form button")
    assert browser.text("#flash") == "The user was added."
    assert "operator" in browser.text("#user-nina")
    browser.screenshot("16-users")
    browser.open("/audit")
    audit = browser.text("#audit")
    assert "user.add" in audit and "nina" in audit
    assert "login" in audit
    assert site.good.patient_name not in audit and site.crash.patient_name not in audit
    browser.screenshot("17-audit-log")

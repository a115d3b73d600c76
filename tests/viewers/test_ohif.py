"""OHIF Viewer shows the node's results: the SEG overlays the CT with every segment, the SR
opens and its measurements panel lists each finding with its value, and neither loader
logs an error.

The viewer is the prebuilt ``@ohif/app`` 3.13.2 from npm (``./install.sh``), served with
Orthanc's DICOMweb on one origin (tests/viewers/ohif.py says how), driven in Debian's
chromium by puppeteer-core (drive_ohif.mjs). The study is a small phantom CT through the
built-in ct-body model, with its SEG and SR as the node builds them and a detection SR of one
box. Screenshots of each step, the driver's results.json and its log go to
``tests/artifacts/ohif/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.viewers.ohif import Finding, OhifSite, ResultsStudy, make_results_study, run_driver

pytestmark = [pytest.mark.browser, pytest.mark.orthanc, pytest.mark.slow]

DRIVER_TIMEOUT = 300  # three page loads on SwiftShader, on a busy 2-core machine
MIN_OVERLAY_PIXELS = 200  # of a segment's colour, on the slice its row jumps to
VALUE_TOLERANCE = 0.01  # relative: OHIF rounds (60323.49 mm2 shows as "60323 mm²")

# Every console error fails the test, as do page errors, HTTP errors and a render crash
# (OHIF logs its error boundary at debug level, so that is matched by text). Ignored: a
# request OHIF cancels itself when a viewport changes what it shows (prefetch, thumbnails).
IGNORED_FAILURES = ("net::ERR_ABORTED",)
CRASH = re.compile(r"Error Boundary|Something went wrong", re.IGNORECASE)
# What OHIF's SR code says of a report it cannot load (console log and warn).
SR_VERDICT = re.compile(
    r"rehydratable|tool state|tracked measurements|SCOORD|not currently supported", re.IGNORECASE
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> ResultsStudy:
    return make_results_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def shown(study: ResultsStudy, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What OHIF showed and logged, per scenario (drive_ohif.mjs's results.json)."""
    site = OhifSite(tmp_path_factory.mktemp("ohif"))
    try:
        site.start()
        site.orthanc.upload(study.files)
        return run_driver(site.url, study, DRIVER_TIMEOUT)
    finally:
        site.stop()


def _scenario(shown: dict[str, Any], name: str) -> dict[str, Any]:
    scenario: dict[str, Any] = shown["scenarios"][name]
    assert "error" not in scenario, f"driving the {name} scenario failed:\n{scenario['error']}"
    return scenario


def _numbers(texts: list[str]) -> list[float]:
    return [float(n.replace(",", "")) for t in texts for n in NUMBER.findall(t)]


def _shows_value(finding: Finding, details: list[str]) -> bool:
    shown = _numbers(details)
    return any(
        abs(number - m.value) <= VALUE_TOLERANCE * abs(m.value)
        for m in finding.measurements
        for number in shown
    )


def _what_ohif_shows(scenario: dict[str, Any]) -> str:
    return (
        f"hydration prompt answered: {scenario.get('prompted')}\n"
        f"measurements panel: {scenario.get('panelText', '').strip()!r}\n"
        f"rows: {scenario.get('rows')}\n"
        f"drawn on the image: {scenario.get('viewportTexts')}\n"
        f"toasts: {scenario.get('toasts')}\n"
        f"OHIF's SR code says: {_verdict(scenario)}\n"
        f"waited in vain for: {scenario.get('waitError')}\n"
        f"screenshots: {[step['screenshot'] for step in scenario.get('steps', [])]}"
    )


def _verdict(scenario: dict[str, Any]) -> list[str]:
    texts = [m["text"] for m in scenario.get("console", [])]
    return list(dict.fromkeys(t for t in texts if SR_VERDICT.search(t)))


def _problems(scenario: dict[str, Any]) -> list[str]:
    problems = [f"page error: {e}" for e in scenario.get("pageErrors", [])]
    for message in scenario.get("console", []):
        text = message["text"]
        if message["type"] == "error" or CRASH.search(text):
            problems.append(f"console {message['type']}: {text} ({message['url']})")
    for failure in scenario.get("failedRequests", []):
        if failure["error"] not in IGNORED_FAILURES:
            problems.append(f"request failed: {failure['url']} {failure['error']}")
    problems += [f"HTTP {e['status']}: {e['url']}" for e in scenario.get("httpErrors", [])]
    if scenario.get("errorBoundary"):
        problems.append("the page shows OHIF's 'Something went wrong'")
    return problems


def test_seg_overlays_the_ct_with_every_segment(shown: dict[str, Any], study: ResultsStudy) -> None:
    seg = _scenario(shown, "seg")
    # The pixel count means something only if the CT alone has no colour.
    assert seg["before"]["coloured"] < MIN_OVERLAY_PIXELS, seg["before"]
    assert seg["prompted"], "OHIF did not offer to open the SEG"
    labels = [f.label for f in study.findings]
    assert [row["title"] for row in seg["rows"]] == labels, seg["rows"]
    assert all(row["color"] for row in seg["rows"]), seg["rows"]
    faint = {s["title"]: s["pixels"] for s in seg["segments"] if s["pixels"] < MIN_OVERLAY_PIXELS}
    assert not faint, f"segments not drawn over the CT (pixels of their colour): {faint}"


def test_sr_measurements_panel_lists_each_finding_with_its_value(
    shown: dict[str, Any], study: ResultsStudy
) -> None:
    sr = _scenario(shown, "sr")
    assert all(f.measurements for f in study.findings), study.findings
    missing = []
    for finding in study.findings:
        names = {finding.label.casefold(), finding.meaning.casefold()}
        rows = [r for r in sr["rows"] if r["title"].casefold() in names]
        if not any(_shows_value(finding, r["details"]) for r in rows):
            values = ", ".join(f"{m.concept} {m.value:g} {m.unit}" for m in finding.measurements)
            missing.append(f"{finding.meaning} ({values})")
    assert not missing, (
        f"the measurements panel does not list {'; '.join(missing)}.\n{_what_ohif_shows(sr)}"
    )


@pytest.mark.parametrize("name", ["seg", "sr", "detectionSr"])
def test_no_console_error_from_the_loaders(shown: dict[str, Any], name: str) -> None:
    scenario = _scenario(shown, name)
    problems = _problems(scenario)
    assert not problems, "\n".join(problems)


def test_detection_sr_box_becomes_a_tracked_rectangle(shown: dict[str, Any]) -> None:
    # A 5-point outline is hydrated as a rectangle: OHIF lists it by its finding type and
    # computes its area (the box's 30 mm x 20 mm cross-section) from the coordinates.
    detection = _scenario(shown, "detectionSr")
    rows = [r for r in detection["rows"] if r["title"].casefold() == "lung nodule"]
    assert rows, f"the detection is not listed.\n{_what_ohif_shows(detection)}"
    areas = [
        float(number.replace(",", ""))
        for detail in rows[0]["details"]
        if "mm" in detail
        for number in NUMBER.findall(detail)
    ]
    assert areas and abs(areas[0] - 600.0) <= 600.0 * VALUE_TOLERANCE, rows


def test_screenshots_are_written(shown: dict[str, Any]) -> None:
    shots = [
        Path(step["screenshot"])
        for scenario in shown["scenarios"].values()
        for step in scenario.get("steps", [])
    ]
    names = {p.name for p in shots}
    assert {"01-viewer.png", "02-seg.png", "04-sr-measurements.png"} <= names, names
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in shots), shots

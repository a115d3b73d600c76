"""OHIF Viewer over Orthanc's DICOMweb on one origin, for tests/viewers/test_ohif.py.

The viewer is the prebuilt app of the npm package ``@ohif/app`` (its ``npm install`` cannot
work here, the packed tarball's ``dist/`` needs none of it), unpacked by ``./install.sh``
into ``.venv/ohif/dist``. That build assumes the root path: its index.html loads
``/app.bundle.*.js`` and ``/app-config.js``, and its router needs ``index.html`` for
``/viewer?...``. Orthanc's ServeFolders serves files under a sub-path and has no such
fallback, so the one origin is a small front here instead, with what is in .venv for the
node's console already: Starlette under uvicorn serves the app (any other path gets
index.html), answers ``/app-config.js`` with a config pointing at ``/dicom-web`` on the same
origin, and streams ``/dicom-web/*`` to Orthanc through httpx.

    python -m tests.viewers.ohif --port P --orthanc http://127.0.0.1:Q   # the front alone

The study the test shows is made here too: a small phantom CT through the built-in ct-body
model, and its SEG and SR as the node builds them, with a 3-D detection SR beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tests.markers import uses
from tests.peers import REPO, Orthanc, free_port, port_open, stop_process, wait_until

__all__ = [
    "ARTIFACTS",
    "DRIVER",
    "OHIF_DIST",
    "OhifSite",
    "ResultsStudy",
    "make_results_study",
]

OHIF_VERSION = "3.13.2"
VIEWERS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
OHIF_DIST = REPO / ".venv" / "ohif" / "dist"
DRIVER = VIEWERS / "drive_ohif.mjs"
ARTIFACTS = Path(os.environ.get("DICOM_AI_ARTIFACTS", REPO / "tests" / "artifacts")) / "ohif"

# The data source of OHIF's docs for a local Orthanc (platform/app/public/config/
# local_orthanc.js), rooted at this origin; thumbnails by WADO-RS frames, as Orthanc's
# plugin has no /thumbnail.
APP_CONFIG = """\
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'Orthanc (test)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""

# Hop-by-hop headers (RFC 9110 7.6.1) and those the front sets again itself.
_DROP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host")
)


# -- the front: app and DICOMweb on one origin ---------------------------------------------


def create_app(dist: Path, orthanc_url: str) -> Any:
    """The Starlette app of the front (module-level imports stay light for pytest)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.types import Scope

    client = httpx.AsyncClient(base_url=orthanc_url, timeout=120)
    # Passed through as the browser asked, not added: the body goes on as Orthanc sent it.
    del client.headers["accept-encoding"]

    class AppFiles(StaticFiles):
        """The built app; any path that is not one of its files is a route of its router."""

        async def get_response(self, path: str, scope: Scope) -> Response:
            try:
                return await super().get_response(path, scope)
            except HTTPException as exc:
                if exc.status_code != 404:
                    raise
                return await super().get_response("index.html", scope)

    async def proxy(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        upstream = client.build_request(
            request.method,
            request.url.path,
            params=request.url.query,
            headers=headers,
            content=await request.body(),
        )
        answer = await client.send(upstream, stream=True)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP}
        return StreamingResponse(body(), status_code=answer.status_code, headers=kept)

    async def app_config(_: Request) -> Response:
        return Response(APP_CONFIG, media_type="text/javascript")

    methods = ["GET", "HEAD", "POST"]
    return Starlette(
        routes=[
            Route("/app-config.js", app_config),
            Route("/dicom-web/{rest:path}", proxy, methods=methods),
            Route("/wado", proxy, methods=methods),  # WADO-URI, the config's wadoUriRoot
            Mount("/", AppFiles(directory=dist)),
        ]
    )


def serve(dist: Path, orthanc_url: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(dist, orthanc_url), host="127.0.0.1", port=port, log_level="warning")


class OhifSite:
    """Orthanc with DICOMweb behind the front, on ephemeral ports; ``url`` is the origin."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.orthanc = Orthanc(workdir / "orthanc", dicomweb=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "front.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifSite:
        if not (OHIF_DIST / "index.html").is_file():
            raise FileNotFoundError(f"{OHIF_DIST}: no OHIF app; run ./install.sh")
        self.orthanc.start()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.viewers.ohif",
                "--port",
                str(self.port),
                "--orthanc",
                self.orthanc.url,
                "--dist",
                str(OHIF_DIST),
            ],
            cwd=REPO,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: port_open(self.port) or proc.poll() is not None, 30, "the front")
        if proc.poll() is not None:
            raise RuntimeError(f"the OHIF front exited: {self.log.read_text()}")
        return self

    def stop(self) -> None:
        try:
            if self.proc is not None:
                stop_process(self.proc)
                self.proc = None
        finally:
            self.orthanc.stop()


# -- the study: a phantom CT and the node's results for it ---------------------------------


@dataclass(frozen=True)
class Measurement:
    concept: str  # e.g. "Volume", "Area"
    value: float
    unit: str  # UCUM, e.g. "ml", "mm2"


@dataclass(frozen=True)
class Finding:
    """One segment as the SEG labels it and the SR reports it."""

    label: str  # Segment Label
    meaning: str  # the finding's code meaning (Segmented Property Type)
    measurements: tuple[Measurement, ...]  # every NUM of its groups in the SR


@dataclass(frozen=True)
class ResultsStudy:
    study_uid: str
    ct: list[Path]
    seg: Path
    sr: Path
    detection_sr: Path
    findings: tuple[Finding, ...]
    descriptions: dict[str, str]  # Series Description of "seg", "sr", "detection_sr"

    @property
    def files(self) -> list[Path]:
        return [*self.ct, self.seg, self.sr, self.detection_sr]


def make_results_study(directory: Path) -> ResultsStudy:
    """40 slices of 256 x 256 through ct-body: SEG and SR as the worker makes them
    (`dicom_ai.pipeline.worker._segmentation_results`), and a detection SR of one box."""
    from pydicom import dcmread

    from dicom_ai.inference.builtin.ct_body import CTBodyModel
    from dicom_ai.inference.findings import (
        AlgorithmFamily,
        AlgorithmIdentification,
        Detection,
        DetectionFindings,
    )
    from dicom_ai.inference.volume import load_series
    from dicom_ai.results import (
        DeviceIdentity,
        build_detection_sr,
        build_seg,
        build_sr,
        link_related_series,
        result_uids,
    )
    from dicom_ai.results.encoding import file_bytes
    from dicom_ai.synthetic import PhantomSpec, write_phantom_ct

    spec = PhantomSpec(
        slices=40,
        rows=256,
        columns=256,
        pixel_spacing_mm=1.5625,
        slice_thickness_mm=2.5,
        patient_name="OHIF^PHANTOM",
        patient_id="OHIF-0001",
        study_instance_uid="1.2.826.0.1.3680043.8.498.7001",
        series_instance_uid="1.2.826.0.1.3680043.8.498.7002",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.7003",
    )
    directory.mkdir(parents=True, exist_ok=True)
    ct = write_phantom_ct(directory / "ct", spec)
    volume = load_series(ct)
    headers = list(volume.headers)
    findings = CTBodyModel()(volume)
    device = DeviceIdentity.for_node("node-ohif")
    uids = result_uids(spec.series_instance_uid, "ct-body", findings.algorithm.version)
    seg = build_seg(headers, findings, uids, device)
    sr = build_sr(headers, seg, findings, uids, device)
    link_related_series(seg, sr)
    (directory / "seg.dcm").write_bytes(file_bytes(seg))
    (directory / "sr.dcm").write_bytes(file_bytes(sr))

    # One 30 x 20 x 10 mm box in the middle of the volume, as a 3-D detector reports it.
    centre = _centre(headers)
    detections = DetectionFindings(
        detections=(Detection("lung nodule", 0.93, centre, np.diag([30.0, 20.0, 10.0])),),
        algorithm=AlgorithmIdentification(
            "dicom-ai test boxes", "1.0.0", AlgorithmFamily.ARTIFICIAL_INTELLIGENCE, "testing"
        ),
        source_sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in headers),
        frame_of_reference_uid=spec.frame_of_reference_uid,
    )
    boxes = result_uids(spec.series_instance_uid, "boxes", "1.0.0")
    (directory / "detection-sr.dcm").write_bytes(
        file_bytes(build_detection_sr(headers, detections, boxes, device))
    )

    seg_header = dcmread(directory / "seg.dcm", stop_before_pixels=True)
    reported = _sr_findings(dcmread(directory / "sr.dcm"))
    measured = []
    for segment in seg_header.SegmentSequence:
        meaning = str(segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning)
        measured.append(Finding(str(segment.SegmentLabel), meaning, reported.get(meaning, ())))
    return ResultsStudy(
        study_uid=spec.study_instance_uid,
        ct=ct,
        seg=directory / "seg.dcm",
        sr=directory / "sr.dcm",
        detection_sr=directory / "detection-sr.dcm",
        findings=tuple(measured),
        descriptions={
            "seg": str(seg_header.SeriesDescription),
            "sr": str(sr.SeriesDescription),
            "detection_sr": str(
                dcmread(directory / "detection-sr.dcm", stop_before_pixels=True).SeriesDescription
            ),
        },
    )


def _sr_findings(sr: Any) -> dict[str, tuple[Measurement, ...]]:
    """Finding code meaning -> the NUMs of its measurement groups (at any depth), in order."""
    found: dict[str, list[Measurement]] = {}

    def meaning(item: Any) -> str:
        return str(item.ConceptNameCodeSequence[0].CodeMeaning)

    def nums(items: Any) -> list[Measurement]:
        out = []
        for item in items:
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                value = item.MeasuredValueSequence[0]
                unit = str(value.MeasurementUnitsCodeSequence[0].CodeValue)
                out.append(Measurement(meaning(item), float(value.NumericValue), unit))
            out += nums(item.get("ContentSequence", []))
        return out

    for container in sr.ContentSequence:
        if container.ValueType != "CONTAINER" or meaning(container) != "Imaging Measurements":
            continue
        for group in container.ContentSequence:
            finding = [
                i
                for i in group.ContentSequence
                if i.ValueType == "CODE" and meaning(i) == "Finding"
            ]
            if finding:
                name = str(finding[0].ConceptCodeSequence[0].CodeMeaning)
                found.setdefault(name, []).extend(nums(group.ContentSequence))
    return {name: tuple(values) for name, values in found.items()}


def _centre(headers: list[Any]) -> npt.NDArray[np.float64]:
    """The centre of the series' volume (LPS, mm)."""
    first, last = headers[0], headers[-1]
    rows, columns = int(first.Rows), int(first.Columns)
    row_dir = np.asarray(first.ImageOrientationPatient[:3], dtype=np.float64)
    col_dir = np.asarray(first.ImageOrientationPatient[3:], dtype=np.float64)
    spacing = np.asarray(first.PixelSpacing, dtype=np.float64)
    middle = (
        np.asarray(first.ImagePositionPatient, dtype=np.float64)
        + np.asarray(last.ImagePositionPatient, dtype=np.float64)
    ) / 2.0
    centre: npt.NDArray[np.float64] = (
        middle + row_dir * spacing[1] * (columns - 1) / 2 + col_dir * spacing[0] * (rows - 1) / 2
    )
    return centre


# -- the driver -----------------------------------------------------------------------------


def artifacts_dir() -> Path:
    """The screenshots' folder; tests/artifacts is kept out of git by a ``*`` .gitignore,
    as tests/web/browser.py writes it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# test artifacts (screenshots), written by the tests\n*\n")
    return ARTIFACTS


def run_driver(site_url: str, study: ResultsStudy, timeout: float) -> dict[str, Any]:
    """Run drive_ohif.mjs (puppeteer-core on Debian's chromium); its results.json."""
    uses("browser", "chromium (puppeteer-core)")
    if not (VIEWERS / "node_modules" / "puppeteer-core").is_dir():
        raise FileNotFoundError(f"{VIEWERS}/node_modules: no puppeteer-core; run ./install.sh")
    artifacts = artifacts_dir()
    for old in [*artifacts.glob("*.png"), artifacts / "results.json"]:
        old.unlink(missing_ok=True)
    plan = {
        "url": site_url,
        "studyUid": study.study_uid,
        "artifacts": str(artifacts),
        "chromium": CHROMIUM,
        "seg": study.descriptions["seg"],
        "sr": study.descriptions["sr"],
        "detectionSr": study.descriptions["detection_sr"],
        "segLabels": [f.label for f in study.findings],
    }
    done = subprocess.run(
        ["node", str(DRIVER), json.dumps(plan)],
        cwd=VIEWERS,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (artifacts / "driver.log").write_text(done.stdout + done.stderr)
    results = artifacts / "results.json"
    if done.returncode != 0 or not results.is_file():
        raise RuntimeError(
            f"drive_ohif.mjs exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    loaded: dict[str, Any] = json.loads(results.read_text())
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--orthanc", required=True, help="Orthanc's HTTP root URL")
    parser.add_argument("--dist", type=Path, default=OHIF_DIST)
    arguments = parser.parse_args()
    serve(arguments.dist, arguments.orthanc, arguments.port)


if __name__ == "__main__":
    main()

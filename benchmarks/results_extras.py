"""What the viewer-facing additions cost per job: the SR's outline groups (for OHIF) and the
result card, on a 300-slice 512x512 CT segmented by the built-in ct-body model.
Attribution maps have their own: benchmarks/explain.py.

    .venv/bin/python -m benchmarks.results_extras [--runs 5] [--slices 300]

Each part is timed in the worker's order on the same findings, best and median of
``--runs``: SEG (for reference), the whole SR, the part of the SR that the outline groups
add (key slices, outlines, areas, their groups, the coordinates repeated under each area:
the SR built with and without them), the card, and its PDF. The issue's target is card +
SR additions <= 0.2 s per job. No peer is run beside it: no open router makes a card or
OHIF-ready outlines.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_ai.inference.builtin.ct_body import CTBodyModel
from dicom_ai.inference.findings import SegmentationFindings
from dicom_ai.results import DeviceIdentity, build_seg, build_sr, link_related_series, result_uids
from dicom_ai.results.card import build_card, build_card_pdf
from dicom_ai.results.encoding import file_bytes
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets

DEVICE = DeviceIdentity.for_node("benchmark")
# The last commit before the outline groups and the card (issue 22).
BEFORE = "efdd1f35ddcdc33a2fb88669066855d4152411d2"
TARGET_S = 0.2


def _timed(function: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    seconds, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return min(seconds), statistics.median(seconds), result


def _sr_before() -> Any:
    """dicom_ai/results/sr.py as it was before the outline groups (BEFORE), as a module."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:dicom_ai/results/sr.py"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("dicom_ai.results._sr_before")
    module.__file__ = "<sr.py before>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def segmentation(slices: int, runs: int) -> None:
    spec = PhantomSpec(slices=slices, rows=512, columns=512, seed=7)
    datasets = list(phantom_ct_datasets(spec))
    frames = np.stack([ds.pixel_array.astype(np.float32) - 1024.0 for ds in datasets])
    headers = []
    for ds in datasets:
        del ds.PixelData
        headers.append(ds)
    model = CTBodyModel()
    label_map = model.segment(
        frames, (spec.slice_thickness_mm, spec.pixel_spacing_mm, spec.pixel_spacing_mm)
    )
    uids = result_uids(spec.series_instance_uid, "ct-body", "1.1.0")

    def findings() -> SegmentationFindings:
        # Fresh each run: the counts are cached on the findings, as in one job.
        return SegmentationFindings(
            label_map=label_map,
            labels=model.labels,
            algorithm=model.algorithm,
            source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        )

    names = [label.name for label in findings().present_labels()]
    print(f"ct-body on {slices} x 512 x 512: segments {names}")
    rows = []
    seg_best, seg_median, _ = _timed(lambda: build_seg(headers, findings(), uids, DEVICE), runs)
    rows.append(("SEG (reference)", seg_best, seg_median))

    before = _sr_before()

    def seg_and_sr(outlines: bool) -> Callable[[], Any]:
        def run() -> Any:
            f = findings()
            seg = build_seg(headers, f, uids, DEVICE)
            build = build_sr if outlines else before.build_sr
            started = time.perf_counter()
            sr = build(headers, seg, f, uids, DEVICE)
            file_bytes(sr)
            elapsed = time.perf_counter() - started
            link_related_series(seg, sr)
            return elapsed, f

        return run

    with_outlines = [seg_and_sr(True)()[0] for _ in range(runs)]
    without = [seg_and_sr(False)()[0] for _ in range(runs)]
    rows.append(
        ("SR with outline groups (encoded)", min(with_outlines), statistics.median(with_outlines))
    )
    rows.append(("SR without them (before)", min(without), statistics.median(without)))
    added = statistics.median(with_outlines) - statistics.median(without)

    # The card after SEG and SR, as in the worker: counts and colours already made.
    f = findings()
    seg = build_seg(headers, f, uids, DEVICE)
    build_sr(headers, seg, f, uids, DEVICE)
    card_best, card_median, card = _timed(
        lambda: file_bytes(build_card(headers, frames, f, uids, DEVICE, disclaimer="Test.")),
        runs,
    )
    rows.append(("card (encoded)", card_best, card_median))
    card_dataset = build_card(headers, frames, f, uids, DEVICE, disclaimer="Test.")
    pdf_best, pdf_median, _ = _timed(lambda: file_bytes(build_card_pdf(card_dataset)), runs)
    rows.append(("card PDF (encoded, optional)", pdf_best, pdf_median))
    del card
    width = max(len(name) for name, *_ in rows)
    print(f"{'part':<{width}}  best     median")
    for name, best, median in rows:
        print(f"{name:<{width}}  {best:6.3f} s {median:6.3f} s")
    total = added + card_median
    print(
        f"card + SR additions (medians): {card_median:.3f} + {added:.3f} = {total:.3f} s "
        f"(target {TARGET_S} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    segmentation(args.slices, args.runs)


if __name__ == "__main__":
    main()

"""Standard validators as test assertions: dicom3tools' dciodvfy, PixelMed's SR validator.

    from tests.dicom_validation import assert_dciodvfy_clean, assert_sr_template_valid

Both fail the test on any line starting with ``Error`` and show the validator's whole
output; warnings pass. One PixelMed error is a bug of its own and is let through, narrowly
(see ``_pixelmed_1410_quirk``). A validator that is not installed fails the test, saying which
(./install.sh installs them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.markers import uses

__all__ = ["assert_dciodvfy_clean", "assert_sr_template_valid", "dciodvfy_output"]

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
_TIMEOUT_S = 300


def _run(command: list[str]) -> str:
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )
    # Both tools write findings to stdout and stderr; keep them together.
    return completed.stdout + completed.stderr


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.lstrip().startswith("Error")]


def dciodvfy_output(path: str | Path) -> str:
    """dciodvfy's report on one file (stdout and stderr)."""
    uses("dciodvfy", "dciodvfy")
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not on PATH")
    return _run([tool, str(path)])


def assert_dciodvfy_clean(path: str | Path) -> None:
    """Fail if dciodvfy reports any ``Error`` line for the file at ``path``."""
    output = dciodvfy_output(path)
    errors = _error_lines(output)
    assert not errors, f"dciodvfy found {len(errors)} error(s) in {path}:\n{output}"


def assert_sr_template_valid(path: str | Path) -> str:
    """Fail if PixelMed's DicomSRValidator reports an ``Error`` (IOD or template) for an SR;
    returns its output for stricter checks of its warnings."""
    uses("java", "PixelMed's DicomSRValidator")
    java = shutil.which("java")
    if java is None or not PIXELMED_JAR.is_file():
        pytest.fail(f"PixelMed needs java and {PIXELMED_JAR} (Debian libpixelmed-java)")
    output = _run(
        [
            java,
            # The validator's XPath expressions exceed the JDK's default limits.
            "-Djdk.xml.xpathExprOpLimit=0",
            "-Djdk.xml.xpathExprGrpLimit=0",
            "-Djdk.xml.xpathTotalOpLimit=0",
            # Its XPath checks hold GBs for a report of hundreds of groups (VISTA3D's 114
            # segments, each an outline and a volume group: about 11 GB); the JVM's default
            # heap is a quarter of the memory.
            "-XX:MaxRAMPercentage=60",
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ]
    )
    errors = [line for line in _error_lines(output) if not _pixelmed_1410_quirk(line, path)]
    assert not errors, f"PixelMed found {len(errors)} error(s) in {path}:\n{output}"
    assert "Root Template Validation Complete" in output, output
    return output


# PixelMed (2022) picks TID 1410 for *every* measurement group of a report when the report
# holds exactly one Image Region in all (DicomSRDescriptionsCompiled.xsl, the TID 1500
# "Imaging Measurements" choice: count(container[125007]/scoord[111030]) = 1, counted over
# all groups, not per group). A single-segment report (one outline group, one volumetric
# group) then has its volumetric group checked against TID 1410, which misses the
# region it never has. Only that is let through: the flagged group must be volumetric
# (it references a SEG segment) and the report must hold exactly one Image Region.
_QUIRK = re.compile(
    r"^Error: Template 1410 PlanarROIMeasurements/\[Row 1\] CONTAINER "
    r'\(125007,DCM,"Measurement Group"\)/\[Row (?:'
    r"5\] SCOORD \(111030.*within 1\.9\.(\d+): .*Missing conditional content item"
    r"|7\] IMAGE \(121214.*within 1\.9\.(\d+): .*Missing conditional content item"
    # A study report's volumetric group names its source images (TID 1411 row 11).
    r"|8\] IMAGE \(121233.*within 1\.9\.(\d+): .*"
    r"Conditional content item present when condition not satisfied"
    r")$"
)


def _pixelmed_1410_quirk(line: str, path: str | Path) -> bool:
    import pydicom

    match = _QUIRK.match(line.strip())
    if match is None:
        return False
    sr = pydicom.dcmread(path)
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    groups = list(measurements.ContentSequence)
    regions = [
        child
        for group in groups
        for child in group.get("ContentSequence", [])
        if child.ValueType == "SCOORD"
        and child.ConceptNameCodeSequence[0].CodeValue == "111030"
        and child.RelationshipType == "CONTAINS"
    ]
    number = next(n for n in match.groups() if n is not None)
    group = groups[int(number) - 1]
    volumetric = any(
        child.ValueType == "IMAGE" and child.ConceptNameCodeSequence[0].CodeValue == "121191"
        for child in group.get("ContentSequence", [])
    )
    return len(regions) == 1 and volumetric


# The coordinates our planar groups repeat under their first measurement for OHIF
# (dicom_ai/results/sr.py): TID 300 has them, PixelMed's (2022) TID 1419 does not.
_OHIF_COORDINATES = '/SCOORD (121112,DCM,"Source of Measurement")'


def not_in_template(output: str) -> list[str]:
    """PixelMed's "not in template" warnings, less those of the coordinates repeated for
    OHIF under a measurement (and their image)."""
    return [
        line
        for line in output.splitlines()
        if "not in template" in line and _OHIF_COORDINATES not in line
    ]

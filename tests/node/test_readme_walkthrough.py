"""The README's DCMTK walkthrough runs as written, also with the venv activated."""

from __future__ import annotations

import re

from tests.peers import REPO

# pynetdicom installs scripts with these names into .venv/bin, ahead of DCMTK's on PATH.
SHADOWED = ("storescp", "storescu", "echoscu", "findscu", "movescu", "getscu")


def _walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Five-minute walkthrough with DCMTK", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.M | re.S)
    assert block is not None, "the walkthrough has no sh block"
    return block.group(1)


def test_walkthrough_calls_dcmtk_by_path() -> None:
    for line in _walkthrough().splitlines():
        command = line.split("#", 1)[0]  # the part a shell runs
        for name in SHADOWED:
            for found in re.finditer(rf"(?<![\w./-]){name}\b", command):
                raise AssertionError(f"{name} without /usr/bin/ at {found.start()}: {line}")
        # A comment's alternative is run too, by whoever copies it.
        for found in re.finditer(rf"or: ({'|'.join(SHADOWED)})\b", line):
            raise AssertionError(f"{found.group(1)} without /usr/bin/: {line}")


def test_walkthrough_names_the_files_dcmtk_storescp_writes() -> None:
    # storescp without -uf names files by DCMTK's modality prefix: SG (Segmentation
    # Storage), SR3 (Comprehensive 3D SR).
    block = _walkthrough()
    assert "SG.<uid>" in block and "SR3.<uid>" in block
    assert "pacs/SG.*" in block
    assert not re.search(r"\bSEG\.|\bSR\.", block)

"""`dicom-ai models` (list, check) and the serve-time check: a broken model's jobs fail at
once with the reason, shown by `dicom-ai status`; the others deliver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dicom_ai.cli import app
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.bundles import (
    spleen_bundle,  # noqa: F401  (session fixture)
)
from tests.peers import NodeProcess, StoreSCP, node_config, storescu, wait_until

MISSING = "no-such-package-dicom-ai"


def _broken_copy(bundle: Path, directory: Path) -> Path:
    """The bundle, importing and declaring a required package nobody has."""
    copy = directory / "broken" / bundle.name
    shutil.copytree(bundle, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    meta = copy / "configs" / "metadata.json"
    data = json.loads(meta.read_text())
    data["required_packages_version"] = {MISSING: "1.0"}
    meta.write_text(json.dumps(data))
    # Its network is built by a script that imports the package.
    (copy / "scripts").mkdir(exist_ok=True)
    (copy / "scripts" / "__init__.py").write_text("")
    (copy / "scripts" / "net.py").write_text(
        f"def make(**kwargs):\n    import {MISSING.replace('-', '_')}  # noqa: F401\n"
    )
    config = copy / "configs" / "inference.json"
    settings = json.loads(config.read_text())
    settings["network_def"]["_target_"] = "scripts.net.make"
    config.write_text(json.dumps(settings))
    return copy


def _config(directory: Path, models: dict[str, Path]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "node.yaml"
    config = {
        "node": {"data_dir": str(directory / "data")},
        "models": {name: {"bundle": str(bundle)} for name, bundle in models.items()},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "COLUMNS": "250"},  # table cells unwrapped
    )


def test_models_lists_with_and_without_the_list_subcommand(tmp_path: Path) -> None:
    config = _config(tmp_path, {"liver": tmp_path / "liver_bundle"})
    runner = CliRunner()
    for args in (["models", "--config", str(config)], ["models", "list", "--config", str(config)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        rows = [line.split("│")[1].strip() for line in result.output.splitlines() if "│" in line]
        assert [r for r in rows if r] == ["ct-body", "liver", "mr-brain"], result.output


@pytest.mark.slow
def test_models_check_says_which_model_is_broken_and_why(
    tmp_path: Path,
    spleen_bundle: Path,  # noqa: F811
) -> None:
    good = _config(tmp_path / "good", {"spleen": spleen_bundle})
    checked = _cli("models", "check", "--config", str(good))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "spleen" in checked.stdout and "ok 1x96x96x96" in checked.stdout
    assert "not checked (built in)" in checked.stdout

    broken = _broken_copy(spleen_bundle, tmp_path)
    mixed = _config(tmp_path / "mixed", {"broken": broken, "spleen": spleen_bundle})
    checked = _cli("models", "check", "--config", str(mixed))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = [line for line in checked.stderr.splitlines() if line.startswith("broken:")]
    assert lines == [f"broken: broken: needs package {MISSING}"]
    assert f"{MISSING} 1.0 missing (required)" in checked.stdout


@pytest.mark.slow
@pytest.mark.dcmtk
def test_serve_fails_a_broken_models_job_at_once_and_delivers_the_others(
    tmp_path: Path,
    pacs: StoreSCP,
    spleen_bundle: Path,  # noqa: F811
) -> None:
    broken = _broken_copy(spleen_bundle, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: spleen\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: spleen\n"
        "    destinations: [pacs]\n"
        "    continue: true\n"
        "  - name: broken\n"
        "    match: {Modality: {equals: CT}}\n"
        "    model: broken\n"
        "    destinations: [pacs]\n"
    )
    models = {"spleen": {"bundle": str(spleen_bundle)}, "broken": {"bundle": str(broken)}}
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pacs.port, rules, models))
    paths = write_phantom_ct(
        tmp_path / "ct", PhantomSpec(slices=24, rows=96, columns=96, pixel_spacing_mm=1.5)
    )
    node.start()
    try:
        # The SCP listens at once; the checks run beside it and log one line per broken model.
        wait_until(lambda: "model broken is broken" in node.log_text(), 300, "the check")
        assert f"model broken is broken: needs package {MISSING}" in node.log_text()
        sent = storescu(node.port, paths)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, 240, "the spleen's SEG and SR", 0.5)
        failed = node.index_rows("SELECT model, state, error FROM jobs WHERE model = 'broken'")
        assert failed == [("broken", "failed", f"model broken is broken: needs package {MISSING}")]
    finally:
        node.stop()
    status = _cli("status", "--config", str(node.config_path))
    assert status.returncode == 0, status.stderr
    assert f"model broken is broken: needs package {MISSING}" in status.stdout.replace("\n", "")
    assert "loaded bundle broken" not in node.log_text()  # no worker ever loaded it

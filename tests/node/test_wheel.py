"""The wheel is the node: built, installed into a fresh venv, it serves from an empty folder.

Only a wheel shows what a source checkout hides: files the package reads but does not ship
(the default rules, once). The venv is installed the way install.sh installs .venv (torch
first, constraints.txt as pip constraints), from whatever index pip is configured with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests.peers import REPO, StoreSCP, free_port, port_open, stop_process, storescu, wait_until
from tests.results_check import check_phantom_results

pytestmark = [pytest.mark.dcmtk, pytest.mark.dciodvfy, pytest.mark.slow]

# What the wheel is built from; the rest of the checkout (rules/, tests/) must not matter.
SOURCES = ("pyproject.toml", "README.md", "dicom_ai")


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"


def _clean_env() -> dict[str, str]:
    """This process's environment without what would import the checkout, not the wheel."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_CONSTRAINT"] = str(REPO / "constraints.txt")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel of this checkout installed; returns its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: no build/ left from an earlier build gets in
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(REPO / name, source / name)
    env = _clean_env()
    wheels = root / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source), "-w", str(wheels)],
        env=env,
    )
    (wheel,) = wheels.glob("dicom_ai-*.whl")
    venv = root / "venv"
    # Python's own venv module, from the interpreter the venv is based on: no site-packages.
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], env=env)  # as install.sh
    _run([python, "-m", "pip", "install", "-q", str(wheel)], env=env)
    return venv / "bin"


def test_the_installed_wheel_serves_from_an_empty_folder_with_its_default_rules(
    installed: Path, tmp_path: Path, pacs: StoreSCP
) -> None:
    # Only what the defaults cannot know here: a free port, and where the test PACS listens.
    port, web_port = free_port(), free_port()
    config = tmp_path / "etc" / "node.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"host": "127.0.0.1", "port": port},
                "web": {"port": web_port},
                "destinations": {
                    "pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
                },
            }
        )
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    log = tmp_path / "node.log"
    node = subprocess.Popen(
        [str(installed / "dicom-ai"), "serve", "--config", str(config)],
        cwd=empty,
        env=_clean_env(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            assert node.poll() is None, log.read_text()
            return port_open(port) and "dicom-ai ready" in log.read_text()

        wait_until(ready, 120, "the installed node to listen")
        text = log.read_text()
        site_packages = str(installed.parent / "lib")
        assert f"rules {site_packages}" in text and "default_rules.yaml" in text, text
        # The console's templates and static files are in the wheel too.
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login", timeout=10) as page:
            assert b"<form" in page.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/static/console.css") as css:
            assert css.status == 200

        spec = PhantomSpec(slices=16, rows=128, columns=128, pixel_spacing_mm=3.0)
        series = write_phantom_ct(tmp_path / "ct", spec)
        sent = storescu(port, series)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(pacs.files()) >= 2, 180, "the SEG and the SR at the PACS")
        check_phantom_results(pacs.files(), series, spec)
    finally:
        stop_process(node, timeout=30)
    assert node.returncode == 0, log.read_text()

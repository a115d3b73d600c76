"""The default rules ship inside the package; rules/default.yaml is the same file, to copy."""

from __future__ import annotations

import tomllib
from pathlib import Path

from typer.testing import CliRunner

import dicom_ai
from dicom_ai.cli import app
from dicom_ai.config import DEFAULT_RULES, Config, load_config
from dicom_ai.routing import load_rules
from tests.peers import REPO

PACKAGE = REPO / "dicom_ai"


def test_default_rules_are_a_file_of_the_package_listed_as_package_data() -> None:
    assert DEFAULT_RULES.parent == PACKAGE == Path(dicom_ai.__file__).parent
    assert DEFAULT_RULES.is_file()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["dicom_ai"]
    assert DEFAULT_RULES.name in package_data
    for pattern in package_data:
        assert list(PACKAGE.glob(pattern)), f"package-data {pattern!r} matches no file"


def test_a_config_without_rules_routes_with_the_packaged_rules() -> None:
    assert Config().rules == DEFAULT_RULES
    assert load_config(None).rules == DEFAULT_RULES
    assert load_rules(DEFAULT_RULES).rules


def test_the_repository_copy_is_the_packaged_file() -> None:
    copy = REPO / "rules" / "default.yaml"
    assert copy.read_bytes() == DEFAULT_RULES.read_bytes(), (
        "edit dicom_ai/default_rules.yaml, then copy it to rules/default.yaml"
    )


def test_rules_show_default_prints_the_packaged_rules() -> None:
    result = CliRunner().invoke(app, ["rules", "show-default"])
    assert result.exit_code == 0
    assert result.stdout == DEFAULT_RULES.read_text(encoding="utf-8")

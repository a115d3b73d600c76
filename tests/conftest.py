"""Fixtures every stage's tests share, and the marker check of tests/markers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from tests import markers
from tests.peers import StoreSCP


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    markers.current_test(item)  # before fixtures: session fixtures start tools too


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    markers.current_test(None)


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomSpec, list[Path]]:
    """A 64-slice 512x512 phantom CT series written once per session."""
    spec = PhantomSpec(
        slices=64,
        study_instance_uid="1.2.826.0.1.3680043.8.498.1001",
        series_instance_uid="1.2.826.0.1.3680043.8.498.1002",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1003",
    )
    directory = tmp_path_factory.mktemp("ct64")
    return spec, write_phantom_ct(directory, spec)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()

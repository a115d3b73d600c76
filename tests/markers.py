"""Markers that say which external tools a test runs, kept true.

A helper that starts a tool calls :func:`uses`; a test that gets there without the tool's
marker fails, so ``pytest -m "not dcmtk"`` and friends select what they say. The markers
are declared in ``pyproject.toml`` (``--strict-markers``); ``tests/README.md`` says which
to use.
"""

from __future__ import annotations

import pytest

__all__ = ["current_test", "uses"]

_current: list[pytest.Item] = []


def current_test(item: pytest.Item | None) -> None:
    """Called by ``tests/conftest.py`` as each test's setup begins (None after it)."""
    _current[:] = [item] if item is not None else []


def uses(marker: str, tool: str) -> None:
    """Fail the running test if it is not marked ``marker`` while running ``tool``."""
    if _current and _current[0].get_closest_marker(marker) is None:
        pytest.fail(
            f"{_current[0].nodeid} runs {tool} but is not marked: add "
            f"pytest.mark.{marker} to it or to its module's pytestmark (tests/README.md)",
            pytrace=False,
        )

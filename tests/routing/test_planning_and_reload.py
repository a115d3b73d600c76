"""Run planning (routing/planning.py) and rules hot reload (routing/reload.py), no Node."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_ai.errors import ConfigError
from dicom_ai.routing import LiveRules, RuleSet, parse_rules, plan_runs
from dicom_ai.store.index import RunPlan, Sender


def _header(modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    ds.SeriesDescription = "abdomen"
    return ds


def _rules(*rules: str) -> RuleSet:
    return parse_rules("rules:\n" + "".join(rules))


def _rule(name: str, model: str | None, destinations: str = "", extra: str = "") -> str:
    text = f"  - name: {name}\n    match: {{Modality: {{equals: CT}}}}\n"
    text += f"    model: {model or 'null'}\n"
    if destinations:
        text += f"    destinations: [{destinations}]\n"
    return text + extra


def test_each_called_ae_routes_by_its_own_rules_and_sender_is_bound() -> None:
    by_title = {
        "AI_CT": _rules(_rule("ct-a", "ct-body", "pacs")),
        "AI_ALL": _rules(_rule("all-b", "ct-body", "sender")),
        "AI_MR": _rules(_rule("mr-c", "mr-brain", "pacs")),
    }
    senders = [Sender("CT1", "AI_CT", "10.0.0.1"), Sender("PACS1", "AI_ALL", "10.0.0.2")]
    plans, notes = plan_runs(_header(), senders, by_title)
    assert plans == [
        RunPlan("ct-a", "ct-body", ("pacs",)),
        RunPlan("all-b", "ct-body", ("sender:PACS1",)),
    ]
    assert [n.split(":")[0] for n in notes] == ["AI_CT/ct-a", "AI_ALL/all-b"]


def test_the_same_model_and_destinations_make_one_run_that_makes_the_preview() -> None:
    by_title = {
        "A": _rules(_rule("first", "ct-body", "pacs", "    card: true\n")),
        "B": _rules(_rule("second", "ct-body", "pacs", "    preview: true\n")),
    }
    senders = [Sender("S", "A", "1.1.1.1"), Sender("S", "B", "1.1.1.1")]
    plans, notes = plan_runs(_header(), senders, by_title)
    assert plans == [RunPlan("first", "ct-body", ("pacs",), preview=True, card=True)]
    assert len(notes) == 2


def test_a_title_seen_twice_routes_once_and_a_title_no_longer_served_is_noted() -> None:
    by_title = {"A": _rules(_rule("a", "ct-body", "sender"))}
    senders = [
        Sender("FIRST", "A", "1.1.1.1"),
        Sender("SECOND", "A", "1.1.1.2"),  # the first association to A binds sender
        Sender("X", "GONE", "1.1.1.3"),
    ]
    plans, notes = plan_runs(_header(), senders, by_title)
    assert plans == [RunPlan("a", "ct-body", ("sender:FIRST",))]
    assert notes[-1] == "called AE 'GONE' is no longer configured"


def test_a_rule_that_runs_nothing_is_noted_without_a_run() -> None:
    by_title = {"A": _rules(_rule("keep", None))}
    plans, notes = plan_runs(_header(), [Sender("S", "A", "1.1.1.1")], by_title)
    assert plans == [] and len(notes) == 1 and notes[0].startswith("A/keep: ")
    plans, notes = plan_runs(_header("MR"), [Sender("S", "A", "1.1.1.1")], by_title)
    assert (plans, notes) == ([], [])


def _write(path: Path, text: str, mtime: int) -> Path:
    path.write_text(text)
    os.utime(path, (mtime, mtime))  # explicit: the clock may be coarser than the test
    return path


def test_rules_reload_when_their_file_changes(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", "rules:\n" + _rule("one", "ct-body", "pacs"), 1000)
    live = LiveRules({"A": path})
    assert live.reload_if_changed() == []
    _write(path, "rules:\n" + _rule("two", "ct-body", "pacs"), 2000)
    assert live.reload_if_changed() == ["A"]
    assert [r.name for r in live.by_called_ae()["A"].rules] == ["two"]
    assert live.reload_if_changed() == []


def test_a_broken_or_refused_rules_file_leaves_the_running_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def no_mr(rules: RuleSet, path: Path) -> None:
        if "mr-brain" in rules.models:
            raise ConfigError(f"{path}: unknown model(s) mr-brain")

    path = _write(tmp_path / "r.yaml", "rules:\n" + _rule("one", "ct-body", "pacs"), 1000)
    live = LiveRules({"A": path}, check=no_mr)
    with caplog.at_level(logging.ERROR):
        _write(path, "rules:\n  - name: [\n", 2000)
        assert live.reload_if_changed() == []
        _write(path, "rules:\n" + _rule("mr", "mr-brain", "pacs"), 3000)
        assert live.reload_if_changed() == []
    assert [r.name for r in live.by_called_ae()["A"].rules] == ["one"]
    assert len([r for r in caplog.records if "not reloaded" in r.message]) == 2
    path.unlink()  # gone: the running rules stay, quietly
    assert live.reload_if_changed() == []


def test_rules_that_do_not_load_at_start_raise(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", "rules:\n" + _rule("mr", "mr-brain", "pacs"), 1000)

    def refuse(rules: RuleSet, source: Path) -> None:
        raise ConfigError(f"{source}: no")

    with pytest.raises(ConfigError, match="no"):
        LiveRules({"A": path}, check=refuse)
    with pytest.raises(ConfigError):
        LiveRules({"A": _write(tmp_path / "bad.yaml", "rules: [\n", 1000)})

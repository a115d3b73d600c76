"""Routing: which model runs on a series, and where its results go.

Rules are data (YAML), validated at load; see `dicom_ai.routing.rules` for the syntax::

    rules = load_rules(Path("rules/default.yaml"))  # ConfigError names file:line
    evaluation = rules.evaluate(header, SenderContext("CT01", "DICOM_AI", "10.0.0.5"))
    [d.model for d in evaluation.decisions]  # ['ct-body'] for a CT series; [] unmatched

`plan_runs` turns the decisions of every called AE title that received a batch into the
runs to make; `LiveRules` keeps each title's rules in step with its file.
"""

from dicom_ai.routing.engine import (
    Evaluation,
    RouteDecision,
    RuleSet,
    RuleTrace,
    SenderContext,
    load_rules,
    parse_rules,
)
from dicom_ai.routing.planning import plan_runs
from dicom_ai.routing.reload import LiveRules
from dicom_ai.routing.rules import Condition, Fallback, Rule, RuleFile

__all__ = [
    "Condition",
    "Evaluation",
    "Fallback",
    "LiveRules",
    "RouteDecision",
    "Rule",
    "RuleFile",
    "RuleSet",
    "RuleTrace",
    "SenderContext",
    "load_rules",
    "parse_rules",
    "plan_runs",
]

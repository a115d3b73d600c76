"""Routing: which model runs on a series, and where its results go.

Rules are data (YAML), validated at load; see `dicom_ai.routing.rules` for the syntax::

    rules = load_rules(Path("rules/default.yaml"))  # ConfigError names file:line
    evaluation = rules.evaluate(header, SenderContext("CT01", "DICOM_AI", "10.0.0.5"))
    [d.model for d in evaluation.decisions]  # ['ct-body'] for a CT series; [] unmatched
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
from dicom_ai.routing.rules import Condition, Fallback, Rule, RuleFile

__all__ = [
    "Condition",
    "Evaluation",
    "Fallback",
    "RouteDecision",
    "Rule",
    "RuleFile",
    "RuleSet",
    "RuleTrace",
    "SenderContext",
    "load_rules",
    "parse_rules",
]

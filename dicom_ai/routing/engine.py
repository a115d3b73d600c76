"""Route decisions: one series header and its sender, tested against the rules.

`RuleSet.evaluate` never raises and never changes anything: an unreadable element counts
as missing, and an unmatched series gets no decision (the caller keeps and logs it).
Every rule is tested, so the trace can also say "this rule matched too, but an earlier
one took the series" when an administrator asks why.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from collections.abc import Sequence as AbcSequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicom_ai.routing.rules import (
    Condition,
    Fallback,
    IpAddress,
    IpOps,
    Rule,
    RuleFile,
    Scalar,
    Study,
    ValueOps,
)
from dicom_ai.yaml_model import load_validated, loads_validated

__all__ = [
    "PHI_KEYWORDS",
    "Evaluation",
    "RouteDecision",
    "RuleSet",
    "RuleTrace",
    "SenderContext",
    "load_rules",
    "parse_rules",
]

logger = logging.getLogger(__name__)

# Values of these elements identify the patient: reasons show "<redacted>" instead, so a
# decision's reasons can be logged at INFO. The rule's own expected value is still shown.
PHI_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "IssuerOfPatientID",
        "AccessionNumber",
        "MedicalRecordLocator",
        "PatientInsurancePlanCodeSequence",
    }
)
_PADDING = " \x00"  # DICOM pads to even length with a space (text) or NUL (UI)
_MAX_SHOWN = 64  # longest value text quoted in a reason


@dataclass(frozen=True)
class SenderContext:
    """Who sent the series: the association's AE titles and the peer's address."""

    calling_ae: str
    called_ae: str
    source_ip: str


@dataclass(frozen=True)
class RouteDecision:
    """One route for a series: run `model` (None: run nothing) and send to `destinations`."""

    rule: str
    model: str | None
    destinations: tuple[str, ...]
    reasons: tuple[str, ...]  # why it matched, e.g. "Modality 'CT' equals 'CT'"
    preview: bool = False  # also a Secondary Capture preview of a segmentation
    urgent: bool = False  # its jobs run before every queued normal job
    study: Study | None = None  # a study rule: the series is one of its inputs
    roles: tuple[str, ...] = ()  # the study rule's roles this series can fill
    # (role, text of the role's order_by element in this series' header)
    order_values: tuple[tuple[str, str], ...] = ()
    card: bool = False  # also a result card


@dataclass(frozen=True)
class RuleTrace:
    """How one rule (or the fallback) fared against a series."""

    rule: str
    priority: int | None  # None for the fallback
    matched: bool  # its condition holds for this series
    routed: bool  # it produced a RouteDecision
    reasons: tuple[str, ...]  # why it matched; or why not: the first condition that failed
    shadowed_by: str | None = None  # matched, but this earlier rule did not continue

    def describe(self) -> str:
        """One line for `dicom-ai rules test`."""
        label = "fallback" if self.priority is None else f"priority {self.priority}"
        if self.routed:
            status = "routed"
        elif self.shadowed_by is not None:
            status = f"matched, not used: {self.shadowed_by!r} came first without continue"
        elif self.matched:
            status = "matched, not used"
        else:
            status = "no match" if self.priority is not None else "not used"
        return f"{self.rule} ({label}): {status}: {'; '.join(self.reasons)}"


@dataclass(frozen=True)
class Evaluation:
    """The routes for a series (empty: unmatched) and the trace of every rule."""

    decisions: tuple[RouteDecision, ...]
    trace: tuple[RuleTrace, ...]


@dataclass(frozen=True)
class _Outcome:
    matched: bool
    reasons: tuple[str, ...]


# --- values ---------------------------------------------------------------------------


def _flatten(value: object) -> tuple[object, ...]:
    """An element's values; () when it has none (zero length: DICOM's "unknown")."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip(_PADDING) else ()
    if isinstance(value, bytes):
        return (value,) if value.strip(b" \x00") else ()
    if isinstance(value, AbcSequence):  # MultiValue, Sequence: several values or items
        return tuple(item for item in value if _flatten(item) or isinstance(item, Dataset))
    return (value,) if str(value).strip(_PADDING) else ()


def _element_values(header: Dataset, keyword: str) -> tuple[object, ...]:
    tag = tag_for_keyword(keyword)  # known: keywords are checked when the rules load
    if tag is None or tag not in header:
        return ()
    try:
        value = header[tag].value  # converts a raw element's bytes on first access
    except Exception as exc:  # a malformed element must not stop routing: treat as missing
        logger.warning(
            "cannot read %s from the series header (%s); treated as missing",
            keyword,
            type(exc).__name__,
        )
        return ()
    return _flatten(value)


def _text(value: object) -> str | None:
    if isinstance(value, bytes | Dataset):
        return None
    if isinstance(value, str):
        return value.strip(_PADDING)
    return str(value).strip(_PADDING)  # PersonName, DS, IS, numbers


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):  # IS and DS (pydicom's IS, DSfloat) are these too
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip(_PADDING))
        except ValueError:
            return None
    return None


def _equals(value: object, expected: Scalar) -> bool:
    if isinstance(expected, str):
        text = _text(value)
        return text is not None and text == expected.strip(_PADDING)
    number = _number(value)
    return number is not None and number == expected


# --- how values appear in reasons ------------------------------------------------------


def _fmt_number(number: float) -> str:
    return str(int(number)) if number.is_integer() else repr(number)


def _fmt_expected(expected: Scalar) -> str:
    return repr(expected) if isinstance(expected, str) else _fmt_number(float(expected))


def _fmt_value(value: object, redact: bool) -> str:
    if redact:
        return "<redacted>"
    if isinstance(value, Dataset):
        return "<item>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # IS, DS: shown as written in the header, unquoted
    text = _text(value)
    if text is None:
        return "<binary>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return repr(text)


def _fmt_values(values: tuple[object, ...], redact: bool) -> str:
    if len(values) == 1:
        return _fmt_value(values[0], redact)
    return "[" + ", ".join(_fmt_value(value, redact) for value in values) + "]"


# --- operators --------------------------------------------------------------------------

_Test = tuple[str, str, Callable[[object], bool]]  # (verb, negated verb + operand, test)


def _value_tests(ops: ValueOps) -> list[_Test]:
    tests: list[_Test] = []
    if ops.equals is not None:
        equals = ops.equals
        shown = _fmt_expected(equals)
        tests.append((f"equals {shown}", f"does not equal {shown}", lambda v: _equals(v, equals)))
    if ops.in_ is not None:
        choices = ops.in_
        shown = "[" + ", ".join(_fmt_expected(choice) for choice in choices) + "]"
        tests.append(
            (
                f"is in {shown}",
                f"is not in {shown}",
                lambda v: any(_equals(v, choice) for choice in choices),
            )
        )
    if ops.regex is not None:
        tests.append(_regex_test(ops.regex))
    for symbol, bound, compare in (
        (">", ops.gt, float.__gt__),
        (">=", ops.ge, float.__ge__),
        ("<", ops.lt, float.__lt__),
        ("<=", ops.le, float.__le__),
    ):
        if bound is not None:
            tests.append(_numeric_test(symbol, bound, compare))
    return tests


def _regex_test(pattern: re.Pattern[str]) -> _Test:
    def test(value: object) -> bool:
        text = _text(value)
        return text is not None and pattern.search(text) is not None

    shown = repr(pattern.pattern)
    return f"matches regex {shown}", f"does not match regex {shown}", test


def _numeric_test(symbol: str, bound: float, compare: Callable[[float, float], bool]) -> _Test:
    def test(value: object) -> bool:
        number = _number(value)
        return number is not None and compare(number, bound)

    shown = _fmt_number(bound)
    return f"{symbol} {shown}", f"is not {symbol} {shown}", test


def _exists(key: str, wanted: bool, values: tuple[object, ...], redact: bool) -> _Outcome:
    present = bool(values)
    shown = _fmt_values(values, redact)
    reason = f"{key} is present ({shown})" if present else f"{key} is missing"
    return _Outcome(present == wanted, (reason,))


def _test_values(
    key: str, values: tuple[object, ...], exists: bool | None, tests: list[_Test], redact: bool
) -> _Outcome:
    """Every test must hold; each holds if any one value passes it."""
    reasons: list[str] = []
    if exists is not None:
        outcome = _exists(key, exists, values, redact)
        if not outcome.matched or not tests:
            return outcome
        reasons.extend(outcome.reasons)
    if not values:
        return _Outcome(False, (f"{key} is missing",))
    for verb, negated, test in tests:
        hit = next((value for value in values if test(value)), None)
        if hit is None:
            return _Outcome(False, (f"{key} {_fmt_values(values, redact)} {negated}",))
        reasons.append(f"{key} {_fmt_value(hit, redact)} {verb}")
    return _Outcome(True, tuple(reasons))


def _parse_ip(text: str) -> IpAddress | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


def _ip_tests(ops: IpOps) -> list[_Test]:
    tests: list[_Test] = []
    if ops.equals is not None:
        wanted = ops.equals
        tests.append(
            (
                f"equals {str(wanted)!r}",
                f"does not equal {str(wanted)!r}",
                lambda v: isinstance(v, str) and _parse_ip(v) == wanted,
            )
        )
    if ops.in_ is not None:
        networks = ops.in_
        shown = "[" + ", ".join(str(network) for network in networks) + "]"

        def within(value: object) -> bool:
            address = _parse_ip(value) if isinstance(value, str) else None
            return address is not None and any(address in network for network in networks)

        tests.append((f"is in {shown}", f"is not in {shown}", within))
    if ops.regex is not None:
        tests.append(_regex_test(ops.regex))
    return tests


def _sender_values(text: str) -> tuple[object, ...]:
    text = text.strip(_PADDING)  # AE titles are space-padded to 16 characters
    return (text,) if text else ()


# --- conditions -------------------------------------------------------------------------


def _holds(condition: Condition, header: Dataset, sender: SenderContext) -> _Outcome:
    """Every entry of the mapping must hold; stops at the first that does not."""
    reasons: list[str] = []
    for key, value in condition.terms():
        if key == "all" and isinstance(value, tuple):
            outcome = _all(value, header, sender)
        elif key == "any" and isinstance(value, tuple):
            outcome = _any(value, header, sender)
        elif key == "not" and isinstance(value, Condition):
            inner = _holds(value, header, sender)
            # When the inner condition fails, the reason it failed is why `not` holds.
            outcome = (
                _Outcome(False, (f"excluded by not: {'; '.join(inner.reasons)}",))
                if inner.matched
                else _Outcome(True, inner.reasons)
            )
        elif isinstance(value, IpOps):
            outcome = _test_values(
                key, _sender_values(sender.source_ip), value.exists, _ip_tests(value), redact=False
            )
        elif isinstance(value, ValueOps) and key in ("calling_ae", "called_ae"):
            outcome = _test_values(
                key,
                _sender_values(getattr(sender, key)),
                value.exists,
                _value_tests(value),
                redact=False,
            )
        elif isinstance(value, ValueOps):
            outcome = _test_values(
                key,
                _element_values(header, key),
                value.exists,
                _value_tests(value),
                redact=key in PHI_KEYWORDS,
            )
        else:  # unreachable with a validated Condition
            raise TypeError(f"unexpected condition entry {key!r}")
        if not outcome.matched:
            return outcome
        reasons.extend(outcome.reasons)
    return _Outcome(True, tuple(reasons))


def _all(conditions: tuple[Condition, ...], header: Dataset, sender: SenderContext) -> _Outcome:
    reasons: list[str] = []
    for condition in conditions:
        outcome = _holds(condition, header, sender)
        if not outcome.matched:
            return outcome
        reasons.extend(outcome.reasons)
    return _Outcome(True, tuple(reasons))


def _any(conditions: tuple[Condition, ...], header: Dataset, sender: SenderContext) -> _Outcome:
    failures: list[str] = []
    for condition in conditions:
        outcome = _holds(condition, header, sender)
        if outcome.matched:
            return outcome
        failures.extend(outcome.reasons)
    return _Outcome(False, (f"none of any matched: {'; '.join(failures)}",))


# --- the rule set -----------------------------------------------------------------------


class RuleSet:
    """A loaded, validated, immutable rules file, ready to evaluate series."""

    __slots__ = ("_fallback", "_file", "_rules", "_source")

    def __init__(self, rule_file: RuleFile, source: str = "<rules>") -> None:
        self._file = rule_file
        self._source = source
        # sorted() is stable: rules of equal priority keep their order in the file.
        self._rules = tuple(sorted(rule_file.rules, key=lambda rule: -rule.priority))
        self._fallback = rule_file.fallback

    def __repr__(self) -> str:
        return f"RuleSet({self._source!r}, rules={len(self._rules)})"

    @property
    def source(self) -> str:
        """Where the rules came from (the file name as given)."""
        return self._source

    @property
    def rule_file(self) -> RuleFile:
        """The validated file, rules in file order."""
        return self._file

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in evaluation order: highest priority first, ties in file order."""
        return self._rules

    @property
    def fallback(self) -> Fallback | None:
        return self._fallback

    @property
    def models(self) -> frozenset[str]:
        """Every model id a rule or the fallback names (to check against the node config)."""
        routes: list[Rule | Fallback] = [*self._rules]
        if self._fallback is not None:
            routes.append(self._fallback)
        return frozenset(route.model for route in routes if route.model is not None)

    @property
    def destinations(self) -> frozenset[str]:
        """Every destination name a rule or the fallback names."""
        routes: list[Rule | Fallback] = [*self._rules]
        if self._fallback is not None:
            routes.append(self._fallback)
        return frozenset(name for route in routes for name in route.destinations)

    def evaluate(self, header: Dataset, sender: SenderContext) -> Evaluation:
        """Route one series, given one of its instances' headers and who sent it."""
        decisions: list[RouteDecision] = []
        trace: list[RuleTrace] = []
        taken_by: str | None = None  # the matched rule that ended evaluation
        for rule in self._rules:
            if rule.match is None:
                outcome = _Outcome(True, ("no match conditions: every series matches",))
            else:
                outcome = _holds(rule.match, header, sender)
            routed = outcome.matched and taken_by is None
            trace.append(
                RuleTrace(
                    rule.name,
                    rule.priority,
                    outcome.matched,
                    routed,
                    outcome.reasons,
                    taken_by if outcome.matched and not routed else None,
                )
            )
            if routed and rule.study is not None:
                outcome, roles = _fill_roles(rule.study, outcome, header, sender)
                routed = outcome.matched
                trace[-1] = RuleTrace(
                    rule.name, rule.priority, routed, routed, outcome.reasons, None
                )
            else:
                roles = ()
            if routed:
                urgent, why_urgent = _urgent(rule, header, sender)
                decisions.append(
                    RouteDecision(
                        rule.name,
                        rule.model,
                        rule.destinations,
                        outcome.reasons + why_urgent,
                        rule.preview,
                        urgent,
                        rule.study,
                        roles,
                        _order_values(rule.study, roles, header),
                        rule.card,
                    )
                )
                if not rule.continue_:
                    taken_by = rule.name
        if self._fallback is not None:
            fallback = self._fallback
            if decisions:
                reason = f"a rule matched ({decisions[0].rule!r})"
                trace.append(RuleTrace(fallback.name, None, False, False, (reason,)))
            else:
                reasons = ("no rule matched",)
                decisions.append(
                    RouteDecision(
                        fallback.name,
                        fallback.model,
                        fallback.destinations,
                        reasons,
                        fallback.preview,
                        card=fallback.card,
                    )
                )
                trace.append(RuleTrace(fallback.name, None, True, True, reasons))
        return Evaluation(tuple(decisions), tuple(trace))


def _fill_roles(
    study: Study, outcome: _Outcome, header: Dataset, sender: SenderContext
) -> tuple[_Outcome, tuple[str, ...]]:
    """The roles of a study rule the series can fill; none: the rule does not match."""
    roles: list[str] = []
    why: list[str] = []
    for role in study.roles:
        if role.match is None:
            roles.append(role.name)
            continue
        fits = _holds(role.match, header, sender)
        if fits.matched:
            roles.append(role.name)
        else:
            why.append(f"{role.name}: {'; '.join(fits.reasons)}")
    if not roles:
        return _Outcome(False, (f"fills none of the study's roles ({' | '.join(why)})",)), ()
    return _Outcome(True, (*outcome.reasons, f"can fill role(s) {', '.join(roles)}")), tuple(roles)


def _urgent(rule: Rule, header: Dataset, sender: SenderContext) -> tuple[bool, tuple[str, ...]]:
    if isinstance(rule.urgent, bool):
        return rule.urgent, ("urgent",) if rule.urgent else ()
    outcome = _holds(rule.urgent, header, sender)
    if not outcome.matched:
        return False, ()
    return True, (f"urgent: {'; '.join(outcome.reasons)}",)


def _order_values(
    study: Study | None, roles: tuple[str, ...], header: Dataset
) -> tuple[tuple[str, str], ...]:
    if study is None:
        return ()
    values = []
    for role in study.roles:
        if role.name in roles and role.order_by is not None:
            found = _element_values(header, role.order_by)
            text = _text(found[0]) if found else None
            values.append((role.name, text or ""))
    return tuple(values)


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rules file; raises `ConfigError` naming file:line and field."""
    return RuleSet(load_validated(path, RuleFile), source=str(path))


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """`load_rules` for text in memory (tests, `dicom-ai rules check -`)."""
    return RuleSet(loads_validated(text, RuleFile, source), source=source)

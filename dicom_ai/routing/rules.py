"""The routing rules file: its schema, validated at load. Rules are data, never code.

A rules file sends each received series to an AI model and names where the model's
results (SEG, SR) go. It is YAML::

    rules:
      - name: ct-body                # unique among the rules and the fallback
        priority: 10                 # higher is evaluated first; ties keep file order
        match:                       # a condition, see below; omitted = every series
          all:
            - Modality: {equals: CT}
            - SliceThickness: {le: 5}
            - not: {ImageType: {regex: LOCALIZER}}
        model: ct-body               # a model id; null = run nothing (see below)
        destinations: [pacs]         # destination names from the node config
        continue: false              # true = also evaluate the rules after this one
    fallback:                        # optional, used only when no rule matched
      name: unmatched
      model: null
      destinations: []

Evaluation. Rules are tried from the highest priority down; the first rule whose
condition holds routes the series and evaluation stops, unless that rule says
``continue: true`` (then later rules may add more routes, e.g. a second model). If no
rule matched, the fallback is used; without a fallback the series is not routed (it is
kept in the spool and logged, never deleted).

``model: null`` means the rule claims the series and runs nothing: use it to exclude
series (localizers, dose reports) from the rules after it. Such a rule has nothing to
send, so its ``destinations`` must be empty; a rule with a model must name at least one.

Conditions. A condition is a mapping; every entry in it must hold:

- ``all: [cond, ...]`` -- every condition in the list holds;
- ``any: [cond, ...]`` -- at least one holds;
- ``not: cond`` -- the condition does not hold;
- ``KEY: {OP: value, ...}`` -- a test of one value; several operators must all hold.

KEY is a DICOM keyword from the data dictionary (``Modality``, ``SeriesDescription``,
``SliceThickness``, ...; a misspelt keyword is refused at load), looked up in the top
level of the series header (one instance, read without pixel data), or one of the
sender's keys: ``calling_ae`` (the sender's AE title), ``called_ae`` (the AE title it
addressed us by), ``source_ip`` (its IP address).

Operators:

- ``equals: v`` -- a string is compared exactly (case matters; DICOM code strings are
  upper case); a number is compared numerically (``equals: 5`` matches "5.0").
- ``in: [v, ...]`` -- equals one of the list.
- ``regex: "..."`` -- Python ``re.search`` finds the pattern in the value (anchor it
  with ``^...$`` for a whole-value match; ``(?i)`` ignores case). Checked at load.
- ``gt``, ``ge``, ``lt``, ``le`` -- numeric >, >=, <, <=. A value that is not a number
  does not match.
- ``exists: true`` -- the element is present with a value; ``exists: false`` -- it is
  missing or empty (zero length, DICOM's "unknown").

Values. Leading and trailing spaces (DICOM's padding) and NUL padding are ignored. A
multi-valued element (``ImageType``: ORIGINAL\\PRIMARY\\AXIAL) matches ``equals``,
``in``, ``regex`` and the numeric operators if any one of its values matches. A missing
or empty element matches nothing except ``exists: false``. A sequence (SQ) element
only has ``exists``; other operators never match it. For ``source_ip``, ``equals``
takes an address and ``in`` takes addresses or networks in CIDR form
(``10.20.0.0/16``); IPv6 addresses must be quoted.

Urgent. ``urgent: true`` (or a condition, e.g. ``urgent: {calling_ae: {equals: ED_CT}}`` or
``urgent: {RequestedProcedurePriority: {equals: STAT}}``) marks the rule's jobs urgent: an
urgent job runs before every queued normal job and takes the next free worker.

Studies. A rule with ``study:`` runs its model on several series of one study, each filling
a role (routing/studies.py has the selection and the start rule)::

    rules:
      - name: brain-tumour
        match: {Modality: {equals: MR}}     # tested on each series of the study
        model: brats
        destinations: [pacs]
        study:
          input: channels                   # or keys: role names are the bundle's input keys
          reference: t1c                    # results lie on its grid; default: the first role
          deadline_seconds: 600             # after the study's first instance
          at_deadline: fail                 # or wait, when a required role is missing
          roles:                            # in channel order
            - {name: t1c, match: {SeriesDescription: {regex: "(?i)t1.*(gd|post|\\+c)"}}}
            - {name: t1, match: {SeriesDescription: {regex: "(?i)^t1"}}}
            - {name: t2, match: {SeriesDescription: {regex: "(?i)^t2"}}}
            - {name: flair, match: {SeriesDescription: {regex: "(?i)flair"}}, required: false}

A role's ``match`` is a condition as above; ``required`` (default true); ``choose: latest``
(default) or ``most_slices`` when several series fit; ``order_by: AcquisitionTime`` with
``position: N`` takes the N-th fitting series in that element's order (contrast phases). A
series that fills none of the roles does not match the rule.

YAML reads unquoted ``yes``, ``no``, ``on``, ``off``, ``true``, ``false`` as booleans:
quote such values (``BurnedInAnnotation: {equals: "NO"}``); the loader refuses them
unquoted rather than guess.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_dict, tag_for_keyword

from dicom_ai.yaml_model import StrictModel, located_error

__all__ = [
    "COMBINATORS",
    "SENDER_KEYS",
    "Condition",
    "Fallback",
    "IpAddress",
    "IpNetwork",
    "IpOps",
    "Role",
    "Rule",
    "RuleFile",
    "Scalar",
    "Study",
    "ValueOps",
]

SENDER_KEYS = ("calling_ae", "called_ae", "source_ip")
COMBINATORS = ("all", "any", "not")

Scalar = str | int | float
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_YAML_BOOLEAN_HINT = (
    'YAML read this as a boolean; quote it if you mean the text (e.g. "NO"), '
    "or use exists: for presence"
)


# --- value validators: plain functions so that each error is one clear line ----------


def _scalar(value: Any) -> Scalar:
    if isinstance(value, bool):
        raise ValueError(_YAML_BOOLEAN_HINT)
    if isinstance(value, float) and math.isnan(value):
        raise ValueError("NaN never equals anything")
    if isinstance(value, str | int | float):
        return value
    if value is None:
        raise ValueError("no value given; use exists: false to match a missing element")
    if isinstance(value, list | tuple):
        raise ValueError("must be one value; use in: [...] to accept any of several")
    raise ValueError(f"must be a string or a number, not {type(value).__name__} (quote it)")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    if math.isnan(value):
        raise ValueError("must be a number, not NaN")
    return float(value)


def _regex(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ValueError("must be a regular expression in a string (quote it)")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _ip_address(value: Any) -> IpAddress:
    if not isinstance(value, str):
        raise ValueError("must be an IP address (quote it)")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError as exc:
        hint = "; use in: [...] for a network" if "/" in value else ""
        raise ValueError(f"{value!r} is not an IP address{hint}") from exc


def _ip_network(value: Any) -> IpNetwork:
    if not isinstance(value, str):
        raise ValueError("must be an IP address or a CIDR network (quote it)")
    try:
        # strict: "10.1.2.3/8" has host bits set and is almost always a typo
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IP address or CIDR network: {exc}") from exc


_ScalarT = Annotated[Scalar, PlainValidator(_scalar)]
_NumberT = Annotated[float, PlainValidator(_number)]
_RegexT = Annotated[re.Pattern[str], PlainValidator(_regex)]
_BoolT = Annotated[bool, PlainValidator(_bool)]
_IpAddressT = Annotated[IpAddress, PlainValidator(_ip_address)]
_IpNetworkT = Annotated[IpNetwork, PlainValidator(_ip_network)]


def _rule_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty name (quote it if YAML reads it as a number)")
    if value != value.strip():
        raise ValueError(f"{value!r} has leading or trailing spaces")
    return value


def _word(value: Any) -> str:
    # Model ids and destination names are single words: they are keys in the node config.
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError("must be a name without spaces (quote it if YAML reads it as a number)")
    return value


RuleName = Annotated[str, PlainValidator(_rule_name)]
Name = Annotated[str, PlainValidator(_word)]


def _dicom_keyword(key: str) -> str:
    if tag_for_keyword(key) is None:
        candidates = [*keyword_dict, *SENDER_KEYS, *COMBINATORS]
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{key!r} is not a DICOM keyword nor one of all/any/not/"
            f"calling_ae/called_ae/source_ip{hint}"
        )
    return key


DicomKeyword = Annotated[str, PlainValidator(_dicom_keyword)]


# --- operators ------------------------------------------------------------------------


class _Ops(StrictModel):
    """Common checks: at least one operator, no nulls, exists: false stands alone."""

    @field_validator("*", mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        # Runs only for operators written in the file: "equals:" with nothing after it
        # would otherwise read as "operator not given".
        if value is None:
            raise ValueError("no value given")
        if value == []:
            raise ValueError("needs at least one value")
        return value

    @model_validator(mode="after")
    def _meaningful(self) -> _Ops:
        given = self.model_fields_set
        if not given:
            operators = ", ".join(f.alias or n for n, f in type(self).model_fields.items())
            raise ValueError(f"no operator given; use one of: {operators}")
        if getattr(self, "exists", None) is False and given != {"exists"}:
            raise located_error(
                ("exists",),
                "exists: false cannot be combined with other "
                "operators (a missing element matches nothing)",
            )
        return self


class ValueOps(_Ops):
    """Operators on a DICOM element or an AE title."""

    equals: _ScalarT | None = None
    in_: tuple[_ScalarT, ...] | None = Field(None, alias="in")
    regex: _RegexT | None = None
    gt: _NumberT | None = None
    ge: _NumberT | None = None
    lt: _NumberT | None = None
    le: _NumberT | None = None
    exists: _BoolT | None = None


class IpOps(_Ops):
    """Operators on the sender's IP address."""

    equals: _IpAddressT | None = None
    in_: tuple[_IpNetworkT, ...] | None = Field(None, alias="in")
    regex: _RegexT | None = None
    exists: _BoolT | None = None


# --- conditions -----------------------------------------------------------------------


class Condition(BaseModel):
    """A mapping whose entries must all hold; DICOM keywords are its extra keys."""

    # extra="allow" with a typed __pydantic_extra__: every other key is validated as a
    # DICOM keyword and its value as operators, with errors located at that key.
    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[DicomKeyword, ValueOps] = Field(init=False)

    all_: tuple[Condition, ...] | None = Field(None, alias="all")
    any_: tuple[Condition, ...] | None = Field(None, alias="any")
    not_: Condition | None = Field(None, alias="not")
    calling_ae: ValueOps | None = None
    called_ae: ValueOps | None = None
    source_ip: IpOps | None = None

    _order: tuple[str, ...] = PrivateAttr(default=())  # keys as written, for the trace

    @model_validator(mode="wrap")
    @classmethod
    def _validate(cls, data: Any, handler: ModelWrapValidatorHandler[Condition]) -> Condition:
        if isinstance(data, dict) and not data:
            raise ValueError("empty condition; leave out match: to match every series")
        condition = handler(data)
        if isinstance(data, dict):
            condition._order = tuple(str(key) for key in data)
        return condition

    @field_validator("all_", "any_", "not_", "calling_ae", "called_ae", "source_ip", mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("no condition given")
        if value == []:
            raise ValueError("needs at least one condition")
        return value

    def terms(self) -> Iterator[tuple[str, tuple[Condition, ...] | Condition | ValueOps | IpOps]]:
        """(key, value) in the order written: a tuple of conditions for all/any, a
        condition for not, `IpOps` for source_ip, `ValueOps` otherwise."""
        extra = self.model_extra or {}
        fields: dict[str, tuple[Condition, ...] | Condition | ValueOps | IpOps | None] = {
            "all": self.all_,
            "any": self.any_,
            "not": self.not_,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "source_ip": self.source_ip,
        }
        for key in self._order:
            value = fields[key] if key in fields else extra[key]
            if value is not None:
                yield key, value


# --- rules ----------------------------------------------------------------------------


def _check_route(route: Rule | Fallback) -> None:
    """A route's model and destinations must fit: results need somewhere to go."""
    if route.model is None and route.destinations:
        raise located_error(
            ("destinations",),
            "model: null runs nothing, so there is nothing to send; leave destinations empty",
        )
    if route.model is not None and not route.destinations:
        raise located_error(
            ("destinations",) if "destinations" in route.model_fields_set else ("model",),
            f"model {route.model!r} needs at least one destination for its results",
        )
    seen: set[str] = set()
    for index, destination in enumerate(route.destinations):
        if destination in seen:
            raise located_error(
                ("destinations", index), f"destination {destination!r} is listed twice"
            )
        seen.add(destination)


def _not_empty_match(value: Any) -> Any:
    # An empty "match:" is more likely a lost indent than a wish to match everything.
    if value is None:
        raise ValueError("match: is empty; leave it out to match every series")
    return value


class Role(StrictModel):
    """One input of a study rule: which series of the study fills it."""

    name: Name
    match: Condition | None = None  # omitted: any series the rule's own match takes
    required: _BoolT = True
    # Several series fit: the one received last (latest) or the one with the most
    # instances (most_slices, then latest).
    choose: Literal["latest", "most_slices"] = "latest"
    # Phases told apart by time: the position-th (1 = first) of the series fitting the
    # role, in the order of this element's value (AcquisitionTime, SeriesNumber, ...).
    order_by: DicomKeyword | None = None
    position: int | None = Field(None, ge=1, strict=True)

    _match_given = field_validator("match", mode="before")(_not_empty_match)

    @model_validator(mode="after")
    def _ordered(self) -> Role:
        if (self.order_by is None) != (self.position is None):
            raise located_error(
                ("position" if self.position is None else "order_by",),
                "order_by and position go together: the position-th series in that order",
            )
        return self


class Study(StrictModel):
    """A rule's inputs when its model reads several series of one study."""

    roles: tuple[Role, ...] = Field(min_length=1)
    # channels: the roles' images stacked as channels in role order (a missing optional
    # role is zeros); keys: each role's image under its name as a key of the bundle's input.
    input: Literal["channels", "keys"] = "channels"
    reference: Name | None = None  # whose grid the others are resampled onto; default: first
    deadline_seconds: float = Field(600.0, gt=0)
    at_deadline: Literal["fail", "wait"] = "fail"

    @model_validator(mode="after")
    def _roles_fit(self) -> Study:
        seen: dict[str, int] = {}
        for index, role in enumerate(self.roles):
            if role.name in seen:
                raise located_error(
                    ("roles", index, "name"),
                    f"role {role.name!r} is already roles[{seen[role.name]}]",
                )
            seen[role.name] = index
        if self.reference is not None:
            if self.reference not in seen:
                raise located_error(
                    ("reference",), f"{self.reference!r} is not one of the roles {list(seen)}"
                )
            if not self.roles[seen[self.reference]].required:
                raise located_error(
                    ("reference",), f"the reference role {self.reference!r} must be required"
                )
        elif not self.roles[0].required:
            raise located_error(
                ("roles", 0, "required"),
                "the first role is the reference (results lie on its grid): it must be "
                "required, or name another required role as reference",
            )
        return self

    @property
    def reference_role(self) -> str:
        return self.reference or self.roles[0].name


class Rule(StrictModel):
    """One routing rule."""

    name: RuleName
    priority: int = Field(0, strict=True)
    match: Condition | None = None
    model: Name | None  # required, so that "run nothing" is always written down
    destinations: tuple[Name, ...] = ()
    continue_: _BoolT = Field(False, alias="continue")
    # Also send an RGB Secondary Capture series with the segment outlines burned in, for
    # viewers that cannot show SEG.
    preview: _BoolT = False
    # Also send a result card: one Secondary Capture image summing up the findings (model,
    # table of findings, key image), for PACS that show neither SEG nor SR.
    card: _BoolT = False
    # Jobs of this rule run before every queued normal job: always, or when the condition
    # holds for the series (its header or sender).
    urgent: _BoolT | Condition = False
    study: Study | None = None  # the model reads several series of one study, by role

    @field_validator("urgent", mode="before")
    @classmethod
    def _urgent_given(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("urgent: is empty; write true, false or a condition")
        return value

    _match_given = field_validator("match", mode="before")(_not_empty_match)

    @model_validator(mode="after")
    def _route_fits(self) -> Rule:
        _check_route(self)
        if self.study is not None and self.model is None:
            raise located_error(("study",), "a study rule needs a model to run on its roles")
        return self


class Fallback(StrictModel):
    """The route for a series that no rule matched."""

    name: RuleName
    model: Name | None
    destinations: tuple[Name, ...] = ()
    preview: _BoolT = False
    card: _BoolT = False

    @model_validator(mode="after")
    def _route_fits(self) -> Fallback:
        _check_route(self)
        return self


class RuleFile(StrictModel):
    """A whole rules file."""

    rules: tuple[Rule, ...]
    fallback: Fallback | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> RuleFile:
        first: dict[str, int] = {}
        for index, rule in enumerate(self.rules):
            if rule.name in first:
                raise located_error(
                    ("rules", index, "name"),
                    f"rule name {rule.name!r} is already used by rules[{first[rule.name]}]",
                )
            first[rule.name] = index
        if self.fallback is not None and self.fallback.name in first:
            raise located_error(
                ("fallback", "name"),
                f"fallback name {self.fallback.name!r} is already used by "
                f"rules[{first[self.fallback.name]}]",
            )
        return self

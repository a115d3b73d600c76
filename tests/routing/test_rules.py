"""Routing rules: schema validation (errors name file:line) and evaluation."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pydantic
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_ai.config import DEFAULT_RULES
from dicom_ai.errors import ConfigError
from dicom_ai.routing import (
    Evaluation,
    RuleSet,
    SenderContext,
    load_rules,
    parse_rules,
)
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets
from dicom_ai.yaml_model import StrictModel, load_validated, loads_validated

SENDER = SenderContext(calling_ae="CT_SCANNER_1", called_ae="DICOM_AI", source_ip="10.20.30.40")


def ct_header(**elements: object) -> Dataset:
    header = Dataset()
    header.Modality = "CT"
    header.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    header.SliceThickness = "2.5"
    header.SeriesDescription = "CHEST ABDOMEN 2.5mm"
    header.PixelSpacing = ["0.78125", "0.78125"]
    header.PatientName = "DOE^JANE"
    for keyword, value in elements.items():
        if value is None:
            delattr(header, keyword)
        else:
            setattr(header, keyword, value)
    return header


def mr_header() -> Dataset:
    return ct_header(Modality="MR", SliceThickness="4", SeriesDescription="T1 AX BRAIN")


def rules_yaml(match: str | None = None, extra: str = "") -> str:
    """One rule 'r' with the given match block (YAML, indented as under `match:`)."""
    text = "rules:\n  - name: r\n"
    if match is not None:
        text += "    match:\n" + textwrap.indent(textwrap.dedent(match).strip("\n"), " " * 6)
        text += "\n"
    text += "    model: m\n    destinations: [pacs]\n" + extra
    return text


def matches(match: str, header: Dataset | None = None, sender: SenderContext = SENDER) -> bool:
    evaluation = parse_rules(rules_yaml(match)).evaluate(
        ct_header() if header is None else header, sender
    )
    return [decision.rule for decision in evaluation.decisions] == ["r"]


def routed(ruleset: RuleSet, header: Dataset, sender: SenderContext = SENDER) -> list[str]:
    return [decision.rule for decision in ruleset.evaluate(header, sender).decisions]


def config_error(text: str, source: str = "test.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_rules(text, source)
    return str(info.value)


# --- operators ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ("Modality: {equals: CT}", True),
        ("Modality: {equals: MR}", False),
        ("Modality: {equals: ct}", False),  # case matters: DICOM code strings are upper case
        ("SeriesDescription: {equals: CHEST}", False),  # whole value, not a substring
        ("SliceThickness: {equals: 2.5}", True),  # numeric compare
        ("SliceThickness: {equals: 3}", False),
        ("SliceThickness: {equals: '2.5'}", True),  # text compare against the value as written
        ("Modality: {in: [MR, CT, PT]}", True),
        ("Modality: {in: [MR, PT]}", False),
        ("SliceThickness: {in: [1, 2.5]}", True),
        ("SliceThickness: {in: [1, 2]}", False),
        ("SeriesDescription: {regex: 'ABDOMEN'}", True),  # re.search: anywhere in the value
        ("SeriesDescription: {regex: '^ABDOMEN'}", False),
        ("SeriesDescription: {regex: '(?i)chest'}", True),
        ("SeriesDescription: {regex: 'chest'}", False),
        ("SliceThickness: {gt: 2}", True),
        ("SliceThickness: {gt: 2.5}", False),
        ("SliceThickness: {ge: 2.5}", True),
        ("SliceThickness: {ge: 3}", False),
        ("SliceThickness: {lt: 3}", True),
        ("SliceThickness: {lt: 2.5}", False),
        ("SliceThickness: {le: 2.5}", True),
        ("SliceThickness: {le: 2}", False),
        ("SliceThickness: {gt: 1, le: 5}", True),  # several operators: all must hold
        ("SliceThickness: {gt: 1, le: 2}", False),
        ("SeriesDescription: {le: 1000}", False),  # not a number: numeric ops do not match
        ("Modality: {exists: true}", True),
        ("Modality: {exists: false}", False),
        ("ContrastBolusAgent: {exists: true}", False),
        ("ContrastBolusAgent: {exists: false}", True),
        ("Modality: {exists: true, equals: CT}", True),
        ("Modality: {exists: true, equals: MR}", False),
    ],
)
def test_operator(match: str, expected: bool) -> None:
    assert matches(match) is expected


def test_string_compare_ignores_dicom_padding() -> None:
    header = ct_header(SeriesDescription=" CHEST  ", StationName="CT01\x00")
    assert matches("SeriesDescription: {equals: CHEST}", header)
    assert matches("StationName: {equals: CT01}", header)
    assert matches("SeriesDescription: {regex: '^CHEST$'}", header)


def test_multi_valued_element_matches_if_any_value_matches() -> None:
    assert matches("ImageType: {equals: AXIAL}")
    assert matches("ImageType: {in: [LOCALIZER, PRIMARY]}")
    assert matches("ImageType: {regex: '^AX'}")
    assert not matches("ImageType: {equals: LOCALIZER}")
    assert not matches("ImageType: {in: [LOCALIZER, DERIVED]}")
    assert not matches("ImageType: {equals: 'ORIGINAL\\\\PRIMARY\\\\AXIAL'}")  # values, not text
    assert matches("PixelSpacing: {lt: 1}")
    assert not matches("PixelSpacing: {gt: 1}")


@pytest.mark.parametrize(
    "ops",
    [
        "{equals: CT}",
        "{in: [CT]}",
        "{regex: '.*'}",
        "{gt: 0}",
        "{ge: 0}",
        "{lt: 99}",
        "{le: 99}",
        "{exists: true}",
    ],
)
def test_missing_element_matches_nothing_but_exists_false(ops: str) -> None:
    header = ct_header(SliceThickness=None)
    assert not matches(f"SliceThickness: {ops}", header)
    assert matches("SliceThickness: {exists: false}", header)


def test_empty_element_counts_as_missing() -> None:
    header = ct_header(SliceThickness="", SeriesDescription="")  # Type 2: zero length
    assert matches("SliceThickness: {exists: false}", header)
    assert not matches("SeriesDescription: {exists: true}", header)
    assert not matches("SeriesDescription: {regex: '.*'}", header)


def test_sequence_exists() -> None:
    item = Dataset()
    item.CodeValue = "T-D0050"
    header = ct_header(AnatomicRegionSequence=[item])
    assert matches("AnatomicRegionSequence: {exists: true}", header)
    assert not matches("AnatomicRegionSequence: {exists: true}")
    assert not matches("AnatomicRegionSequence: {equals: T-D0050}", header)


@pytest.mark.filterwarnings("ignore")
def test_malformed_element_does_not_match_and_does_not_raise() -> None:
    header = ct_header(SliceThickness=None)
    header[0x00180050] = RawDataElement(Tag(0x00180050), "DS", 4, b"thin", 0, False, True)
    assert not matches("SliceThickness: {le: 5}", header)
    assert matches("SliceThickness: {gt: 0}", ct_header())


# --- combinators ----------------------------------------------------------------------


def test_all() -> None:
    assert matches("all: [{Modality: {equals: CT}}, {SliceThickness: {le: 5}}]")
    assert not matches("all: [{Modality: {equals: CT}}, {SliceThickness: {le: 1}}]")


def test_any() -> None:
    assert matches("any: [{Modality: {equals: MR}}, {SliceThickness: {le: 5}}]")
    assert not matches("any: [{Modality: {equals: MR}}, {SliceThickness: {le: 1}}]")


def test_not() -> None:
    assert matches("not: {Modality: {equals: MR}}")
    assert not matches("not: {Modality: {equals: CT}}")


def test_several_keys_in_one_mapping_all_must_hold() -> None:
    assert matches("Modality: {equals: CT}\nSliceThickness: {le: 5}")
    assert not matches("Modality: {equals: CT}\nSliceThickness: {le: 1}")
    assert not matches("Modality: {equals: MR}\nSliceThickness: {le: 5}")


NESTED = """
all:
  - Modality: {equals: CT}
  - not:
      any:
        - ImageType: {regex: LOCALIZER}
        - SliceThickness: {gt: 5}
  - any:
      - SeriesDescription: {regex: CHEST}
      - calling_ae: {equals: CT_ER}
"""


def test_nesting() -> None:
    assert matches(NESTED)
    assert not matches(NESTED, ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    assert not matches(NESTED, ct_header(SliceThickness="10"))
    assert not matches(NESTED, ct_header(SeriesDescription="HEAD"))
    er = SenderContext("CT_ER", "DICOM_AI", "10.0.0.1")
    assert matches(NESTED, ct_header(SeriesDescription="HEAD"), er)
    assert not matches(NESTED, mr_header(), er)


# --- sender context -------------------------------------------------------------------


def test_ae_titles() -> None:
    assert matches("calling_ae: {equals: CT_SCANNER_1}")
    assert not matches("calling_ae: {equals: CT_SCANNER_2}")
    assert matches("called_ae: {in: [DICOM_AI, OTHER]}")
    assert not matches("called_ae: {in: [OTHER]}")
    assert matches("calling_ae: {regex: '^CT_'}")
    padded = SenderContext("CT_SCANNER_1    ", "DICOM_AI        ", "10.20.30.40")
    assert matches("calling_ae: {equals: CT_SCANNER_1}", sender=padded)


def test_source_ip() -> None:
    assert matches("source_ip: {equals: 10.20.30.40}")
    assert not matches("source_ip: {equals: 10.20.30.41}")
    assert matches("source_ip: {in: [192.168.0.0/16, 10.20.0.0/16]}")
    assert not matches("source_ip: {in: [192.168.0.0/16, 10.21.0.0/16]}")
    assert matches("source_ip: {in: [10.20.30.40]}")  # a single address
    assert matches(
        "source_ip: {in: ['2001:db8::/32']}", sender=SenderContext("A", "B", "2001:db8::7")
    )
    # A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6 addresses.
    mapped = SenderContext("A", "B", "::ffff:10.20.30.40")
    assert matches("source_ip: {in: [10.20.0.0/16]}", sender=mapped)
    assert matches("source_ip: {equals: 10.20.30.40}", sender=mapped)
    unknown = SenderContext("A", "B", "not-an-address")
    assert not matches("source_ip: {in: [0.0.0.0/0]}", sender=unknown)
    assert not matches("source_ip: {exists: true}", sender=SenderContext("A", "B", ""))


# --- rule order, continue, fallback -----------------------------------------------------

ORDERED = """
rules:
  - name: low
    priority: 1
    model: m-low
    destinations: [pacs]
  - name: high
    priority: 10
    model: m-high
    destinations: [pacs]
  - name: low-too
    priority: 1
    model: m-low-too
    destinations: [pacs]
"""


def test_priority_order_and_first_match_wins() -> None:
    ruleset = parse_rules(ORDERED)
    assert [rule.name for rule in ruleset.rules] == ["high", "low", "low-too"]  # ties: file
    evaluation = ruleset.evaluate(ct_header(), SENDER)
    assert [d.rule for d in evaluation.decisions] == ["high"]
    assert [(t.rule, t.matched, t.routed, t.shadowed_by) for t in evaluation.trace] == [
        ("high", True, True, None),
        ("low", True, False, "high"),
        ("low-too", True, False, "high"),
    ]


def test_continue_keeps_evaluating() -> None:
    text = ORDERED.replace("model: m-high\n", "model: m-high\n    continue: true\n")
    evaluation = parse_rules(text).evaluate(ct_header(), SENDER)
    assert [(d.rule, d.model) for d in evaluation.decisions] == [
        ("high", "m-high"),
        ("low", "m-low"),
    ]
    assert [t.routed for t in evaluation.trace] == [True, True, False]


FALLBACK = """
rules:
  - name: ct
    match:
      Modality: {equals: CT}
    model: ct-body
    destinations: [pacs]
fallback:
  name: unmatched
  model: null
"""


def test_fallback_only_when_no_rule_matched() -> None:
    ruleset = parse_rules(FALLBACK)
    ct = ruleset.evaluate(ct_header(), SENDER)
    assert [(d.rule, d.model) for d in ct.decisions] == [("ct", "ct-body")]
    assert [(t.rule, t.routed) for t in ct.trace] == [("ct", True), ("unmatched", False)]
    mr = ruleset.evaluate(mr_header(), SENDER)
    assert [(d.rule, d.model, d.destinations) for d in mr.decisions] == [("unmatched", None, ())]
    assert mr.decisions[0].reasons == ("no rule matched",)


def test_unmatched_without_fallback_gives_no_decision() -> None:
    evaluation = parse_rules(FALLBACK.split("fallback:")[0]).evaluate(mr_header(), SENDER)
    assert evaluation.decisions == ()
    assert len(evaluation.trace) == 1
    assert evaluation.trace[0].reasons == ("Modality 'MR' does not equal 'CT'",)


def test_null_model_rule_claims_the_series() -> None:
    text = """
rules:
  - name: skip-localizers
    priority: 100
    match:
      ImageType: {regex: LOCALIZER}
    model: null
  - name: ct
    model: ct-body
    destinations: [pacs]
"""
    ruleset = parse_rules(text)
    scout = ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    evaluation = ruleset.evaluate(scout, SENDER)
    assert [(d.rule, d.model, d.destinations) for d in evaluation.decisions] == [
        ("skip-localizers", None, ())
    ]
    assert routed(ruleset, ct_header()) == ["ct"]
    assert ruleset.models == frozenset({"ct-body"})


# --- reasons and trace ------------------------------------------------------------------


def test_reasons_say_why() -> None:
    text = rules_yaml("""
all:
  - Modality: {equals: CT}
  - SliceThickness: {le: 5}
  - ImageType: {in: [AXIAL]}
  - not: {SeriesDescription: {regex: LOCALIZER}}
""")
    evaluation = parse_rules(text).evaluate(ct_header(), SENDER)
    assert evaluation.decisions[0].reasons == (
        "Modality 'CT' equals 'CT'",
        "SliceThickness 2.5 <= 5",
        "ImageType 'AXIAL' is in ['AXIAL']",
        "SeriesDescription 'CHEST ABDOMEN 2.5mm' does not match regex 'LOCALIZER'",
    )


def test_trace_gives_first_failing_reason() -> None:
    text = rules_yaml("""
all:
  - Modality: {equals: CT}
  - SliceThickness: {lt: 2}
  - SeriesDescription: {regex: HEAD}
""")
    evaluation = parse_rules(text).evaluate(ct_header(), SENDER)
    assert evaluation.decisions == ()
    (trace,) = evaluation.trace
    assert (trace.rule, trace.matched, trace.routed) == ("r", False, False)
    assert trace.reasons == ("SliceThickness 2.5 is not < 2",)
    assert trace.describe() == "r (priority 0): no match: SliceThickness 2.5 is not < 2"


def test_trace_of_failed_any_and_not() -> None:
    any_rules = parse_rules(
        rules_yaml("any: [{Modality: {equals: MR}}, {calling_ae: {equals: X}}]")
    )
    (trace,) = any_rules.evaluate(ct_header(), SENDER).trace
    assert trace.reasons == (
        "none of any matched: Modality 'CT' does not equal 'MR'; "
        "calling_ae 'CT_SCANNER_1' does not equal 'X'",
    )
    not_rules = parse_rules(rules_yaml("not: {ImageType: {equals: AXIAL}}"))
    (trace,) = not_rules.evaluate(ct_header(), SENDER).trace
    assert trace.reasons == ("excluded by not: ImageType 'AXIAL' equals 'AXIAL'",)
    missing = parse_rules(rules_yaml("ContrastBolusAgent: {equals: IODINE}"))
    (trace,) = missing.evaluate(ct_header(), SENDER).trace
    assert trace.reasons == ("ContrastBolusAgent is missing",)


def test_patient_identity_is_redacted_in_reasons() -> None:
    ruleset = parse_rules(rules_yaml("PatientName: {regex: DOE}"))
    evaluation = ruleset.evaluate(ct_header(), SENDER)
    assert evaluation.decisions[0].reasons == ("PatientName <redacted> matches regex 'DOE'",)
    assert "JANE" not in repr(evaluation)


def test_evaluation_is_a_frozen_value() -> None:
    evaluation = parse_rules(FALLBACK).evaluate(ct_header(), SENDER)
    assert isinstance(evaluation, Evaluation)
    with pytest.raises(AttributeError):
        evaluation.decisions = ()  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        parse_rules(FALLBACK).rules[0].model = "other"


# --- load errors name the line ----------------------------------------------------------


def test_unknown_keyword_is_refused_with_line_and_suggestion() -> None:
    message = config_error(rules_yaml("all:\n  - Modality: {equals: CT}\n  - Modalty: {in: [MR]}"))
    assert message.startswith("test.yaml:6: rules[0].match.all[1].Modalty: ")
    assert "'Modalty' is not a DICOM keyword" in message
    assert "did you mean 'Modality'?" in message


def test_bad_regex_is_refused_with_line() -> None:
    message = config_error(rules_yaml("SeriesDescription: {regex: 'CHEST[' }"))
    assert message.startswith("test.yaml:4: rules[0].match.SeriesDescription.regex: ")
    assert "invalid regular expression 'CHEST['" in message


def test_typo_in_rule_field_is_refused_with_line() -> None:
    message = config_error(rules_yaml(extra="    priorty: 5\n"))
    assert message == (
        "test.yaml:5: rules[0].priorty: unknown field 'priorty'; did you mean 'priority'? "
        "expected: name, priority, match, model, destinations, continue, preview, card, "
        "urgent, study"
    )


def test_typo_in_operator_is_refused_with_line() -> None:
    message = config_error(rules_yaml("Modality: {equal: CT}"))
    assert message.startswith("test.yaml:4: rules[0].match.Modality.equal: unknown field")
    assert "did you mean 'equals'?" in message


def test_every_error_is_reported_in_file_order() -> None:
    text = """\
rules:
  - name: a
    match:
      all:
        - Modality: {equals: [CT]}
        - SliceThickness: {le: thin}
        - source_ip: {in: [10.1.2.3/8]}
    model: m
    destinations: [pacs]
    continue: maybe
"""
    lines = config_error(text).splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        "test.yaml:5",
        "test.yaml:6",
        "test.yaml:7",
        "test.yaml:10",
    ]
    assert lines[0] == (
        "test.yaml:5: rules[0].match.all[0].Modality.equals: "
        "must be one value; use in: [...] to accept any of several"
    )
    assert "has host bits set" in lines[2]


def test_wrong_type_names_the_field() -> None:
    message = config_error(
        "rules:\n  - name: a\n    priority: high\n    model: m\n    destinations: [pacs]\n"
    )
    assert message.startswith("test.yaml:3: rules[0].priority: Input should be a valid integer")


def test_yaml_boolean_is_refused_with_a_hint() -> None:
    message = config_error(rules_yaml("BurnedInAnnotation: {equals: NO}"))
    assert message.startswith("test.yaml:4: rules[0].match.BurnedInAnnotation.equals: ")
    assert "quote it" in message
    assert matches("BurnedInAnnotation: {equals: 'NO'}", ct_header(BurnedInAnnotation="NO"))


def test_malformed_yaml_names_the_line() -> None:
    text = "rules:\n  - name: a\n    model: m\n    destinations: [pacs\n  - name: b\n"
    message = config_error(text)
    # PyYAML notices the unclosed bracket where the next mapping starts
    assert re.match(r"test\.yaml:5: invalid YAML: .*flow sequence at line 4", message), message
    message = config_error("rules:\n  - name: a\n   model: m\n")
    assert message.startswith("test.yaml:3: invalid YAML:"), message


def test_tab_indentation_is_explained() -> None:
    message = config_error("rules:\n\t- name: a\n")
    assert message.startswith("test.yaml:2: invalid YAML:")
    assert "not tabs" in message


def test_duplicate_yaml_key_is_refused() -> None:
    message = config_error(
        "rules:\n  - name: a\n    model: m\n    model: n\n    destinations: [pacs]\n"
    )
    assert message == "test.yaml:4: duplicate key 'model' (first given at line 3)"


def test_duplicate_rule_name_is_refused() -> None:
    text = FALLBACK.replace("name: unmatched", "name: ct")
    assert config_error(text) == (
        "test.yaml:9: fallback.name: fallback name 'ct' is already used by rules[0]"
    )
    two = rules_yaml() + "  - name: r\n    model: n\n    destinations: [pacs]\n"
    assert config_error(two).startswith("test.yaml:5: rules[1].name: rule name 'r' is already")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            rules_yaml().replace("model: m", "model: null"),
            "test.yaml:4: rules[0].destinations: model: null runs nothing",
        ),
        (
            rules_yaml().replace("    destinations: [pacs]\n", ""),
            "test.yaml:3: rules[0].model: model 'm' needs at least one destination",
        ),
        (
            rules_yaml().replace("[pacs]", "[pacs, pacs]"),
            "test.yaml:4: rules[0].destinations[1]: destination 'pacs' is listed twice",
        ),
        (rules_yaml().replace("    model: m\n", ""), "test.yaml:2: rules[0].model: Field required"),
        (rules_yaml("{}"), "test.yaml:3: rules[0].match: empty condition"),
        (
            "rules:\n  - name: r\n    match:\n    model: m\n    destinations: [pacs]\n",
            "test.yaml:3: rules[0].match: match: is empty",
        ),
        (rules_yaml("all: []"), "test.yaml:4: rules[0].match.all: needs at least one condition"),
        (rules_yaml("not:"), "test.yaml:4: rules[0].match.not: no condition given"),
        (rules_yaml("Modality: {in: []}"), "test.yaml:4: rules[0].match.Modality.in: needs at"),
        (rules_yaml("Modality: {}"), "test.yaml:4: rules[0].match.Modality: no operator given"),
        (rules_yaml("Modality: {equals: }"), "test.yaml:4: rules[0].match.Modality.equals: no"),
        (
            rules_yaml("Modality: {exists: false, equals: CT}"),
            "test.yaml:4: rules[0].match.Modality.exists: exists: false cannot be combined",
        ),
        (
            rules_yaml("SliceThickness: {le: '5'}"),
            "test.yaml:4: rules[0].match.SliceThickness.le: must be a number",
        ),
        (
            rules_yaml("source_ip: {gt: 1}"),
            "test.yaml:4: rules[0].match.source_ip.gt: unknown field 'gt'",
        ),
        (
            rules_yaml("source_ip: {equals: 10.0.0.0/8}"),
            "test.yaml:4: rules[0].match.source_ip.equals: '10.0.0.0/8' is not an IP address",
        ),
        (
            "rules:\n  - name: r\n    model: m\n    destinations: pacs\n",
            "test.yaml:4: rules[0].destinations: Input should be a valid tuple",
        ),
        (
            "rules:\n  - name: r\n    model: two words\n    destinations: [pacs]\n",
            "test.yaml:3: rules[0].model: must be a name without spaces",
        ),
        (
            "rules:\n  - name: r\n    model: m\n    destinations: [pacs]\n    continue: 1\n",
            "test.yaml:5: rules[0].continue: must be true or false",
        ),
        ("- name: r\n", "test.yaml:1: (top level): must be a mapping"),
        ("", "test.yaml: rules: Field required"),
        ("rules: []\n---\nrules: []\n", "test.yaml:2: invalid YAML:"),
        ("rules: !!python/object/apply:os.system [echo]\n", "test.yaml:1: invalid YAML:"),
    ],
)
def test_invalid_rules_are_refused(text: str, expected: str) -> None:
    assert config_error(text).startswith(expected)


def test_load_rules_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(rules_yaml("Modalty: {equals: CT}"), encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: rules[0].match.Modalty: ")):
        load_rules(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")
    path.write_bytes(b"rules: [\xff]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_rules(path)


# --- the generic loader -------------------------------------------------------------------


class _Port(StrictModel):
    host: str
    port: int = 104


class _Node(StrictModel):
    ae_title: str
    peers: dict[str, _Port] = pydantic.Field(default_factory=dict)


def test_load_validated_is_generic(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(
        "ae_title: DICOM_AI\npeers:\n  pacs:\n    host: pacs.local\n    port: 11112\n",
        encoding="utf-8",
    )
    node = load_validated(path, _Node)
    assert node.peers["pacs"].port == 11112
    with pytest.raises(ConfigError) as info:
        loads_validated("ae_title: X\npeers:\n  pacs:\n    host: h\n    prot: 1\n", _Node, "n.yaml")
    assert str(info.value).startswith("n.yaml:5: peers.pacs.prot: unknown field 'prot'; did you")
    with pytest.raises(ConfigError) as info:
        loads_validated("ae_title: X\npeers:\n  pacs:\n    port: x\n", _Node, "n.yaml")
    assert str(info.value).splitlines() == [
        "n.yaml:3: peers.pacs.host: Field required",
        "n.yaml:4: peers.pacs.port: Input should be a valid integer, unable to parse string "
        "as an integer",
    ]


# --- the shipped default rules --------------------------------------------------------------


def test_default_rules_route_ct_to_ct_body() -> None:
    ruleset = load_rules(DEFAULT_RULES)
    assert ruleset.models == frozenset({"ct-body", "mr-brain"})
    assert ruleset.destinations == frozenset({"pacs"})
    phantom = next(phantom_ct_datasets(PhantomSpec(slices=1, rows=8, columns=8)))
    evaluation = ruleset.evaluate(phantom, SENDER)
    assert [(d.rule, d.model, d.destinations) for d in evaluation.decisions] == [
        ("ct-body", "ct-body", ("pacs",))
    ]
    assert evaluation.decisions[0].reasons[0] == "Modality 'CT' equals 'CT'"


def test_default_rules_route_head_t1_to_mr_brain_only() -> None:
    ruleset = load_rules(DEFAULT_RULES)
    (decision,) = ruleset.evaluate(mr_header(), SENDER).decisions
    assert (decision.rule, decision.model) == ("mr-brain-t1", "mr-brain")
    t2 = ct_header(Modality="MR", SeriesDescription="T2 TSE AX BRAIN", BodyPartExamined="HEAD")
    knee = ct_header(Modality="MR", SeriesDescription="T1 SAG KNEE", BodyPartExamined="KNEE")
    for header in (t2, knee):
        assert ruleset.evaluate(header, SENDER).decisions == ()


def test_default_rules_leave_localizers_unrouted() -> None:
    ruleset = load_rules(DEFAULT_RULES)
    scout = ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    evaluation = ruleset.evaluate(scout, SENDER)
    assert evaluation.decisions == ()
    assert evaluation.trace[0].reasons == (
        "excluded by not: ImageType 'LOCALIZER' matches regex 'LOCALIZER'",
    )


def test_default_rules_examples_are_valid() -> None:
    """The commented examples in the default rules load once uncommented."""
    lines = DEFAULT_RULES.read_text(encoding="utf-8").splitlines()
    begin = next(i for i, line in enumerate(lines) if "examples begin" in line)
    end = next(i for i, line in enumerate(lines) if "examples end" in line)
    body = [
        line.replace("# ", "", 1) if line.strip() != "#" else "" for line in lines[begin + 1 : end]
    ]
    ruleset = parse_rules("rules:\n" + "\n".join(body) + "\n", "examples")
    assert len(ruleset.rules) == 7
    ops = {"equals", "in", "regex", "gt", "le", "exists", "any", "calling_ae", "source_ip"}
    text = "\n".join(body)
    assert all(f"{op}:" in text for op in ops)
    elsewhere = SenderContext("CT_2", "DICOM_AI", "172.16.0.9")
    assert routed(ruleset, ct_header(SeriesDescription="CHEST"), elsewhere) == ["example-regex"]
    assert routed(ruleset, ct_header(SeriesDescription="ABDOMEN"), elsewhere) == ["example-numbers"]
    trauma = SenderContext("CT_ER_1", "DICOM_AI", "10.0.0.1")
    assert routed(ruleset, ct_header(), trauma) == ["example-any-and-sender", "example-regex"]
    assert routed(ruleset, ct_header(SeriesDescription="DOSE REPORT")) == [
        "example-skip-dose-reports"
    ]


def test_preview_switch_reaches_the_decision() -> None:
    ruleset = parse_rules(rules_yaml("Modality: {equals: CT}", extra="    preview: true\n"), "t")
    (decision,) = ruleset.evaluate(ct_header(), SENDER).decisions
    assert decision.preview is True
    (plain,) = (
        parse_rules(rules_yaml("Modality: {equals: CT}"), "t")
        .evaluate(ct_header(), SENDER)
        .decisions
    )
    assert plain.preview is False
    message = config_error(rules_yaml(extra="    preview: maybe\n"))
    assert message.startswith("test.yaml:5: rules[0].preview")


def test_card_switch_reaches_the_decision() -> None:
    ruleset = parse_rules(rules_yaml("Modality: {equals: CT}", extra="    card: true\n"), "t")
    (decision,) = ruleset.evaluate(ct_header(), SENDER).decisions
    assert (decision.card, decision.preview) == (True, False)
    message = config_error(rules_yaml(extra="    card: often\n"))
    assert message.startswith("test.yaml:5: rules[0].card")

"""Load a YAML file into a validated pydantic model; every error names file, line and field.

    >>> config = load_validated(Path("rules/default.yaml"), RuleFile)

A bad file raises `ConfigError` with one line per problem, in the form compilers use::

    rules/default.yaml:14: rules[2].match.Modality.equals: must be a string or a number

YAML is read with PyYAML's safe loader (no Python tags, no code). The node tree is kept
so that a pydantic error location such as ``('rules', 2, 'match')`` can be traced back to
the line it came from. Duplicate keys in a mapping, which PyYAML silently resolves to the
last one, are refused: in a config file they are always a mistake.

Validators that check one field against another can point at the field they blame by
raising `located_error(("rules", 3, "name"), "...")`: the location is relative to the
model being validated and is appended to pydantic's own location.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from dicom_ai.errors import ConfigError

__all__ = [
    "Loc",
    "StrictModel",
    "YamlDocument",
    "format_loc",
    "load_validated",
    "loads_validated",
    "located_error",
    "parse_yaml",
    "read_yaml",
    "validate_data",
]

Loc = tuple[str | int, ...]
"""A field path as pydantic reports it: mapping keys and sequence indexes."""

M = TypeVar("M", bound=BaseModel)

_AT = "yaml_model_at"  # ctx key that carries a located_error's relative location
_MAX_ERRORS = 20  # a file that is wrong everywhere needs its first errors, not all of them
_MAX_NODES = 100_000  # values in a document, aliases expanded: far more than any real file


def located_error(loc: Sequence[str | int], message: str) -> PydanticCustomError:
    """An error for a validator to raise that blames `loc` (relative to the model validated).

    The message goes through the context, so braces in it (a regex, say) stay as written.
    """
    return PydanticCustomError("located_error", "{message}", {"message": message, _AT: tuple(loc)})


def format_loc(loc: Sequence[str | int]) -> str:
    """``('rules', 2, 'match', 'Modality')`` -> ``rules[2].match.Modality``."""
    text = ""
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else str(item)
    return text or "(top level)"


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML document: its plain data, and the node tree that knows the lines."""

    source: str
    data: Any
    root: yaml.Node | None

    def line_of(self, loc: Sequence[str | int]) -> int | None:
        """The 1-based line that `loc` points at, or the nearest enclosing line that exists.

        Steps that are not in the document are skipped: a missing field (blamed on its
        parent mapping) or a name pydantic adds for itself (a union member's tag).
        """
        node = self.root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for item in loc:
            found = _child(node, item)
            if found is not None:
                line, node = found
        return line

    def error(self, loc: Sequence[str | int], message: str) -> ConfigError:
        """A `ConfigError` for a problem found after validation, with file and line."""
        return ConfigError(_format_problem(self.source, self.line_of(loc), loc, message))


def _child(node: yaml.Node, item: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            # A field's line is its key's line: that is where the reader sees its name.
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(item):
                return key_node.start_mark.line + 1, value_node
        return None
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(item, int)
        and not isinstance(item, bool)
        and 0 <= item < len(node.value)
    ):
        child: yaml.Node = node.value[item]
        return child.start_mark.line + 1, child
    return None


def _format_problem(source: str, line: int | None, loc: Sequence[str | int], message: str) -> str:
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {format_loc(loc)}: {message}"


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return ConfigError(f"{source}: invalid YAML: {exc}")
    mark = exc.problem_mark
    message = f"{source}:{mark.line + 1}: invalid YAML: {exc.problem} (column {mark.column + 1})"
    if exc.context:
        # The context names where the broken construct began, often lines earlier
        # (an unclosed bracket is only noticed at the end of the file).
        start = exc.context_mark
        began = f" at line {start.line + 1}" if start is not None else ""
        message += f"; {exc.context}{began}"
    if "\\t" in (exc.problem or ""):
        message += " (YAML indents with spaces, not tabs)"
    return ConfigError(message)


def _check_duplicate_keys(root: yaml.Node, source: str) -> None:
    seen_nodes: set[int] = set()  # anchors and aliases share nodes; visit each once
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                stack.append(value_node)
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise ConfigError(
                        f"{source}:{line}: duplicate key {key_node.value!r}"
                        f" (first given at line {first_line[key]})"
                    )
                first_line[key] = line
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _check_size(root: yaml.Node, source: str) -> None:
    """A few anchors and aliases can stand for billions of values ("billion laughs"), which
    validation would then walk one by one: count the values as if the aliases were copies."""
    stack: list[yaml.Node] = [root]
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise ConfigError(
                f"{source}: more than {_MAX_NODES} values once its YAML aliases are expanded"
            )
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                stack.extend((key_node, value_node))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse_yaml(text: str, source: str = "<string>") -> YamlDocument:
    """Parse one YAML document safely, keeping its node tree for line numbers."""
    try:
        loader = yaml.SafeLoader(text)  # refuses NUL and other control characters at once
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from exc
    try:
        root = loader.get_single_node()
        if root is None:  # an empty file, or only comments: no settings given
            return YamlDocument(source, {}, None)
        _check_duplicate_keys(root, source)
        _check_size(root, source)
        return YamlDocument(source, loader.construct_document(root), root)
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from exc
    except RecursionError:  # PyYAML composes nested brackets recursively
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> YamlDocument:
    """Read and parse a YAML file; the file name as given is used in messages."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    return parse_yaml(text, source)


def _describe(error: ErrorDetails) -> tuple[Loc, str]:
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    at = ctx.get(_AT)
    if isinstance(at, tuple):
        loc = (*loc, *at)
    message = error["msg"]
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        found = type(error["input"]).__name__
        message = f"must be a mapping of 'key: value' entries, not {found}"
    elif error["type"] in ("value_error", "assertion_error") and "error" in ctx:
        message = str(ctx["error"])  # drop pydantic's "Value error, " prefix
    return loc, message


def validate_data(
    data: Any,
    model: type[M],
    source: str,
    line_of: Callable[[Loc], int | None] | None = None,
) -> M:
    """Validate plain data with `model`; errors become one `ConfigError` naming each line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        located: list[tuple[int, str]] = []
        for error in exc.errors()[:_MAX_ERRORS]:
            loc, message = _describe(error)
            line = line_of(loc) if line_of is not None else None
            located.append((line or 0, _format_problem(source, line, loc, message)))
        # In file order, as a reader goes through it (sorted() keeps ties in pydantic's order).
        problems = [problem for _, problem in sorted(located, key=lambda item: item[0])]
        if exc.error_count() > _MAX_ERRORS:
            problems.append(f"{source}: ... and {exc.error_count() - _MAX_ERRORS} more errors")
        raise ConfigError("\n".join(problems)) from exc


def load_validated(path: Path, model: type[M]) -> M:
    """Read `path` as YAML and validate it with `model`; raises `ConfigError` naming file:line."""
    document = read_yaml(path)
    return validate_data(document.data, model, document.source, document.line_of)


def loads_validated(text: str, model: type[M], source: str = "<string>") -> M:
    """`load_validated` for text already in memory (a test, stdin)."""
    document = parse_yaml(text, source)
    return validate_data(document.data, model, document.source, document.line_of)


class StrictModel(BaseModel):
    """A frozen config model that refuses unknown keys and suggests the field meant."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    @model_validator(mode="wrap")
    @classmethod
    def _name_unknown_keys(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors()
            if not any(_is_own_unknown_key(error) for error in errors):
                raise
            # Reword "Extra inputs are not permitted" for this model's own keys, keeping
            # every other error as it was, so that one run reports all the problems.
            known = [field.alias or name for name, field in cls.model_fields.items()]
            rebuilt: list[InitErrorDetails] = []
            for error in errors:
                message = error["msg"]
                if _is_own_unknown_key(error):
                    key = str(error["loc"][0])
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    message = f"unknown field {key!r}; {hint}expected: {', '.join(known)}"
                context = {**(error.get("ctx") or {}), "message": message}
                rebuilt.append(
                    InitErrorDetails(
                        type=PydanticCustomError(error["type"], "{message}", context),
                        loc=error["loc"],
                        input=error["input"],
                    )
                )
            raise ValidationError.from_exception_data(exc.title, rebuilt) from None


def _is_own_unknown_key(error: ErrorDetails) -> bool:
    return error["type"] == "extra_forbidden" and len(error["loc"]) == 1

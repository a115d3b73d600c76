"""Is a MONAI bundle usable here? Load it, compare versions, run its network once.

``python -m dicom_ai.inference.check BUNDLE_DIR --device cpu --json`` prints one JSON object
(a `CheckResult`): whether the bundle loads (config parses, network instantiates, weights
load), the versions its ``metadata.json`` declares against those installed, a forward pass
of the network on a small synthetic input built from ``network_data_format.inputs``, and a
verdict naming the first failing component.

The check imports torch and MONAI, so the node never runs it in its own process:
`run_check` starts it as a subprocess with the interpreter that will run the model (the
node's, or a bundle's prepared environment, see `environment.py`). This module's top level
imports the standard library only.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import operator
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

__all__ = [
    "CheckResult",
    "PackageVersion",
    "check_bundle",
    "declared_packages",
    "input_shape",
    "main",
    "run_check",
]

# metadata.json's version keys for the three packages every bundle names.
_CORE = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}


@dataclass(frozen=True)
class PackageVersion:
    """A package the bundle declares: ``role`` core, required or optional."""

    name: str
    declared: str
    installed: str | None
    role: str

    @property
    def differs(self) -> bool:
        return self.installed is not None and _release(self.installed) != _release(self.declared)

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.name} {self.declared} missing"
        return f"{self.name} {self.declared} -> {self.installed}"


@dataclass(frozen=True)
class CheckResult:
    """What one check found. ``ok`` only when the bundle loads and its network runs."""

    bundle: str
    ok: bool
    verdict: str  # "ok", or the first failing component with its reason
    load: str = ""  # "ok" or the reason
    forward: str = ""  # "ok", the reason, or "" (not reached)
    input_shape: tuple[int, ...] = ()
    packages: tuple[PackageVersion, ...] = ()
    python: str = ""
    seconds: float = 0.0
    # The check itself did not finish (timeout, crash, no JSON): says nothing of the model.
    inconclusive: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CheckResult:
        data = json.loads(text)
        data["packages"] = tuple(PackageVersion(**p) for p in data.get("packages", ()))
        data["input_shape"] = tuple(data.get("input_shape", ()))
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    def drift(self) -> list[PackageVersion]:
        """Declared packages installed at another version, or missing."""
        return [p for p in self.packages if p.installed is None or p.differs]


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    parts = tuple(int(p) for p in numbers.group(0).split(".")) if numbers else ()
    while parts and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def _installed(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def declared_packages(metadata: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(name, declared version, role) for every package ``metadata.json`` names."""
    packages = [
        (name, str(metadata[key]), "core") for key, name in _CORE.items() if metadata.get(key)
    ]
    for key, role in (
        ("required_packages_version", "required"),
        ("optional_packages_version", "optional"),
    ):
        declared = metadata.get(key) or {}
        if isinstance(declared, Mapping):
            packages += [(str(n), str(v), role) for n, v in declared.items()]
    return packages


_OPERATORS: dict[type[ast.AST], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}


def _evaluate(expression: str, n: int) -> int:
    """An arithmetic expression of ``n`` (``"16*n"``, ``"2**n"``), without eval."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id == "n":
            return n
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"spatial_shape entry {expression!r} is not arithmetic of n")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"spatial_shape entry {expression!r} is not arithmetic of n") from exc
    return value(tree)


def input_shape(metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """(channels, *spatial) of the smallest input the metadata allows: expressions like
    ``"16*n"`` take the smallest n >= 1 that gives every axis at least one voxel."""
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    if not inputs:
        raise ValueError("metadata.json has no network_data_format.inputs")
    spec = inputs.get("image") or next(iter(inputs.values()))
    channels = int(spec.get("num_channels", 1))
    shape = spec.get("spatial_shape") or []
    if not shape:
        raise ValueError("metadata.json's input has no spatial_shape")
    for n in range(1, 65):
        sizes = [s if isinstance(s, int) else _evaluate(str(s), n) for s in shape]
        if all(size >= 1 for size in sizes):
            return (channels, *sizes)
    raise ValueError(f"spatial_shape {shape} gives no positive size for n up to 64")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _reason(exc: BaseException) -> str:
    """The innermost error of ``exc``'s chain, on one line: what actually went wrong, not
    the wrappers (ModelError, MONAI's "Failed to instantiate")."""
    errors = list(_chain(exc))
    for error in errors:
        if isinstance(error, ModuleNotFoundError) and error.name:
            return f"{error.name.split('.')[0]} missing"
        # MONAI's optional_import: "from einops import rearrange (No module named 'einops')."
        missing = re.search(r"No module named '([\w.]+)'", str(error))
        if missing:
            return f"{missing.group(1).split('.')[0]} missing"
    innermost = errors[-1]
    text = str(innermost).strip().splitlines()
    first = text[0] if text else type(innermost).__name__
    first = re.sub(r"^bundle \S+: (cannot load: )?", "", first)
    return first if text else f"{type(innermost).__name__}"


def _implicated(exc: BaseException, packages: Sequence[PackageVersion]) -> list[PackageVersion]:
    """Declared packages at another version that the failure touches: named in the error,
    or raising it (the last frame of an error of the chain is in their code)."""
    files = []
    words = []
    for error in _chain(exc):
        frames = traceback.extract_tb(error.__traceback__)
        files += [frames[-1].filename] if frames else []
        words.append(str(error))
    text = re.sub(r"\S*/\S*", "", " ".join(words))  # not the paths: ".../monai-bundles/..."
    found = []
    for package in packages:
        if not package.differs:
            continue
        module = package.name.lower().replace("-", "_")
        in_frames = any(f"{os.sep}{module}{os.sep}" in path for path in files)
        if in_frames or re.search(rf"\b{re.escape(module)}\b", text):
            found.append(package)
    return found


def _with_drift(reason: str, exc: BaseException, packages: Sequence[PackageVersion]) -> str:
    missing = re.fullmatch(r"([\w.-]+) missing", reason)
    if missing:
        # A package that is not there: what its bundle declares of it, not the drift of
        # the library that imported it.
        name = missing.group(1).lower().replace("_", "-")
        declared = [p for p in packages if p.name.lower().replace("_", "-") == name]
        said = f"declared {declared[0].name} {declared[0].declared}" if declared else "undeclared"
        return f"{reason} ({said})"
    implicated = _implicated(exc, packages)
    if not implicated:
        return reason
    said = ", ".join(f"{p.name} {p.declared}" for p in implicated)
    if len(implicated) == 1:
        return f"{reason} (written for {said}, installed {implicated[0].installed})"
    now = ", ".join(f"{p.name} {p.installed}" for p in implicated)
    return f"{reason} (written for {said}; installed {now})"


def check_bundle(
    bundle_dir: Path,
    device: str = "cpu",
    task: str | None = None,
    config_files: Sequence[str] = (),
) -> CheckResult:
    """Check ``bundle_dir`` in this process (imports torch and MONAI); ``task`` and
    ``config_files`` as the node's model config gives them to `BundleModel`."""
    started = time.monotonic()
    bundle = Path(bundle_dir).resolve()
    python = sys.executable
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = f"load: unreadable metadata.json: {exc}"
        return CheckResult(str(bundle), False, reason, load=reason[6:], python=python)
    packages = tuple(
        PackageVersion(name, version, _installed(name), role)
        for name, version, role in declared_packages(meta)
    )
    missing = [p.name for p in packages if p.role == "required" and p.installed is None]
    missing_optional = [p.name for p in packages if p.role == "optional" and p.installed is None]
    notes: tuple[str, ...] = ()
    if missing_optional:
        notes = (f"optional package(s) not installed: {', '.join(missing_optional)}",)

    def result(ok: bool, verdict: str, **fields: Any) -> CheckResult:
        return CheckResult(
            str(bundle),
            ok,
            verdict,
            packages=packages,
            python=python,
            seconds=round(time.monotonic() - started, 2),
            notes=notes,
            **fields,
        )

    try:
        shape = input_shape(meta)
    except ValueError as exc:
        shape = ()
        notes += (f"no forward pass: {exc}",)
    try:
        from dicom_ai.inference.bundle import BundleModel

        settings: dict[str, Any] = {"task": task} if task else {}
        if config_files:
            settings["config_files"] = tuple(config_files)
        model = BundleModel(bundle, device=device, **settings)
    except Exception as exc:
        load = _with_drift(_reason(exc), exc, packages)
        verdict = f"needs package {', '.join(missing)}" if missing else f"load: {load}"
        return result(False, verdict, load=load, input_shape=shape)
    if missing:
        # Declared, but what the node runs (config, network, transforms) loaded without it.
        notes += (f"declared package(s) not installed, not needed to load: {', '.join(missing)}",)
    if not shape:
        return result(True, "ok", load="ok")
    try:
        _forward(model, shape, model.device)
    except Exception as exc:
        forward = _with_drift(_reason(exc), exc, packages)
        return result(False, f"forward: {forward}", load="ok", forward=forward, input_shape=shape)
    return result(True, "ok", load="ok", forward="ok", input_shape=shape)


def _forward(model: Any, shape: tuple[int, ...], device: Any) -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, *shape), generator=generator).to(device)
    with torch.no_grad():
        output = model.network_forward(image)
    if output is None:
        raise ValueError("the network returned nothing")


def _last_json(text: str) -> str | None:
    """The last line of ``text`` that is a JSON object: bundle code may print too."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return line
    return None


def run_check(
    bundle_dir: Path,
    python: Path | str | None = None,
    device: str = "cpu",
    timeout: float = 600.0,
    started_process: Callable[[subprocess.Popen[str]], None] | None = None,
    task: str | None = None,
    config_files: Sequence[str] = (),
    nice: int = 0,
) -> CheckResult:
    """Check ``bundle_dir`` in a subprocess run by ``python`` (None: this interpreter);
    ``started_process`` is given the subprocess (to stop it from another thread); ``nice``
    lowers its CPU priority (the node's start-time checks yield to its jobs).

    Never raises for the bundle's sake: a check that times out, dies or prints no result
    gives an ``inconclusive`` result naming why.
    """
    interpreter = str(python or sys.executable)
    command = [interpreter, "-m", "dicom_ai.inference.check", str(bundle_dir)]
    command += ["--device", device, "--json"]
    command += ["--task", task] if task else []
    for name in config_files:
        command += ["--config-file", name]
    command += ["--nice", str(nice)] if nice else []
    started = time.monotonic()

    def failed(reason: str) -> CheckResult:
        return CheckResult(
            str(Path(bundle_dir).resolve()),
            False,
            f"check: {reason}",
            python=interpreter,
            seconds=round(time.monotonic() - started, 2),
            inconclusive=True,
        )

    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as exc:
        return failed(f"cannot run {interpreter}: {exc.strerror or exc}")
    if started_process is not None:
        started_process(process)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return failed(f"timed out after {timeout:g} s")
    line = _last_json(stdout)
    if line is not None:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return CheckResult.from_json(line)
    tail = [s for s in stderr.strip().splitlines() if s.strip()]
    code = process.returncode
    how = f"exit code {code}" if code >= 0 else f"signal {-code}"
    return failed(f"the check process ended ({how}) without a result: {tail[-1] if tail else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_ai.inference.check")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--task", help="what the bundle outputs, overriding its metadata")
    parser.add_argument(
        "--config-file", action="append", default=[], help="a config under configs/ (repeat)"
    )
    parser.add_argument("--nice", type=int, default=0, help="lower the CPU priority by N")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.simplefilter("ignore")
    # Bundle scripts may print: keep stdout for the one result line.
    with contextlib.redirect_stdout(sys.stderr):
        result = check_bundle(args.bundle, args.device, args.task, args.config_file)
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        sys.stdout.write(f"{result.bundle}: {result.verdict}\n")
    sys.stdout.flush()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A bundle's own environment, for bundles written against older MONAI / numpy.

A zoo bundle declares the versions it was written for in ``metadata.json``
(``monai_version``, ``numpy_version``, ``required_packages_version``). When it fails the
check in the node's environment, `prepare` builds a virtual environment for it under
``<data_dir>/bundle-envs/<name>-<hash of bundle path and declarations>``:

- ``python -m venv`` (no pip in it: the node's pip installs into it with ``--python``);
- a ``.pth`` file that appends the node's site-packages *after* the environment's own, so
  the bundle shares the node's torch (and dicom_ai) but imports its own monai and numpy;
- ``pip install --no-deps`` of the declared monai and numpy and of the required packages,
  one by one, from the wheelhouse first (``install.sh`` fills ``.venv/wheelhouse``; or
  ``$DICOM_AI_WHEELHOUSE``), then the index. torch and the packages built against one torch
  release are never installed: the node's torch is shared;
- the check again, with the environment's interpreter; its verdict is recorded with the
  install report in the marker file, which also says the environment is complete.

A second `prepare` finds the marker and installs nothing (it only checks again an environment
whose bundle failed there). Nothing here imports torch or MONAI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import site
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dicom_ai.errors import ModelError
from dicom_ai.inference.check import run_check

__all__ = [
    "MARKER",
    "Declarations",
    "Prepared",
    "default_wheelhouse",
    "env_dir",
    "env_site_packages",
    "prepare",
    "prepared",
    "prepared_python",
]

log = logging.getLogger(__name__)

MARKER = "dicom-ai-env.json"
# Built against one torch release each (a torchvision wheel pins its torch): installing one
# with --no-deps beside the node's torch gives a broken import, so they are refused.
_TORCH_BOUND = frozenset({"torch", "torchvision", "torchaudio"})


@dataclass(frozen=True)
class Declarations:
    """What a bundle's metadata.json asks to have installed."""

    monai: str | None
    numpy: str | None
    required: tuple[tuple[str, str], ...]
    optional: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, bundle: Path) -> Declarations:
        path = bundle / "configs" / "metadata.json"
        try:
            meta: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"bundle {bundle}: unreadable metadata.json: {exc}") from exc
        required = meta.get("required_packages_version") or {}
        optional = meta.get("optional_packages_version") or {}
        return cls(
            monai=str(meta["monai_version"]) if meta.get("monai_version") else None,
            numpy=str(meta["numpy_version"]) if meta.get("numpy_version") else None,
            required=tuple(sorted((str(k), str(v)) for k, v in dict(required).items())),
            optional=tuple(sorted((str(k), str(v)) for k, v in dict(optional).items())),
        )

    def requirements(self) -> list[tuple[str, str]]:
        core = [("monai", self.monai), ("numpy", self.numpy)]
        return [(n, v) for n, v in core if v] + list(self.required)


@dataclass(frozen=True)
class Prepared:
    """A prepared environment: its interpreter, the install report and the check in it."""

    bundle: str
    python: str
    installed: tuple[str, ...] = ()
    not_installed: tuple[tuple[str, str], ...] = ()  # (requirement, why)
    # Taken from the node: required at the version it has, optional at any version.
    shared: tuple[str, ...] = ()
    ok: bool = False
    verdict: str = ""
    built_now: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def env_dir(data_dir: Path, bundle: Path) -> Path:
    """Where ``bundle``'s environment lives; another path or other declarations, another
    environment."""
    bundle = Path(bundle).resolve()
    declarations = Declarations.of(bundle)
    key = json.dumps(
        {
            "bundle": str(bundle),
            "python": list(sys.version_info[:2]),
            **asdict(declarations),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(data_dir).resolve() / "bundle-envs" / f"{bundle.name}-{digest}"


def _python(directory: Path) -> Path:
    return directory / "bin" / "python"


def env_site_packages(directory: Path) -> Path:
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return directory / "lib" / version / "site-packages"


def prepared(data_dir: Path, bundle: Path) -> Prepared | None:
    """The complete environment of ``bundle`` under ``data_dir``, or None."""
    try:
        marker = env_dir(data_dir, bundle) / MARKER
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, ModelError):
        return None
    data["installed"] = tuple(data.get("installed", ()))
    data["not_installed"] = tuple(tuple(p) for p in data.get("not_installed", ()))
    data["shared"] = tuple(data.get("shared", ()))
    data["notes"] = tuple(data.get("notes", ()))
    data["built_now"] = False
    return Prepared(**data)


def prepared_python(data_dir: Path, bundle: Path) -> Path | None:
    """The interpreter of ``bundle``'s environment when one is complete and the bundle
    passed its check there; None: the node's own interpreter."""
    env = prepared(data_dir, bundle)
    if env is None or not env.ok or not Path(env.python).exists():
        return None
    return Path(env.python)


def default_wheelhouse() -> Path | None:
    """``$DICOM_AI_WHEELHOUSE``, else ``wheelhouse`` in the node's environment (``install.sh``
    downloads the wheels the zoo's bundles declare there)."""
    configured = os.environ.get("DICOM_AI_WHEELHOUSE")
    path = Path(configured) if configured else Path(sys.prefix) / "wheelhouse"
    return path if path.is_dir() else None


def _installed(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    # install.sh's constraints pin the node's own versions; the bundle declares others.
    env.pop("PIP_CONSTRAINT", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip_install(python: Path, requirement: str, sources: list[str]) -> str | None:
    """Install one requirement without its dependencies; None, or pip's last error line."""
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    command += ["--no-warn-script-location", "-q", *sources, requirement]
    done = subprocess.run(command, capture_output=True, text=True, env=_pip_env(), check=False)
    if done.returncode == 0:
        return None
    errors = [s.strip() for s in done.stderr.splitlines() if s.strip().startswith("ERROR")]
    lines = errors or [s.strip() for s in done.stderr.splitlines() if s.strip()]
    return lines[-1] if lines else f"pip exited with {done.returncode}"


def _install(
    python: Path, requirement: str, wheelhouse: Path | None, use_index: bool
) -> str | None:
    """From the wheelhouse alone first (no network), then with the index."""
    attempts: list[list[str]] = []
    if wheelhouse is not None:
        attempts.append(["--no-index", "--find-links", str(wheelhouse)])
    if use_index:
        attempts.append(["--find-links", str(wheelhouse)] if wheelhouse else [])
    if not attempts:
        return "no wheelhouse and the index is not used"
    error: str | None = "not attempted"
    for sources in attempts:
        error = _pip_install(python, requirement, sources)
        if error is None:
            return None
    return error


def _node_site_dirs() -> list[str]:
    dirs = [*site.getsitepackages()]
    user = site.getusersitepackages()
    if site.ENABLE_USER_SITE and Path(user).is_dir():
        dirs.append(user)
    return [d for d in dirs if Path(d).is_dir()]


def prepare(
    bundle: Path,
    data_dir: Path,
    wheelhouse: Path | None = None,
    use_index: bool = True,
    timeout: float = 900.0,
    progress: Callable[[str], None] = log.info,
    task: str | None = None,
    config_files: Sequence[str] = (),
) -> Prepared:
    """Build (once) and check ``bundle``'s environment; see the module docstring.

    Raises ModelError when the environment itself cannot be made (venv, unreadable
    metadata); what cannot be installed is reported in the result, not raised.
    """
    bundle = Path(bundle).resolve()
    directory = env_dir(data_dir, bundle)
    existing = prepared(data_dir, bundle)
    if existing is not None and existing.ok:
        return existing
    if existing is not None:
        # Built, but the bundle failed there: nothing to install again, the check may pass
        # now (weights added, the node upgraded).
        result = run_check(
            bundle, existing.python, timeout=timeout, task=task, config_files=config_files
        )
        if result.inconclusive or result.verdict == existing.verdict:
            return existing
        existing = replace(existing, ok=result.ok, verdict=result.verdict)
        _record(directory, existing)
        return existing
    declarations = Declarations.of(bundle)
    if directory.exists():  # a build that was interrupted: start over
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    progress(f"{bundle.name}: creating {directory}")
    made = subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        raise ModelError(f"cannot create a venv at {directory}: {made.stderr.strip()[-300:]}")
    python = _python(directory)
    site_packages = env_site_packages(directory)
    # Executed by the environment's site at start: the node's site-packages (and the .pth
    # files there, dicom_ai's editable install among them) come after the environment's own.
    lines = [f"import site; site.addsitedir({d!r})" for d in _node_site_dirs()]
    (site_packages / "zz-dicom-ai-node.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    installed: list[str] = []
    not_installed: list[tuple[str, str]] = []
    shared: list[str] = []
    # Optional packages too, where the node has none: the zoo lists as optional what older
    # MONAI networks import (einops for SwinUNETR), and their absence fails the bundle.
    wanted = [(n, v, False) for n, v in declarations.requirements()]
    wanted += [(n, v, True) for n, v in declarations.optional]
    for name, version, optional in wanted:
        requirement = f"{name}=={version}"
        have = _installed(name)
        if have == version or (optional and have is not None):
            shared.append(f"{name} {have}")
            continue
        if name.lower() in _TORCH_BOUND:
            why = f"built for one torch release; the node's torch {_installed('torch')} is shared"
            not_installed.append((requirement, why))
            continue
        progress(f"{bundle.name}: installing {requirement}")
        error = _install(python, requirement, wheelhouse, use_index)
        if error is None:
            installed.append(requirement)
        else:
            not_installed.append((requirement, error))
    progress(f"{bundle.name}: checking in {directory}")
    result = run_check(bundle, python, timeout=timeout, task=task, config_files=config_files)
    env = Prepared(
        bundle=str(bundle),
        python=str(python),
        installed=tuple(installed),
        not_installed=tuple(not_installed),
        shared=tuple(shared),
        ok=result.ok,
        verdict=result.verdict,
    )
    if not result.inconclusive:
        _record(directory, env)
    return replace(env, built_now=True)


def _record(directory: Path, env: Prepared) -> None:
    """The marker: the environment is complete; what was installed, the check's verdict."""
    record = asdict(env)
    record.pop("built_now")
    temporary = directory / f"{MARKER}.tmp"
    temporary.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    temporary.replace(directory / MARKER)

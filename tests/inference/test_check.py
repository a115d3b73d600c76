"""The bundle check: loads, declared vs installed versions, a forward pass, one verdict."""

from __future__ import annotations

import json
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from dicom_ai.inference.check import (
    CheckResult,
    _reason,
    check_bundle,
    input_shape,
    run_check,
)
from tests.bundles import (
    spleen_bundle,  # noqa: F401  (session fixture)
)


def _copy(bundle: Path, directory: Path) -> Path:
    copy = directory / bundle.name
    shutil.copytree(bundle, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    return copy


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split("__")
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(data))


def test_a_good_bundle_passes_in_a_subprocess(spleen_bundle: Path) -> None:  # noqa: F811
    result = run_check(spleen_bundle)
    assert result.ok, result
    assert (result.verdict, result.load, result.forward) == ("ok", "ok", "ok")
    assert result.input_shape == (1, 96, 96, 96)
    assert result.python == sys.executable and not result.inconclusive
    monai = {p.name: p for p in result.packages}["monai"]
    assert (monai.declared, monai.installed, monai.role) == ("1.4.0", version("monai"), "core")
    assert monai.differs == (version("monai") != "1.4.0")


def test_an_unknown_network_argument_fails_the_load_with_the_error(
    spleen_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    bundle = _copy(spleen_bundle, tmp_path)
    _edit(bundle / "configs" / "inference.json", network_def__img_size=[96, 96, 96])
    result = check_bundle(bundle)
    assert not result.ok and result.forward == ""
    assert result.verdict.startswith("load: UNet.__init__() got an unexpected keyword argument")
    assert "'img_size'" in result.verdict
    if version("monai") != "1.4.0":  # raised in MONAI's instantiate: the drift is named
        assert f"(written for monai 1.4.0, installed {version('monai')})" in result.verdict


def test_a_missing_required_package_is_named_not_fatal(
    spleen_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    bundle = _copy(spleen_bundle, tmp_path)
    _edit(
        bundle / "configs" / "metadata.json",
        required_packages_version={"no-such-package-dicom-ai": "1.0"},
    )
    result = check_bundle(bundle)
    # Declared, but the bundle loads and runs without it: named in the notes, not broken.
    assert result.ok, result.verdict
    assert any("no-such-package-dicom-ai" in note for note in result.notes)
    (missing,) = [p for p in result.drift() if p.role == "required"]
    assert (
        missing.installed is None and missing.describe() == "no-such-package-dicom-ai 1.0 missing"
    )


def test_a_network_that_fails_on_its_input_fails_the_forward_pass(
    spleen_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    bundle = _copy(spleen_bundle, tmp_path)
    # The UNet halves the grid four times: 7 voxels cannot come back to 7.
    _edit(
        bundle / "configs" / "metadata.json",
        network_data_format__inputs__image__spatial_shape=[7, 7, 7],
    )
    result = check_bundle(bundle)
    assert result.load == "ok" and not result.ok
    assert result.verdict.startswith("forward: ") and result.input_shape == (1, 7, 7, 7)


def test_metadata_channels_the_network_does_not_take_are_refused_plainly(
    spleen_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # A bundle of several series as channels loads (a study rule gives them); one whose
    # metadata promises channels its network does not take fails the forward pass, saying so.
    bundle = _copy(spleen_bundle, tmp_path)
    _edit(bundle / "configs" / "metadata.json", network_data_format__inputs__image__num_channels=3)
    result = check_bundle(bundle)
    assert not result.ok
    assert "forward" in result.verdict and "3 channels" in result.verdict, result.verdict


def test_input_shape_takes_the_smallest_n() -> None:
    def meta(shape: list[object], channels: int = 1) -> dict[str, object]:
        inputs = {"image": {"num_channels": channels, "spatial_shape": shape}}
        return {"network_data_format": {"inputs": inputs}}

    assert input_shape(meta(["16*n", "16*n", "8*n"])) == (1, 16, 16, 8)
    assert input_shape(meta([96, 96, 96], 4)) == (4, 96, 96, 96)
    assert input_shape(meta(["2**n", "32*n-16"])) == (1, 2, 16)
    assert input_shape(meta(["n-2", 8])) == (1, 1, 8)  # n = 3: the smallest that fits
    with pytest.raises(ValueError, match="not arithmetic"):
        input_shape(meta(["__import__('os')"]))
    with pytest.raises(ValueError, match="not arithmetic"):
        input_shape(meta(["*", 8]))  # not even Python


def test_a_missing_module_is_named_as_missing() -> None:
    try:
        try:
            import no_such_module_dicom_ai  # type: ignore[import-not-found]  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("Failed to instantiate network_def") from exc
    except RuntimeError as exc:
        assert _reason(exc) == "no_such_module_dicom_ai missing"
    # MONAI's optional_import names it in its message only.
    optional = AttributeError("from einops import rearrange (No module named 'einops').")
    assert _reason(optional) == "einops missing"


def test_a_check_that_cannot_run_is_inconclusive(tmp_path: Path) -> None:
    result = run_check(tmp_path, python=tmp_path / "no-python")
    assert result.inconclusive and not result.ok
    assert result.verdict.startswith("check: cannot run")
    died = run_check(tmp_path, python=Path("/bin/false"))
    assert died.inconclusive and died.verdict.startswith("check: the check process ended")


def test_results_round_trip_through_json(spleen_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    bundle = _copy(spleen_bundle, tmp_path)
    _edit(bundle / "configs" / "metadata.json", required_packages_version={"nope-pkg": "2"})
    result = check_bundle(bundle)
    assert CheckResult.from_json(result.to_json()) == result


class _Health:
    def __init__(self, broken: dict[str, str]) -> None:
        self._broken = broken

    def broken(self, model_id: str) -> str | None:
        return self._broken.get(model_id)


def test_the_scheduler_fails_a_job_of_a_broken_model_at_once(tmp_path: Path) -> None:
    from tests.inference.test_scheduler import Harness, _ct

    harness = Harness(tmp_path)
    try:
        harness.scheduler.health = _Health({"ct-body": "load: torchvision missing"})
        association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
        harness.receive(_ct(), association)
        harness.index.close_association(association)
        now = time.time()
        harness.scheduler.step(now + 2)
        (job,) = harness.index.jobs()
        assert harness.pool.submitted == []  # no worker ever loads it
        assert (job.state, job.error) == (
            "failed",
            "model ct-body is broken: load: torchvision missing",
        )
        # Another model's jobs still run.
        harness.scheduler.health = _Health({"other": "load: nope"})
        association = harness.index.open_association("SCANNER", "DICOM_AI", "127.0.0.1")
        harness.receive(_ct(seed=5), association)
        harness.index.close_association(association)
        harness.scheduler.step(now + 4)
        assert [s.model_id for s in harness.pool.submitted] == ["ct-body"]
    finally:
        harness.index.close()


def test_a_missing_module_names_what_the_bundle_declares_of_it(
    spleen_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    bundle = _copy(spleen_bundle, tmp_path)
    (bundle / "scripts").mkdir(exist_ok=True)
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "net.py").write_text(
        "def make(**kwargs):\n    import no_such_backbone_dicom_ai  # noqa: F401\n"
    )
    _edit(bundle / "configs" / "inference.json", network_def___target_="scripts.net.make")
    _edit(
        bundle / "configs" / "metadata.json",
        optional_packages_version={"no-such-backbone-dicom-ai": "0.14.1"},
    )
    result = check_bundle(bundle)
    assert not result.ok
    assert result.verdict == (
        "load: no_such_backbone_dicom_ai missing (declared no-such-backbone-dicom-ai 0.14.1)"
    )

"""Warm models: a worker keeps its most recently used models; the pool sends a job to an
idle worker that has its model loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_ai.pipeline import worker
from dicom_ai.pipeline.worker import JobSpec, LoadedModels, WorkerPool, _Slot


def _spec(model: str, job_id: int = 1) -> JobSpec:
    return JobSpec(job_id, "1.2.3", model, None, "cpu", 60.0, (), Path("/r"), "SN")


def test_the_least_recently_used_model_is_unloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []

    def load_model(model_id: str, *args: Any, **kwargs: Any) -> object:
        loads.append(model_id)
        return object()

    monkeypatch.setattr("dicom_ai.inference.model.load_model", load_model)
    monkeypatch.setattr(worker, "_freeze_long_lived", lambda: None)
    models = LoadedModels(keep=2)
    for model in ("a", "b", "a", "c", "a", "b"):
        models(_spec(model))
    # a stays warm (used again before c came); b went when c came, so it loads again.
    assert loads == ["a", "b", "c", "b"]


class _Idle:
    def is_alive(self) -> bool:
        return True


def test_an_idle_worker_with_the_model_loaded_is_chosen() -> None:
    pool = WorkerPool.__new__(WorkerPool)  # the ranking only: no processes
    cold = _Slot(_Idle(), None, prefetched_series="1.2.3")  # type: ignore[arg-type]
    warm = _Slot(_Idle(), None, models=["seg"])  # type: ignore[arg-type]
    pool._slots = [cold, warm]
    assert pool._idle_slot("1.2.3", None, "seg") is warm
    assert pool._idle_slot("1.2.3", None, "other") is cold  # then the prefetched series

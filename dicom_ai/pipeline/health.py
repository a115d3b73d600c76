"""Which configured bundles work here: checked once at the node's start, in the background.

Each bundle model is checked (`inference/check.py`) in a subprocess, one after another, on
the interpreter its jobs will run: its prepared environment when `models prepare` made one
that passes (`inference/environment.py`), else the node's own. The receiving side never
waits for it. The scheduler asks before dispatching a job: a model whose check is still
running holds its jobs; a model the check found broken fails them at once with the reason;
a check that could not finish (timeout, crash) says nothing, and jobs run as usual.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_ai.config import Config
from dicom_ai.inference.check import CheckResult, run_check
from dicom_ai.inference.environment import prepared_python

__all__ = ["ModelHealth"]

log = logging.getLogger(__name__)

Checker = Callable[..., CheckResult]
# Told what each check found (model, state, verdict): the console shows it.
Recorder = Callable[[str, str, "str | None"], None]
# The checks run while the node already takes series: its jobs come first on the CPU.
_CHECK_NICENESS = 10


class ModelHealth:
    """The start-time checks of a config's bundle models, and what they found."""

    def __init__(
        self, config: Config, checker: Checker = run_check, record: Recorder | None = None
    ) -> None:
        self._checker = checker
        self._record_result = record
        self._bundles: dict[str, Path] = {}
        self._settings: dict[str, dict[str, Any]] = {}
        self._python: dict[str, Path | None] = {}
        for model_id in sorted(config.known_models()):
            model = config.model(model_id)
            if model.bundle is None:
                continue
            self._bundles[model_id] = model.bundle
            self._settings[model_id] = {
                "timeout": model.timeout_seconds,
                "task": model.task,
                "config_files": tuple(model.config_files),
            }
            self._python[model_id] = prepared_python(config.node.data_dir, model.bundle)
        self._lock = threading.Lock()
        self._pending = set(self._bundles)
        self._broken: dict[str, str] = {}
        self._stop = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def python(self, model_id: str) -> Path | None:
        """The interpreter ``model_id``'s jobs run; None: the node's."""
        return self._python.get(model_id)

    def checking(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._pending

    def broken(self, model_id: str) -> str | None:
        """Why ``model_id`` cannot run, when its check found it broken."""
        with self._lock:
            return self._broken.get(model_id)

    def start(self) -> None:
        if not self._bundles:
            return
        if self._record_result is not None:
            for model_id in self._bundles:
                self._record_result(model_id, "checking", None)
        self._thread = threading.Thread(target=self._run, name="dicom-ai-model-check", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every check finished; False when ``timeout`` passed first."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.kill()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _started(self, process: subprocess.Popen[str]) -> None:
        with self._lock:
            self._process = process
        if self._stop.is_set():
            process.kill()

    def _run(self) -> None:
        for model_id, bundle in self._bundles.items():
            if self._stop.is_set():
                break
            python = self._python[model_id]
            try:
                result = self._checker(
                    bundle,
                    python,
                    started_process=self._started,
                    nice=_CHECK_NICENESS,
                    **self._settings[model_id],
                )
            except Exception as exc:  # a bug in the check must not stop the node
                log.exception("model %s: check failed", model_id)
                result = CheckResult(str(bundle), False, f"check: {exc}", inconclusive=True)
            self._record(model_id, result, python)

    def _record(self, model_id: str, result: CheckResult, python: Path | None) -> None:
        where = f" (environment {python.parent.parent.name})" if python else ""
        with self._lock:
            self._pending.discard(model_id)
            self._process = None
            if not result.ok and not result.inconclusive:
                self._broken[model_id] = result.verdict
        if self._stop.is_set():
            return
        if self._record_result is not None:
            state = "ok" if result.ok else "inconclusive" if result.inconclusive else "broken"
            try:
                self._record_result(model_id, state, None if result.ok else result.verdict)
            except Exception as exc:  # the console's view; never the node's problem
                log.warning("model %s: check result not recorded: %s", model_id, exc)
        if result.ok:
            log.info("model %s checked%s: ok in %.1f s", model_id, where, result.seconds)
        elif result.inconclusive:
            log.warning("model %s%s: check inconclusive: %s", model_id, where, result.verdict)
        else:
            log.error("model %s%s is broken: %s", model_id, where, result.verdict)

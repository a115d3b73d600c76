"""Replay: what a candidate rules file would do with series already received.

Each series is evaluated under the running rules and the candidate, with the header and
sender it came with; the series whose routes differ are listed, before the file goes live.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_ai.routing.engine import Evaluation, RuleSet, SenderContext

__all__ = ["ReplayedSeries", "replay"]


@dataclass(frozen=True)
class ReplayedSeries:
    series_instance_uid: str
    modality: str
    current: tuple[str, ...]  # "rule: model -> destinations", one per route
    candidate: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.current != self.candidate


def _routes(evaluation: Evaluation) -> tuple[str, ...]:
    return tuple(
        f"{d.rule}: {d.model or '(no model)'} -> {', '.join(d.destinations) or '-'}"
        for d in evaluation.decisions
    )


def replay(
    current: RuleSet,
    candidate: RuleSet,
    series: Iterable[tuple[str, Dataset, SenderContext]],
) -> list[ReplayedSeries]:
    """Every series (UID, a header, its sender) under both rule sets, in the given order."""
    return [
        ReplayedSeries(
            uid,
            str(header.get("Modality", "")),
            _routes(current.evaluate(header, sender)),
            _routes(candidate.evaluate(header, sender)),
        )
        for uid, header, sender in series
    ]

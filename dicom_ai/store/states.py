"""The states a series, a job and a delivery can be in, and the moves between them.

Drawn once, here; `check` is the one place a move is allowed or refused, and every index
method that changes a state calls it. An illegal move is a bug in the node, not bad input:
it raises `IllegalTransition`, and the transaction that tried it rolls back.

The values are the strings stored in the index, so an index written before these enums
existed reads the same.

    series:    (new) --instance--> PENDING --run started--> ROUTED --instance--> PENDING ...
               (PENDING: instances not yet part of a run; stored as ``series.dirty``)

    job:       (new) -> PENDING -> RUNNING -> DONE
                                   RUNNING -> FAILED            (an error that would repeat)
                                   RUNNING -> PENDING           (retry; or a restart found it
                                                                 running)
                                   FAILED -> PENDING            (an operator reruns it)

    delivery:  (new) -> PENDING -> DELIVERED
                        PENDING -> PENDING                      (failed attempt, backing off)
                        PENDING -> DEAD -> PENDING              (attempts used up; resubmit)
                                   DEAD -> DISCARDED            (an operator gives it up: its
                                                                 results may then be purged)
               (new) -> SUPERSEDED                               (a later run already finished)
                        PENDING | DEAD -> SUPERSEDED            (a later run's results replace
                                                                 these; held results of an
                                                                 early start replaced by a
                                                                 new run: see assembly.py)
                        SUPERSEDED -> DELIVERED                 (it was being sent when
                                                                 superseded, and went out)
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

__all__ = [
    "DELIVERY_MOVES",
    "JOB_MOVES",
    "SERIES_MOVES",
    "DeliveryState",
    "IllegalTransition",
    "JobState",
    "SeriesState",
    "check",
]


class SeriesState(StrEnum):
    PENDING = "pending"  # instances not yet part of a run
    ROUTED = "routed"  # every instance is part of a run


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    SUPERSEDED = "superseded"
    DISCARDED = "discarded"


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow: a bug, never input."""


# From each state (None: a row being created), the states it may move to.
SERIES_MOVES: Mapping[SeriesState | None, frozenset[SeriesState]] = {
    None: frozenset({SeriesState.PENDING}),
    SeriesState.PENDING: frozenset({SeriesState.PENDING, SeriesState.ROUTED}),
    SeriesState.ROUTED: frozenset({SeriesState.PENDING}),
}
JOB_MOVES: Mapping[JobState | None, frozenset[JobState]] = {
    # (new) -> failed: a study job whose required role never came (routing/studies.py).
    None: frozenset({JobState.PENDING, JobState.FAILED}),
    JobState.PENDING: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.PENDING}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),
}
DELIVERY_MOVES: Mapping[DeliveryState | None, frozenset[DeliveryState]] = {
    None: frozenset({DeliveryState.PENDING, DeliveryState.SUPERSEDED}),
    DeliveryState.PENDING: frozenset(
        {
            DeliveryState.PENDING,
            DeliveryState.DELIVERED,
            DeliveryState.DEAD,
            DeliveryState.SUPERSEDED,
        }
    ),
    DeliveryState.DEAD: frozenset(
        {DeliveryState.PENDING, DeliveryState.SUPERSEDED, DeliveryState.DISCARDED}
    ),
    DeliveryState.SUPERSEDED: frozenset({DeliveryState.DELIVERED}),
    DeliveryState.DELIVERED: frozenset(),
    DeliveryState.DISCARDED: frozenset(),
}

_S = TypeVar("_S", SeriesState, JobState, DeliveryState)
_MOVES: dict[type[StrEnum], Mapping[Any, frozenset[Any]]] = {
    SeriesState: SERIES_MOVES,
    JobState: JOB_MOVES,
    DeliveryState: DELIVERY_MOVES,
}


def check(old: _S | None, new: _S, what: str = "") -> _S:
    """``new`` when ``old -> new`` is allowed; raises `IllegalTransition` otherwise."""
    moves = _MOVES[type(new)]
    if new not in moves.get(old, frozenset()):
        was = "(new)" if old is None else old.value
        name = f"{type(new).__name__.removesuffix('State').lower()} {what}".strip()
        raise IllegalTransition(f"{name}: {was} -> {new.value} is not allowed")
    return new

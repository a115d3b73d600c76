"""Study rules: which series fills each role, and when a study's job starts. The rule
lives here; the index stores what it decides (`Index.start_study_run`, `Index.settle_study`).

A rule with ``study:`` (routing/rules.py) runs its model on several series of one study.
Each series of the study that the rule matches is a *member* once its own run started
(series assembly: quiet, release grace, early start), with the roles its header can fill.

Selection (`select_roles`). Roles are filled in the order written. A role takes, among the
members that can fill it and that no earlier role took, the one received last
(``choose: latest``) or the one with the most instances (``most_slices``, then latest);
with ``order_by``/``position`` it takes the position-th of the members that can fill it, in
the order of that element's value (numbers as numbers, else text; every member counts, taken
or not, as the position says where in the study's sequence the series lies). When several
members could fill a role, the selection says which it chose and why (logged). A member whose
instances were purged is not chosen: its files are gone.

Start (`decide`). The study job starts when every role, required and optional, is filled,
or at the deadline (``deadline_seconds`` after the study's first instance): then it runs
without the optional roles that are still missing; with a required role missing it fails
naming the role (``at_deadline: fail``), or keeps waiting (``wait``). A selection that
changes after a run (a late series a role now chooses; more instances of a chosen series,
which gave that series a new run) starts a new run of the study; its results carry the same
UIDs and supersede the last run's. Results of a run whose series started early are held
until the latest of their hold times (assembly.py's rule, applied by the index).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dicom_ai.routing.rules import Role, Study
from dicom_ai.store.index import StudyMember

__all__ = ["Selection", "StudyDecision", "StudyMember", "decide", "select_roles"]


@dataclass(frozen=True)
class Selection:
    """Each role (in the rule's order) with the member chosen for it, or None."""

    chosen: tuple[tuple[str, StudyMember | None], ...]
    missing_required: tuple[str, ...]
    missing_optional: tuple[str, ...]
    notes: tuple[str, ...]  # ties broken, members left out

    @property
    def key(self) -> str:
        """What a run was made of: equal keys, equal inputs."""
        return json.dumps(
            [
                [role, member.series_instance_uid, member.series_run]
                for role, member in self.chosen
                if member is not None
            ]
        )

    @property
    def found(self) -> tuple[str, ...]:
        return tuple(role for role, member in self.chosen if member is not None)


@dataclass(frozen=True)
class StudyDecision:
    """``start``: run on ``selection`` now; ``wait``: not yet; ``fail``: the deadline passed
    with a required role missing; ``keep``: the inputs are those of the last run."""

    action: Literal["start", "wait", "fail", "keep"]
    selection: Selection
    note: str
    hold_until: float | None = None


def _order_key(text: str) -> tuple[int, float, str]:
    try:
        number = float(text)
    except ValueError:
        return (1, math.inf, text)
    return (0, number, text) if math.isfinite(number) else (1, math.inf, text)


def _candidates(role: Role, members: Sequence[StudyMember]) -> list[StudyMember]:
    return [m for m in members if role.name in m.roles and not m.purged]


def _pick(
    role: Role, members: Sequence[StudyMember], taken: set[str]
) -> tuple[StudyMember | None, str | None]:
    """The member for ``role`` and, when there was a choice, a note saying how it was made."""
    fitting = _candidates(role, members)
    if role.order_by is not None and role.position is not None:
        ranked = sorted(
            fitting,
            key=lambda m: (_order_key(dict(m.order_values).get(role.name, "")), m.routed_at),
        )
        if len(ranked) < role.position:
            return None, None
        pick = ranked[role.position - 1]
        why = (
            f"role {role.name}: series {pick.series_instance_uid} is number {role.position} "
            f"of {len(ranked)} by {role.order_by}"
            if len(ranked) > 1
            else None
        )
        return pick, why
    free = [m for m in fitting if m.series_instance_uid not in taken]
    if not free:
        return None, None
    if role.choose == "most_slices":
        pick = max(free, key=lambda m: (m.instances, m.routed_at))
        how = f"most instances ({pick.instances})"
    else:
        pick = max(free, key=lambda m: m.routed_at)
        how = "received last"
    if len(free) == 1:
        return pick, None
    others = ", ".join(m.series_instance_uid for m in free if m is not pick)
    return pick, (
        f"role {role.name}: {len(free)} series fit; chose {pick.series_instance_uid} "
        f"({how}) over {others}"
    )


def select_roles(study: Study, members: Sequence[StudyMember]) -> Selection:
    """Which member fills each role of ``study`` (see the module docstring)."""
    taken: set[str] = set()
    chosen: list[tuple[str, StudyMember | None]] = []
    notes: list[str] = []
    for role in study.roles:
        pick, why = _pick(role, members, taken)
        if why:
            notes.append(why)
        if pick is not None:
            taken.add(pick.series_instance_uid)
        chosen.append((role.name, pick))
    purged = [m.series_instance_uid for m in members if m.purged]
    if purged:
        notes.append(f"left out, their instances were purged: {', '.join(purged)}")
    missing = [role for role, (_, member) in zip(study.roles, chosen, strict=True) if not member]
    return Selection(
        tuple(chosen),
        tuple(role.name for role in missing if role.required),
        tuple(role.name for role in missing if not role.required),
        tuple(notes),
    )


def decide(
    study: Study,
    members: Sequence[StudyMember],
    deadline_at: float,
    now: float,
    last_run: str | None,
) -> StudyDecision:
    """What to do with a study now; ``last_run``: the `Selection.key` of its last run."""
    selection = select_roles(study, members)
    missing = [*selection.missing_required, *selection.missing_optional]
    if missing and now < deadline_at:
        wanted = ", ".join(
            f"{role} ({'required' if role in selection.missing_required else 'optional'})"
            for role in missing
        )
        note = f"waiting for {wanted}; deadline in {deadline_at - now:.0f} s"
        return StudyDecision("wait", selection, note)
    if selection.missing_required:
        roles = ", ".join(selection.missing_required)
        plural = "s" if len(selection.missing_required) > 1 else ""
        if study.at_deadline == "wait":
            note = f"past its deadline, still waiting for required role{plural} {roles}"
            return StudyDecision("wait", selection, note)
        return StudyDecision("fail", selection, f"required role{plural} {roles} missing")
    if selection.key == last_run:
        return StudyDecision("keep", selection, "inputs unchanged since the last run")
    now_held = [
        m.hold_until
        for _, m in selection.chosen
        if m is not None and m.hold_until is not None and m.hold_until > now
    ]
    without = (
        f" without optional role(s) {', '.join(selection.missing_optional)}"
        if selection.missing_optional
        else ""
    )
    found = ", ".join(
        f"{role}={member.series_instance_uid}" for role, member in selection.chosen if member
    )
    return StudyDecision(
        "start", selection, f"roles {found}{without}", max(now_held) if now_held else None
    )

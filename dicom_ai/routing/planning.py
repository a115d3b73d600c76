"""Run planning: what the rules say for one batch of a series, as the runs to make.

A series batch may reach the node through several called AE titles; each title routes it
by its own rules only, with the sender context of the association that delivered it there.
Decisions that name the same model and the same destinations become one run (their results
would carry the same UIDs); if either asked for a preview or a card, that run makes it. ``sender``
destinations are bound to the calling AE title that delivered the batch to the title whose
rule named it. A study rule's decision becomes a plan with a `StudyClaim` (the roles the
series can fill): the series joins the study's inputs, and routing/studies.py decides when
the study job runs.

`plan_runs` is pure: the header, the senders and the rules in; runs and notes out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from pydicom.dataset import Dataset

from dicom_ai.config import bind_sender
from dicom_ai.routing.engine import RuleSet, SenderContext
from dicom_ai.store.index import RunPlan, Sender, StudyClaim

__all__ = ["plan_runs"]


def plan_runs(
    header: Dataset,
    senders: Sequence[Sender],
    rules_by_called_ae: Mapping[str, RuleSet],
) -> tuple[list[RunPlan], list[str]]:
    """The runs to make for a batch with this ``header`` that ``senders`` delivered, first
    come first, and a note per decision (why it routed, or why nothing did)."""
    plans: list[RunPlan] = []
    notes: list[str] = []
    seen: set[str] = set()
    for calling, called, ip in senders:
        if called in seen:
            continue
        seen.add(called)
        rules = rules_by_called_ae.get(called)
        if rules is None:
            # Received on a title the node no longer serves (config changed since).
            notes.append(f"called AE {called!r} is no longer configured")
            continue
        for decision in rules.evaluate(header, SenderContext(calling, called, ip)).decisions:
            notes.append(f"{called}/{decision.rule}: {', '.join(decision.reasons)}")
            if not decision.model:
                continue
            destinations = tuple(bind_sender(name, calling) for name in decision.destinations)
            plan = RunPlan(
                decision.rule,
                decision.model,
                destinations,
                decision.preview,
                decision.urgent,
                card=decision.card,
            )
            if decision.study is not None:
                # A study rule's claim: once per rule, whichever title's rules named it first.
                if not any(p.study and p.rule == decision.rule for p in plans):
                    claim = StudyClaim(
                        called,
                        decision.roles,
                        decision.order_values,
                        decision.study.deadline_seconds,
                    )
                    plans.append(replace(plan, study=claim))
                continue
            same = [
                n
                for n, other in enumerate(plans)
                if other.study is None
                and (other.model, other.destinations) == (plan.model, plan.destinations)
            ]
            if not same:
                plans.append(plan)
            else:
                # One run serves both rules (same UIDs): it makes the preview and card if
                # either asks, and is urgent if either says so.
                first = plans[same[0]]
                plans[same[0]] = replace(
                    first,
                    preview=first.preview or plan.preview,
                    urgent=first.urgent or plan.urgent,
                    card=first.card or plan.card,
                )
    return plans, notes

"""Remedy-aware early stopping: no ASHA rung before a trial's remedies have acted a full epoch.

Dampening and freezing start at a fraction of training (``dampen_start``, ``freeze_start``); until
then a remedy trial is plain LSQ. An ASHA rung placed earlier would judge the remedy on evidence
from epochs where it did not exist. The rule used here: a remedy that starts at fraction ``f`` of
``T`` epochs is active from epoch ``f*T``; its first fully active epoch ends at ``ceil(f*T) + 1``.
The first rung (ASHA's grace period) must not come earlier than that for the *latest* start the
space can sample, so every trial, whatever it samples, passes its own remedy start with one full
epoch to spare before it can be stopped.
"""

from __future__ import annotations

import math
from typing import Any

from oscqat.config import TrainConfig, method_dampens, method_freezes

REMEDY_STARTS = (("dampen_start", method_dampens), ("freeze_start", method_freezes))


def _possible_values(space, base: dict, name: str) -> list[Any]:
    """Every value ``name`` can take in a trial: the space's range/choices, else base, else the default."""
    spec = space.params.get(name) if space is not None else None
    if spec is None:
        return [base.get(name, TrainConfig.model_fields[name].default)]
    kind = spec.type
    if kind in ("float", "int"):
        return [spec.low, spec.high]
    if kind == "categorical":
        return list(spec.choices)
    return [spec.value]


def latest_remedy_start(space, base: dict) -> float | None:
    """The largest remedy start (fraction of training) any trial of this space can sample; None
    when no sampled method uses a remedy."""
    methods = _possible_values(space, base, "method")
    starts = []
    for field, uses in REMEDY_STARTS:
        if any(uses(str(m)) for m in methods):
            starts.append(max(float(v) for v in _possible_values(space, base, field)))
    return max(starts) if starts else None


def first_safe_rung(start: float | None, max_epochs: int) -> int:
    """The earliest epoch at which a remedy starting at ``start`` has been active a full epoch."""
    if start is None:
        return 1
    begins = start * max_epochs
    return min(max_epochs, math.ceil(begins - 1e-9) + 1)


def rung_epochs(grace: int, reduction_factor: float, max_epochs: int) -> list[float]:
    """ASHA's rung milestones below the full budget (Ray's ``_Bracket`` spacing, bracket 0)."""
    count = int(math.log(max_epochs / grace) / math.log(reduction_factor) + 1)
    rungs = [grace * reduction_factor**k for k in range(count)]
    return [r for r in rungs if r < max_epochs]


def resolve_grace(budget, start: float | None, where: str = "budget.grace_period") -> int:
    """The grace period to use: ``auto`` -> the first safe rung; an explicit one is checked.

    Raises ValueError (naming the field) when an explicit grace period would stop a remedy trial
    before its remedy acted, unless ``budget.allow_early_rungs`` is set.
    """
    safe = first_safe_rung(start, budget.max_epochs)
    if budget.grace_period == "auto":
        return safe
    grace = int(budget.grace_period)
    if grace < safe and not budget.allow_early_rungs:
        raise ValueError(
            f"{where}: {grace} would stop trials before their remedies act: the space samples remedy starts "
            f"up to {start:g} of {budget.max_epochs} epochs, so a remedy may begin at epoch "
            f"{start * budget.max_epochs:g} and the first rung must be at epoch {safe} or later. Use "
            f"'grace_period: auto', a value >= {safe}, or set 'budget.allow_early_rungs: true' to accept it")
    return grace


def describe_rungs(grace: int, reduction_factor: float, max_epochs: int, start: float | None) -> str:
    """One line for the campaign's start: where ASHA may stop trials, and why there."""
    rungs = rung_epochs(grace, reduction_factor, max_epochs)
    where = ", ".join(f"{r:g}" for r in rungs) if rungs else "none (every trial trains the full budget)"
    why = (f"; remedies start by epoch {start * max_epochs:g} at the latest" if start is not None
           else "; no remedy in the space")
    return f"ASHA rungs at epoch {where} of {max_epochs} (grace {grace}, factor {reduction_factor:g}){why}"


def check_campaign_rungs(campaign, spaces: dict) -> dict[str, tuple[int, float | None]]:
    """``{target label: (grace, latest remedy start)}``; raises ValueError naming the field."""
    out = {}
    for target in campaign.targets:
        if target.label not in spaces:
            continue
        start = latest_remedy_start(spaces[target.label], campaign.base)
        if campaign.budget.scheduler != "asha":
            out[target.label] = (campaign.budget.max_epochs, start)
            continue
        out[target.label] = (resolve_grace(campaign.budget, start,
                                           f"budget.grace_period (target {target.label})"), start)
    return out

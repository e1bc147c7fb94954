"""A target's outcome: the one rule for its best trial, its trial counts, its confirmed winner.

``rank_complete`` is the definition of "best" every reader uses: the driver on Optuna's trials
(``target_result``), the reports on the merged MLflow/Optuna records (``reports.store.ranked``)
and the confirm stage when it picks its candidates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from search.campaign import Campaign, Target
from search.uris import redact

log = logging.getLogger("search.runner")
T = TypeVar("T")


def rank_complete(items: Iterable[T], *, state: Callable[[T], str], value: Callable[[T], float | None],
                  order: Callable[[T], object]) -> list[T]:
    """COMPLETE items with a value, best (highest) first; equal values keep search order.

    Only COMPLETE counts: a pruned trial's value is from an earlier epoch and a failed one has
    none worth comparing."""
    done = [x for x in items if state(x) == "COMPLETE" and value(x) is not None]
    return sorted(done, key=lambda x: (-value(x), order(x)))


@dataclass
class TargetResult:
    target: str
    best_trial_id: str | None
    best_val_top1: float | None
    method: str | None
    params: dict
    counts: dict
    confirmed: dict | None = None  # the confirm stage's winner (ConfirmSummary.to_dict()), if any
    confirm_ties: list | None = None  # configs tied with the confirmed winner on mean selection value


def target_result(campaign: Campaign, target: Target, tstate: dict | None = None) -> TargetResult:
    """Best COMPLETE trial of the target's study, trial counts by state, and (given the target's
    state) the confirmed winner."""
    import optuna

    from search.searcher import TRIAL_ID_ATTR, make_storage, storage_exists

    if not storage_exists(campaign.optuna_storage):  # read-only: never create the database
        return TargetResult(target.label, None, None, None, {}, {})
    try:
        study = optuna.load_study(study_name=campaign.study_name(target), storage=make_storage(campaign.optuna_storage))
    except KeyError:
        return TargetResult(target.label, None, None, None, {}, {})
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    ranked = rank_complete(trials, state=lambda t: t.state.name, value=lambda t: t.value, order=lambda t: t.number)
    if not ranked:
        return TargetResult(target.label, None, None, None, {}, counts)
    best = ranked[0]
    confirmed, ties = confirmed_result(tstate or {})
    return TargetResult(target.label, best.user_attrs.get(TRIAL_ID_ATTR), best.value, best.params.get("method"),
                        dict(best.params), counts, confirmed, ties)


def confirmed_result(tstate: dict) -> tuple[dict | None, list]:
    """The confirmed winner recorded in a target's state (and the configs tied with it)."""
    from search.confirm import ConfirmSummary, winner

    rows = (tstate.get("confirm") or {}).get("summary") or []
    summaries = []
    for row in rows:
        summ = ConfirmSummary(row["trial_id"], int(row.get("search_rank", 0)))
        summ.val = {int(k): v for k, v in (row.get("val") or {}).items()}
        summ.test = {int(k): v for k, v in (row.get("test") or {}).items()}
        summaries.append(summ)
    best, ties = winner(summaries)
    return (best.to_dict() if best else None), ties


def summarise_parent(campaign: Campaign, target: Target, client, parent_id: str, tstate: dict) -> None:
    res = target_result(campaign, target, tstate)
    try:
        if res.confirmed is not None:
            c = res.confirmed
            client.set_tag(parent_id, "oscqat.confirmed_trial_id", c["trial_id"])
            client.set_tag(parent_id, "oscqat.confirm_seeds", json.dumps(c["seeds"]))
            if res.confirm_ties:
                client.set_tag(parent_id, "oscqat.confirm_ties", json.dumps(res.confirm_ties))
            for key in ("val_top1_mean", "val_top1_std", "test_top1_mean", "test_top1_std"):
                if c.get(key) is not None:
                    client.log_metric(parent_id, f"confirmed_{key}", c[key])
        if res.best_val_top1 is not None:
            client.log_metric(parent_id, "best_val_top1", res.best_val_top1)
            client.set_tag(parent_id, "oscqat.best_trial_id", res.best_trial_id or "")
            client.set_tag(parent_id, "oscqat.best_method", res.method or "")
            client.set_tag(parent_id, "oscqat.best_params", json.dumps(res.params, sort_keys=True)[:4000])
        for state_name, n in res.counts.items():
            client.log_metric(parent_id, f"trials_{state_name.lower()}", n)
        client.set_terminated(parent_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write the summary of %s to MLflow: %s", target.label, redact(str(exc)).splitlines()[0][:300])

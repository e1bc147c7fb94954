"""The confirm stage: retrain a target's top-k search configs with fresh seeds, pick the winner.

A search's best trial is the best of N draws on one selection split with one seed: optimistic by
selection bias, and ties between trials are common on small splits. After the search, the top-k
COMPLETE configs (by final selection value, ties broken by search order) are retrained to the full
budget with ``campaign.confirm_seeds()`` as a second Tuner (a grid over config x seed, no early
stopping), logged as child runs tagged ``oscqat.stage=confirm`` under the target's parent. The
confirmed winner is the config with the best *mean* selection value; its test top-1 is reported
as mean ± sample std over the seeds. The test split never takes part in any choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from oscqat.stats import TIE_TOL, mean_std

log = logging.getLogger(__name__)

CONFIRM_OF = "confirm_of"  # the search trial id a confirm run retrains (Tune config key and MLflow tag)


@dataclass
class Candidate:
    """A search trial chosen for confirmation: its full trial params (sampled + fixed)."""

    trial_id: str
    params: dict
    val_top1: float
    number: int
    starting_point: str | None = None


@dataclass
class ConfirmSummary:
    """One confirmed config: its selection and test values per seed, summarised."""

    trial_id: str
    rank: int = 0  # the config's search rank (1 = the search's best): breaks ties in mean
    val: dict[int, float] = field(default_factory=dict)  # seed -> final val_top1
    test: dict[int, float] = field(default_factory=dict)  # seed -> test_top1
    failed: int = 0

    @property
    def seeds(self) -> list[int]:
        return sorted(self.val)

    @staticmethod
    def _summary(values: dict) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        ms = mean_std(list(values.values()))
        return ms.mean, ms.std

    val_mean = property(lambda self: self._summary(self.val)[0])
    val_std = property(lambda self: self._summary(self.val)[1])
    test_mean = property(lambda self: self._summary(self.test)[0])
    test_std = property(lambda self: self._summary(self.test)[1])

    def to_dict(self) -> dict:
        return {"trial_id": self.trial_id, "search_rank": self.rank, "seeds": self.seeds,
                "val": dict(self.val), "test": dict(self.test), "val_top1_mean": self.val_mean,
                "val_top1_std": self.val_std, "test_top1_mean": self.test_mean, "test_top1_std": self.test_std,
                "failed": self.failed}


def select_candidates(study, space, top_k: int) -> list[Candidate]:
    """The top-k COMPLETE trials of ``study`` by value (ties: search order), with full params.

    Fixed parameters (e.g. ``dampen_aggregation``) are not in Optuna's params; replaying the
    space's define-by-run on a ``FixedTrial`` restores them, exactly as the search merged them.
    """
    import optuna

    from search.searcher import START_POINT_ATTR, TRIAL_ID_ATTR

    from search.results import rank_complete

    complete = rank_complete([t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(TRIAL_ID_ATTR)],
                             state=lambda t: t.state.name, value=lambda t: t.value, order=lambda t: t.number)
    out = []
    for t in complete[:top_k]:
        params = space.sample(optuna.trial.FixedTrial(dict(t.params)))
        out.append(Candidate(t.user_attrs[TRIAL_ID_ATTR], params, float(t.value), t.number,
                             t.user_attrs.get(START_POINT_ATTR)))
    return out


def summarise(rows: Iterable[dict]) -> list[ConfirmSummary]:
    """Group confirm results (dicts with ``confirm_of``, ``rank``, ``seed``, ``state``, ``val_top1``,
    ``test_top1``) by config; best mean selection value first, ties by search rank."""
    by_trial: dict[str, ConfirmSummary] = {}
    for row in rows:
        summ = by_trial.setdefault(str(row[CONFIRM_OF]), ConfirmSummary(str(row[CONFIRM_OF]), int(row.get("rank", 0))))
        if row.get("state") != "COMPLETE" or row.get("val_top1") is None:
            summ.failed += 1
            continue
        seed = int(row["seed"])
        summ.val[seed] = float(row["val_top1"])
        if row.get("test_top1") is not None:
            summ.test[seed] = float(row["test_top1"])
    ranked = [s for s in by_trial.values() if s.val]
    ranked.sort(key=lambda s: (-round(s.val_mean, 9), s.rank))  # means equal to 1e-9 are ties: rank decides
    return ranked + [s for s in by_trial.values() if not s.val]


def winner(summaries: list[ConfirmSummary]) -> tuple[ConfirmSummary | None, list[str]]:
    """The confirmed winner and the ids of configs tied with it on mean selection value."""
    if not summaries or not summaries[0].val:
        return None, []
    best = summaries[0]
    ties = [s.trial_id for s in summaries[1:] if s.val and abs(s.val_mean - best.val_mean) <= TIE_TOL]
    return best, ties


# the confirm Tuner --------------------------------------------------------------------------
def confirm_path(campaign, target) -> str:
    return f"{campaign.ray_storage_path()}/{target.slug}-confirm"


def run_confirm(campaign, target, space, tstate: dict, save_phase, *, base_config: dict, fp_state: dict,
                experiment_id: str, parent_id: str, resume: bool) -> list[ConfirmSummary]:
    """Retrain the target's top-k configs with fresh seeds (a grid Tuner); record the summary.

    The candidates are chosen once and kept in ``state.json``: a resumed campaign confirms the
    same configs, restores the confirm Tuner from its own experiment folder, and the MLflow
    callback finds the runs it already made by trial id, so nothing is duplicated.
    """
    import optuna
    from ray import tune

    from search.searcher import make_storage
    from search.tracking import MlflowTrialCallback
    from search.trainable import confirm_trial
    from search.tuners import build_confirm_tuner, with_trial_resources

    conf = tstate.get("confirm") or {}
    if not conf.get("candidates"):
        study = optuna.load_study(study_name=campaign.study_name(target), storage=make_storage(campaign.optuna_storage))
        candidates = select_candidates(study, space, campaign.confirm.top_k)
        conf = {"candidates": [c.__dict__ for c in candidates], "seeds": campaign.confirm_seeds(),
                "experiment_path": confirm_path(campaign, target)}
        save_phase(status="confirming", confirm=conf)
    else:
        save_phase(status="confirming")
    candidates = [Candidate(**c) for c in conf["candidates"]]
    if not candidates:
        print(f"confirm {target.label}: no COMPLETE search trial to confirm")
        return []
    points = {c.trial_id: c.params for c in candidates}
    ranks = {c.trial_id: i + 1 for i, c in enumerate(candidates)}
    exp_path = conf["experiment_path"]
    trainable = with_trial_resources(campaign, confirm_trial, points=points, base_config=base_config,
                                     fp_state=fp_state)
    if resume and tune.Tuner.can_restore(exp_path):
        print(f"resuming the confirm stage of {target.label} from {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            _drop_unsaved_confirm_runs(campaign, experiment_id, parent_id)
        callback = MlflowTrialCallback(campaign.mlflow.tracking_uri, experiment_id, parent_id, campaign.name,
                                       target.label, base_config, campaign.budget.max_epochs,
                                       campaign.study_name(target), stage="confirm", points=points, ranks=ranks)
        grid = {CONFIRM_OF: tune.grid_search([c.trial_id for c in candidates]),
                "seed": tune.grid_search(list(conf["seeds"]))}
        tuner = build_confirm_tuner(campaign, target, trainable, grid, exp_path.rsplit("/", 1)[-1], callback,
                                    len(candidates) * len(conf["seeds"]))
    print(f"confirming {target.label}: top {len(candidates)} config(s) x seeds {list(conf['seeds'])}, "
          f"{campaign.budget.max_epochs} epochs each")
    grid = tuner.fit()
    from search import signals

    signals.raise_if_interrupted()  # a stopped confirm Tuner returns normally: it is not finished
    rows = []
    for result in grid:
        cfg, metrics = result.config or {}, result.metrics or {}
        done = result.error is None and int(metrics.get("epoch", 0)) >= campaign.budget.max_epochs \
            and not metrics.get("failure_reason")
        rows.append({CONFIRM_OF: cfg.get(CONFIRM_OF), "seed": cfg.get("seed"), "rank": ranks.get(cfg.get(CONFIRM_OF), 0),
                     "state": "COMPLETE" if done else "FAIL", "val_top1": metrics.get("val_top1"),
                     "test_top1": metrics.get("test_top1")})
    summaries = summarise(r for r in rows if r[CONFIRM_OF] is not None)
    conf["summary"] = [s.to_dict() for s in summaries]
    save_phase(confirm=conf)
    return summaries


def _drop_unsaved_confirm_runs(campaign, experiment_id: str, parent_id: str) -> None:
    """Confirm runs of a driver that died before Tune saved the confirm stage: it starts over, so
    their runs would be duplicates. They are deleted (MLflow keeps deleted runs restorable)."""
    from search.tracking import TAG, client_for

    client = client_for(campaign.mlflow.tracking_uri)
    runs = client.search_runs([experiment_id], max_results=10_000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TAG}stage` = 'confirm'")
    for run in runs:
        client.delete_run(run.info.run_id)
    if runs:
        log.warning("deleted %d confirm run(s) left by a driver that stopped before Tune saved them", len(runs))

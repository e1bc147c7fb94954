"""Read a campaign back: its files, its MLflow runs and its Optuna studies, merged per trial.

MLflow holds what each trial logged (full config, per-epoch metrics, artifacts); Optuna holds
the searcher's view (states, sampled params, starting-point names). Trials are joined by the
Tune trial id, which both carry, so a report still works when one side lost a few writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from search.campaign import Campaign, Target, load_campaign
from search.results import rank_complete
from search.state import CAMPAIGN_FILE, CampaignError, locate_campaign, read_state
from search import uris
from search.searcher import START_POINT_ATTR, TRIAL_ID_ATTR, make_storage, storage_exists
from search.uris import redact
from search.tracking import TAG, client_for

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
REMEDIES = ("dampen", "freeze", "dampen+freeze")


class ReportError(RuntimeError):
    """A report cannot be made; ``code`` is the CLI exit status (2 bad input, 1 backend)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class TrialRecord:
    """One trial as both MLflow and Optuna know it (either side may be missing)."""

    trial_id: str
    state: str
    run_id: str | None = None
    method: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # MLflow params: the full TrainConfig as strings
    sampled: dict = field(default_factory=dict)  # Optuna's sampled params (typed)
    final: dict[str, float] = field(default_factory=dict)  # last-epoch metrics
    val_top1: float | None = None  # final val_top1 (after BN re-estimation)
    number: int | None = None  # Optuna trial number (search order)
    starting_point: str | None = None
    optuna_epochs: int = 0  # epochs Optuna saw (intermediate values)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def is_remedy(self) -> bool:
        return self.method in REMEDIES


def check_store_exists(uri: str, what: str, option: str) -> None:
    """A sqlite URI to a missing file would silently create an empty store: refuse instead."""
    path = uris.store_file(uri)
    if path is not None and not path.is_file():
        raise ReportError(f"{what} {redact(uri)!r} does not exist (relative sqlite paths are resolved from the current "
                          f"directory {Path.cwd()}); run from the campaign's directory or pass {option}", code=2)


def absolute_uri(uri: str) -> str:
    """Make a relative ``sqlite:///`` URI absolute, so an exported config works from any directory."""
    return uris.absolute(uri)


class CampaignStore:
    """A campaign directory plus its MLflow and Optuna backends (URIs overridable)."""

    def __init__(self, campaign_dir: Path, campaign: Campaign, tracking_uri: str | None = None,
                 optuna_storage: str | None = None):
        self.campaign_dir = campaign_dir
        self.campaign = campaign
        self.tracking_uri = tracking_uri or campaign.mlflow.tracking_uri
        self.optuna_storage = optuna_storage or campaign.optuna_storage
        self.state = read_state(campaign_dir)
        self._trials: dict[str, list[TrialRecord]] = {}
        self._histories: dict[tuple[str, str], list[tuple[int, float]]] = {}
        self._confirm: dict[str, list[dict]] = {}

    @classmethod
    def open(cls, name_or_path: str, tracking_uri: str | None = None, optuna_storage: str | None = None,
             storage_path: str = "./ray_results") -> "CampaignStore":
        try:
            campaign_dir = locate_campaign(name_or_path, storage_path)
        except CampaignError as exc:
            raise ReportError(str(exc), code=2) from None
        campaign = load_campaign(campaign_dir / CAMPAIGN_FILE)
        store = cls(campaign_dir, campaign, tracking_uri, optuna_storage)
        check_store_exists(store.tracking_uri, "MLflow store", "--tracking-uri")
        check_store_exists(store.optuna_storage, "Optuna storage", "--optuna-storage")
        return store

    # backends -------------------------------------------------------------------------
    @cached_property
    def client(self):
        return client_for(self.tracking_uri)

    @cached_property
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.campaign.experiment_name)
        if exp is None:
            raise ReportError(f"MLflow experiment {self.campaign.experiment_name!r} not found at "
                              f"{redact(self.tracking_uri)}; is this the campaign's tracking URI?")
        return exp.experiment_id

    @property
    def targets(self) -> list[Target]:
        return list(self.campaign.targets)

    def target(self, label: str) -> Target:
        """The target named ``arch/bits`` (or ``arch-bits``); a bad name is a user error."""
        for t in self.campaign.targets:
            if label.strip().lower() in (t.label.lower(), t.slug.lower()):
                return t
        choices = ", ".join(t.label for t in self.campaign.targets)
        raise ReportError(f"campaign {self.campaign.name!r} has no target {label!r}; choose one of {choices}", code=2)

    def parent_run_id(self, target: Target) -> str | None:
        """From ``state.json`` when that run exists in this store, else found by its tags."""
        rid = self.state.get("targets", {}).get(target.label, {}).get("parent_run_id")
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG}campaign` = '{self.campaign.name}' and tags.`{TAG}target` = '{target.label}' "
                          f"and tags.`{TAG}role` = 'parent'", max_results=10)
        ids = [r.info.run_id for r in runs]
        if rid in ids:
            return rid
        return ids[0] if ids else None

    def study(self, target: Target):
        """The target's Optuna study, or None when the storage has no such study."""
        import optuna

        if not storage_exists(self.optuna_storage):  # read-only: never create the database
            return None
        try:
            return optuna.load_study(study_name=self.campaign.study_name(target),
                                     storage=make_storage(self.optuna_storage))
        except KeyError:
            return None

    # trials ------------------------------------------------------------------------------
    def trials(self, target: Target) -> list[TrialRecord]:
        """All trials of a target in search order (Optuna number, then trial id)."""
        if target.label in self._trials:
            return self._trials[target.label]
        records: dict[str, TrialRecord] = {}
        parent = self.parent_run_id(target)
        if parent is not None:
            runs = self.client.search_runs([self.experiment_id], max_results=50_000,
                                           filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
            for run in runs:
                tags = run.data.tags
                tid = tags.get(f"{TAG}trial_id")
                if not tid or tags.get(f"{TAG}role", "trial") != "trial" or tags.get(f"{TAG}stage", "search") != "search":
                    continue
                state = tags.get(f"{TAG}state") or ("RUNNING" if run.info.status == "RUNNING" else "FAIL")
                final = {k: float(v) for k, v in run.data.metrics.items() if math.isfinite(v)}
                records[tid] = TrialRecord(trial_id=tid, state=state, run_id=run.info.run_id,
                                           method=run.data.params.get("method"), params=dict(run.data.params),
                                           final=final, val_top1=final.get("val_top1"), tags=dict(tags))
        study = self.study(target)
        if study is not None:
            for t in study.get_trials(deepcopy=False):
                tid = t.user_attrs.get(TRIAL_ID_ATTR)
                if not tid:
                    continue
                rec = records.setdefault(tid, TrialRecord(trial_id=tid, state=t.state.name))
                rec.state = t.state.name if t.state.name != "WAITING" else "RUNNING"
                rec.number = t.number
                rec.sampled = dict(t.params)
                rec.starting_point = t.user_attrs.get(START_POINT_ATTR)
                rec.method = rec.method or t.params.get("method")
                rec.optuna_epochs = len(t.intermediate_values)
                if rec.val_top1 is None:
                    values = t.intermediate_values
                    rec.val_top1 = t.value if t.value is not None else (values[max(values)] if values else None)
        out = sorted(records.values(), key=lambda r: (r.number if r.number is not None else 1 << 30, r.trial_id))
        self._trials[target.label] = out
        return out

    def counts(self, target: Target) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for rec in self.trials(target):
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts

    def ranked(self, target: Target, method_filter=None) -> list[TrialRecord]:
        """COMPLETE trials by final val_top1, best first, by the rule the driver uses (``search.results.rank_complete``)."""
        recs = [r for r in self.trials(target) if method_filter is None or method_filter(r)]
        position = {r.trial_id: i for i, r in enumerate(recs)}  # trials() is in search order
        return rank_complete(recs, state=lambda r: r.state, value=lambda r: r.val_top1,
                             order=lambda r: position[r.trial_id])

    def best(self, target: Target, method_filter=None) -> TrialRecord | None:
        ranked = self.ranked(target, method_filter)
        return ranked[0] if ranked else None

    # the confirm stage -----------------------------------------------------------------------
    def confirm_runs(self, target: Target) -> list[dict]:
        """The target's confirm-stage runs as rows ``{confirm_of, rank, seed, state, val_top1, test_top1, run_id}``."""
        if target.label in self._confirm:
            return self._confirm[target.label]
        from search.confirm import CONFIRM_OF

        rows = []
        parent = self.parent_run_id(target)
        if parent is not None:
            runs = self.client.search_runs(
                [self.experiment_id], max_results=50_000,
                filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{TAG}stage` = 'confirm'")
            for run in runs:
                tags, metrics = run.data.tags, run.data.metrics
                state = tags.get(f"{TAG}state") or ("RUNNING" if run.info.status == "RUNNING" else "FAIL")
                rows.append({CONFIRM_OF: tags.get(f"{TAG}{CONFIRM_OF}"), "rank": int(tags.get(f"{TAG}confirm_rank", 0)),
                             "seed": int(run.data.params.get("seed", tags.get(f"{TAG}confirm_seed", -1))),
                             "state": state, "val_top1": metrics.get("val_top1"),
                             "test_top1": metrics.get("test_top1"), "run_id": run.info.run_id})
        rows.sort(key=lambda r: (r["rank"], r["seed"]))
        self._confirm[target.label] = rows
        return rows

    def confirmed(self, target: Target):
        """``(winner, ties, summaries)`` of the confirm stage (winner None when it has no result)."""
        from search.confirm import summarise, winner

        summaries = summarise(r for r in self.confirm_runs(target) if r["confirm_of"])
        best, ties = winner(summaries)
        return best, ties, summaries

    def record(self, target: Target, trial_id: str) -> TrialRecord | None:
        return next((r for r in self.trials(target) if r.trial_id == trial_id), None)

    # metrics and artifacts ---------------------------------------------------------------
    def history(self, run_id: str | None, key: str) -> list[tuple[int, float]]:
        """``[(epoch, value)]`` of one metric, one value per epoch (the latest logged wins)."""
        if run_id is None:
            return []
        if (run_id, key) not in self._histories:
            by_step: dict[int, tuple[int, float]] = {}
            for m in self.client.get_metric_history(run_id, key):
                if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                    by_step[m.step] = (m.timestamp, m.value)
            self._histories[(run_id, key)] = sorted((s, v) for s, (_, v) in by_step.items())
        return self._histories[(run_id, key)]

    def download(self, run_id: str, artifact: str, dst: Path) -> Path | None:
        """Download one artifact of a run into ``dst``; None when the run has no such artifact."""
        names = {a.path for a in self.client.list_artifacts(run_id, str(Path(artifact).parent)
                                                            if "/" in artifact else None)}
        if artifact not in names:
            return None
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact, str(dst)))

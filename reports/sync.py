"""``report sync``: backfill MLflow from Ray Tune's own per-trial ``result.json`` files.

If the tracking server was down longer than the callback's retries (or the driver died with
writes buffered), MLflow misses epochs, states, artifacts or whole child runs. Ray wrote every
reported epoch to ``<experiment>/<trial dir>/result.json`` regardless; this replays what is missing
(never duplicates: epochs already in MLflow are skipped).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reports.store import CampaignStore
from search.run_writer import (CONFIG_FILE, LAYER_OSC_FILE, RUN_STATUS, end_tags, finite_metrics, metric_batches,
                               param_batches, trial_run_tags, write_layer_oscillations)
from search.tracking import (TAG, ensure_parent_run, find_child_runs, get_or_create_experiment, parse_layer_osc,
                             trial_description, trial_param_values, trial_run_name)


@dataclass
class SyncSummary:
    target: str
    trials_seen: int = 0
    runs_created: int = 0
    epochs_logged: int = 0
    states_set: int = 0
    artifacts_logged: int = 0
    parent_finished: bool = False


def read_results(path: Path) -> list[dict]:
    """Ray's result.json: one JSON object per line (a torn last line is ignored)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def trial_dirs(exp_path: Path) -> list[Path]:
    return sorted(p for p in exp_path.iterdir() if p.is_dir() and (p / "result.json").is_file()) \
        if exp_path.is_dir() else []


def _trial_state(store: CampaignStore, tdir: Path, results: list[dict], optuna_state: str | None,
                 target_done: bool) -> str | None:
    from search.searcher import trial_state

    if optuna_state in RUN_STATUS:
        return optuna_state
    if optuna_state is None and target_done:
        error = (tdir / "error.txt").is_file() or (tdir / "error.pkl").is_file()
        return trial_state(results[-1] if results else None, error, store.campaign.budget.max_epochs).name
    return None  # still running (or unknown): leave it open


def sync_target(store: CampaignStore, target) -> SyncSummary:
    summary = SyncSummary(target.label)
    client = store.client
    tstate = store.state.get("targets", {}).get(target.label, {})
    exp_path = Path(tstate.get("experiment_path") or store.campaign_dir / target.slug)
    fp_path = tstate.get("fp_checkpoint")
    experiment_id = get_or_create_experiment(client, store.campaign.experiment_name)
    parent_id = store.parent_run_id(target)  # the experiment exists now (re-created if it was lost)
    if parent_id is None:
        parent_id = ensure_parent_run(client, experiment_id, store.campaign.name, target, {
            "oscqat.ray_experiment_path": str(exp_path), "oscqat.optuna_study": store.campaign.study_name(target),
            "oscqat.fp_checkpoint": fp_path or ""})
    existing = find_child_runs(client, experiment_id, parent_id)
    study = store.study(target)
    optuna_states = {t.user_attrs.get("tune_trial_id"): t.state.name for t in study.get_trials(deepcopy=False)} \
        if study is not None else {}
    target_done = tstate.get("status") == "done"
    for tdir in trial_dirs(exp_path):
        results = [r for r in read_results(tdir / "result.json") if "trial_id" in r]
        if not results:
            continue
        tid = results[0]["trial_id"]
        summary.trials_seen += 1
        params = json.loads((tdir / "params.json").read_text()) if (tdir / "params.json").is_file() else {}
        run = existing.get(tid)
        if run is None:
            tags = trial_run_tags(parent_id, tid, store.campaign.name, target.label, store.campaign.study_name(target),
                                  synced_from="ray result.json")
            run = client.create_run(experiment_id, run_name=trial_run_name(target.label, params.get("method"), tid), tags=tags)
            cfg = store.campaign.trial_config(target, params, fp_path)
            for batch in param_batches(trial_param_values(cfg, params)):
                client.log_batch(run.info.run_id, params=batch)
            summary.runs_created += 1
        run_id = run.info.run_id
        logged = {m.step for m in client.get_metric_history(run_id, "val_top1")}
        by_epoch = {}
        for r in results:  # after a restore an epoch can appear twice: the latest wins
            by_epoch[int(r.get("epoch", r.get("training_iteration", 0)))] = r
        metrics = []
        for epoch, r in sorted(by_epoch.items()):
            if epoch in logged or epoch <= 0:
                continue
            metrics += finite_metrics(r, epoch, int(float(r.get("timestamp", 0)) * 1000))
            summary.epochs_logged += 1
        for batch in metric_batches(metrics):
            client.log_batch(run_id, metrics=batch)
        current = client.get_run(run_id)
        state = _trial_state(store, tdir, list(by_epoch.values()), optuna_states.get(tid), target_done)
        if state is not None and not current.data.tags.get(f"{TAG}state"):
            reason = next((r["failure_reason"] for r in results if r.get("failure_reason")), None)
            for key, value in end_tags(state, reason).items():
                client.set_tag(run_id, key, value)
            epochs = max(by_epoch, default=0)
            client.update_run(run_id, name=trial_run_name(target.label, params.get("method"), tid, state, epochs))
            client.set_tag(run_id, "mlflow.note.content", trial_description(
                state, epochs, store.campaign.budget.max_epochs, by_epoch.get(epochs, {}), reason))
            client.set_tag(run_id, f"{TAG}epochs", str(epochs))
            summary.states_set += 1
        if state is not None and (not client.list_artifacts(run_id)
                                  or _osc_history_incomplete(client, run_id, by_epoch)):
            _log_artifacts(store, target, run_id, tid, params, fp_path, list(by_epoch.items()))
            summary.artifacts_logged += 1
        if state is not None and current.info.status == "RUNNING":
            client.set_terminated(run_id, RUN_STATUS[state])
    if target_done:
        summary.parent_finished = _finish_parent(store, target, parent_id)
    return summary


def _finish_parent(store: CampaignStore, target, parent_id: str) -> bool:
    """A finished target whose parent run missed its summary (MLflow down at the end): write it."""
    from search.results import summarise_parent

    parent = store.client.get_run(parent_id)
    if parent.info.status != "RUNNING" and "best_val_top1" in parent.data.metrics:
        return False
    campaign = store.campaign.model_copy(update={"optuna_storage": store.optuna_storage})
    summarise_parent(campaign, target, store.client, parent_id, {})
    return store.client.get_run(parent_id).info.status == "FINISHED"


def _osc_history_incomplete(client, run_id: str, by_epoch: dict) -> bool:
    """The run's layer_oscillations.json lacks epochs Ray has (the driver kept only post-resume epochs)."""
    want = {e for e, r in by_epoch.items() if r.get("layer_osc")}
    if not want or LAYER_OSC_FILE not in {a.path for a in client.list_artifacts(run_id)}:
        return bool(want)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, LAYER_OSC_FILE, tmp)
            have = {int(h["epoch"]) for h in json.loads(Path(path).read_text())}
        except (OSError, ValueError, KeyError, TypeError):
            return True
    return not want <= have


def _log_artifacts(store, target, run_id: str, tid: str, params: dict, fp_path, epochs: list) -> None:
    from oscqat.config import TrainConfig
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            cfg = TrainConfig.model_validate(store.campaign.trial_config(target, params, fp_path))
            (tmp / CONFIG_FILE).write_text(cfg.to_yaml())
        except ValueError:  # e.g. the FP checkpoint is gone: the params on the run still say it all
            pass
        history = [{"epoch": e, "layers": parse_layer_osc(r["layer_osc"])} for e, r in sorted(epochs) if r.get("layer_osc")]
        write_layer_oscillations(tmp, history)  # as the driver logs it
        store.client.log_artifacts(run_id, str(tmp))


def sync_campaign(store: CampaignStore) -> list[SyncSummary]:
    return [sync_target(store, t) for t in store.targets]

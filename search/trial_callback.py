"""The driver-side Tune callback writing MLflow: one child run per trial (see ``search.tracking``).

Kept apart from ``search.tracking`` because it imports Ray Tune.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ray.tune import Callback

from search.run_writer import (CONFIG_FILE, RUN_STATUS, BufferedWriter, end_tags, finite_metrics, param_batches,
                               trial_run_tags, write_layer_oscillations)
from search.tracking import (TAG, client_for, complete_osc_history, find_child_runs, parse_layer_osc,
                             trial_description, trial_param_values, trial_run_name)

log = logging.getLogger("search.tracking")


class MlflowTrialCallback(Callback):
    """Driver-side Tune callback writing one MLflow child run per trial (picklable for restore)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, campaign: str, target_label: str,
                 base_config: dict, max_epochs: int, study_name: str, stage: str = "search",
                 points: dict | None = None, ranks: dict | None = None):
        """``stage``: ``search`` (trial configs are sampled params) or ``confirm`` (configs are
        ``{confirm_of, seed}``; ``points`` maps a search trial id to its params, ``ranks`` to its rank)."""
        self.tracking_uri = tracking_uri
        self.stage = stage
        self.points = points or {}
        self.ranks = ranks or {}
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.campaign = campaign
        self.target_label = target_label
        self.base_config = base_config
        self.max_epochs = max_epochs
        self.study_name = study_name
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._client = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged_epoch: dict[str, int] = {}
        self._layer_osc: dict[str, list[dict]] = {}
        self._retries: dict[str, int] = {}
        self.writer = BufferedWriter()  # every MLflow write goes through it (buffered, retried)
        self._loaded_existing = False
        self._param_keys: dict[str, set[str]] = {}  # trial id -> params its run had when the driver (re)started

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_client", "_runs", "_logged_epoch", "_layer_osc", "_retries", "writer", "_loaded_existing",
                    "_param_keys"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        state = {"stage": "search", "points": {}, "ranks": {}, **state}  # callbacks pickled before the confirm stage
        self.__dict__.update(state)
        self._init_runtime()

    # plumbing -------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def _write(self, description: str, fn) -> None:
        self.writer.write(description, fn)

    def flush(self, attempts: int = 1, wait_s: float = 0.0, force: bool = False) -> bool:
        return self.writer.flush(attempts, wait_s, force)

    def _load_existing(self) -> None:
        if self._loaded_existing:
            return
        for trial_id, run in find_child_runs(self.client, self.experiment_id, self.parent_run_id).items():
            self._runs[trial_id] = run.info.run_id
            self._param_keys[trial_id] = set(run.data.params)
            history = self.client.get_metric_history(run.info.run_id, "val_top1")
            self._logged_epoch[trial_id] = max([self._logged_epoch.get(trial_id, 0), *(m.step for m in history)])
        self._loaded_existing = True

    def _ensure_run(self, trial) -> str | None:
        tid = trial.trial_id
        if tid in self._runs:
            return self._known_run(trial)
        if self.writer.backing_off():
            return None  # the server failed moments ago: do not stall the driver on it again
        try:
            self._load_existing()
        except Exception as exc:  # noqa: BLE001
            self.writer.failed("lookup of existing runs", exc)
            return None
        if tid in self._runs:
            return self._known_run(trial)
        extra = {}
        if self.stage == "confirm":
            from search.confirm import CONFIRM_OF

            source = trial.config.get(CONFIRM_OF)
            extra = {CONFIRM_OF: source, "confirm_rank": self.ranks.get(source, 0),
                     "confirm_seed": trial.config.get("seed")}
        tags = trial_run_tags(self.parent_run_id, tid, self.campaign, self.target_label, self.study_name,
                              self.stage, **extra)
        try:
            run = self.client.create_run(self.experiment_id, run_name=self._run_name(trial), tags=tags)
        except Exception as exc:  # noqa: BLE001
            self.writer.failed(f"creation of the run of {tid}", exc)
            return None
        run_id = run.info.run_id
        self._runs[tid] = run_id
        self._logged_epoch.setdefault(tid, 0)  # epochs buffered before the run existed stay counted
        self._log_params(trial, run_id)
        return run_id

    def _known_run(self, trial) -> str:
        """The trial's existing run. One found after a driver restart gets the params it lacks: the
        driver may have been killed between creating the run and logging its params."""
        logged = self._param_keys.pop(trial.trial_id, None)
        if logged is not None:
            self._log_params(trial, self._runs[trial.trial_id], skip=logged)
        return self._runs[trial.trial_id]

    def _log_params(self, trial, run_id: str, skip: set[str] = frozenset()) -> None:
        # what the search chose (active params only) and what the trial is; the fixed rest of the
        # config is on the parent run and in this run's train_config.yaml
        params = trial_param_values(self.base_config, self.trial_params(trial))
        for chunk in param_batches(params, skip):
            self._write(f"params of {trial.trial_id}", lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))

    def trial_params(self, trial) -> dict:
        """The params a trial trains with on top of ``base_config``: the sampled ones, or for a
        confirm run the search trial's params with its fresh seed."""
        if self.stage != "confirm":
            return dict(trial.config)
        from search.confirm import CONFIRM_OF

        return {**self.points[trial.config[CONFIRM_OF]], "seed": int(trial.config["seed"])}

    def _run_name(self, trial, state: str | None = None, epochs: int | None = None) -> str:
        method = self.trial_params(trial).get("method")
        name = trial_run_name(self.target_label, method, trial.trial_id, state, epochs)
        if self.stage == "confirm":
            from search.confirm import CONFIRM_OF

            name = f"confirm · {name.split(' · ', 2)[0]} · {method} · of {trial.config.get(CONFIRM_OF)} · seed " \
                   f"{trial.config.get('seed')}" + (" · FAILED" if state == "FAIL" else "")
        return name

    def _run_for(self, trial) -> str:
        """The trial's run id, created now if the server was down before; raises while it still is,
        so a buffered write that needs the run stays buffered instead of being dropped."""
        run_id = self._ensure_run(trial)
        if run_id is None:
            raise ConnectionError(f"no MLflow run for trial {trial.trial_id} yet")
        return run_id

    # Tune events -------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self._ensure_run(trial)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._ensure_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._ensure_run(trial)
        tid = trial.trial_id
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if "layer_osc" in result:
            hist = self._layer_osc.setdefault(tid, [])
            hist[:] = [h for h in hist if h["epoch"] < epoch] + [{"epoch": epoch, "layers": parse_layer_osc(result["layer_osc"])}]
        if epoch <= self._logged_epoch.get(tid, 0):
            return  # already logged (or buffered), e.g. before a driver restart: no duplicates
        metrics = finite_metrics(result, epoch)
        self._logged_epoch[tid] = epoch
        self._write(f"metrics of {tid} epoch {epoch}",
                    lambda: self.client.log_batch(self._run_for(trial), metrics=metrics))

    def on_trial_recover(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        self._retries[tid] = self._retries.get(tid, 0) + 1
        self._ensure_run(trial)
        n = self._retries[tid]
        self._write(f"retry tag of {tid}", lambda: self.client.set_tag(self._run_for(trial), f"{TAG}retries", str(n)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        from search.searcher import trial_state

        state = trial_state(result, False, self.max_epochs).name
        self._finish(trial, state, result.get("failure_reason"))

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = getattr(trial, "error_msg", None) or "trial raised (see Ray's error file)"
        self._finish(trial, "FAIL", str(reason).strip().splitlines()[-1] if reason else None)

    def _finish(self, trial, state: str, reason: str | None) -> None:
        self._ensure_run(trial)
        tid = trial.trial_id
        run = lambda: self._run_for(trial)  # noqa: E731 - resolved when the write goes out
        for key, value in end_tags(state, reason).items():
            self._write(f"{key} of {tid}", lambda key=key, value=value: self.client.set_tag(run(), key, value))
        result = trial.last_result or {}
        epochs = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        name = self._run_name(trial, state, epochs)
        note = trial_description(state, epochs, self.max_epochs, result, reason)
        self._write(f"name of {tid}", lambda: self.client.update_run(run(), name=name))
        self._write(f"description of {tid}", lambda: self.client.set_tag(run(), "mlflow.note.content", note))
        self._write(f"epochs of {tid}", lambda: self.client.set_tag(run(), f"{TAG}epochs", str(epochs)))
        self._write(f"artifacts of {tid}", lambda: self._log_artifacts(run(), trial))
        self._write(f"status of {tid}", lambda: self.client.set_terminated(run(), RUN_STATUS[state]))

    def _log_artifacts(self, run_id: str, trial) -> None:
        from oscqat.config import TrainConfig

        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig.model_validate({**self.base_config, **self.trial_params(trial)})
            (Path(tmp) / CONFIG_FILE).write_text(cfg.to_yaml())
            # The heatmap is drawn on demand by `oscqat report plot` (it cost the driver ~0.3 s
            # of CPU per trial, 90% of this callback); the data behind it is logged here.
            write_layer_oscillations(Path(tmp), complete_osc_history(trial, self._layer_osc.get(trial.trial_id, [])))
            self.client.log_artifacts(run_id, tmp)
        self._layer_osc.pop(trial.trial_id, None)  # delivered: free the driver's copy

    def on_experiment_end(self, trials, **info):
        if not self.flush(attempts=10, wait_s=3.0, force=True):
            log.error("%d MLflow write(s) could not be delivered; run `oscqat report sync` later", len(self.writer.pending))

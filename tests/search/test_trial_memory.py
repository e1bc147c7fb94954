"""Finished trials keep only the statistics oscqat may still ask Tune about."""

from __future__ import annotations

from ray.tune.experiment import Trial

from search.trial_memory import TrimFinishedTrials, trim_finished_trial


def _trial_with_results(epochs: int = 4) -> Trial:
    trial = Trial("__fake", stub=True, config={"lr": 0.1})
    for i in range(1, epochs + 1):
        trial.update_last_result({"val_top1": 0.5 + i / 100, "epoch": i, "training_iteration": i,
                                  "train_loss": 1.0 / i, "osc_frac": 0.01 * i, "frozen_frac": 0.0,
                                  "time_total_s": float(i), "layer_osc": "{}"})
    return trial


def test_finished_trial_keeps_the_scheduling_metrics_and_its_last_result():
    trial = _trial_with_results()
    before_json = len(trial.get_json_state()[1])
    last = dict(trial.last_result)
    TrimFinishedTrials().on_trial_complete(0, [trial], trial)
    meta = trial.run_metadata
    assert set(meta.metric_analysis) == {"val_top1", "epoch", "training_iteration"}
    assert set(meta.metric_n_steps) == {"val_top1", "epoch", "training_iteration"}
    assert meta.metric_analysis["val_top1"]["max"] == 0.54 and meta.metric_analysis["epoch"]["last"] == 4
    assert trial.last_result == last  # the MLflow callback and resume still see every metric
    assert len(trial.get_json_state()[1]) < 0.75 * before_json  # the cached JSON was rebuilt, smaller


def test_trim_is_idempotent_and_leaves_unknown_objects_alone():
    trial = _trial_with_results()
    assert trim_finished_trial(trial) == 4  # train_loss, osc_frac, frozen_frac, time_total_s
    assert trim_finished_trial(trial) == 0
    assert trim_finished_trial(object()) == 0

"""Keep the driver's memory per finished trial small.

Ray Tune keeps every ``Trial`` until the experiment ends, and each one carries running
statistics of every numeric result key, config values included (``run_metadata.metric_analysis``:
max, min, avg, last, last-5 and last-10 averages, plus the deques behind the last two), and a
cached JSON copy of them that Tune writes into every experiment checkpoint. oscqat never reads
those statistics: the searcher reads Optuna, reports read MLflow. Once a trial has finished they
are cut to the metrics a scheduler or a person may still ask Tune about. The trial's
``last_result`` is left whole. ``bench/driver_scale.py`` measures the effect.
"""

from __future__ import annotations

from ray.tune import Callback

KEPT_METRICS = ("val_top1", "epoch", "training_iteration")


def trim_finished_trial(trial, keep: tuple[str, ...] = KEPT_METRICS) -> int:
    """Drop the running statistics of every metric not in ``keep``; returns how many were dropped.

    Touches only attributes this Ray version has; anything else is left alone.
    """
    meta = getattr(trial, "run_metadata", None)
    analysis = getattr(meta, "metric_analysis", None)
    if not isinstance(analysis, dict):
        return 0
    dropped = sum(1 for key in analysis if key not in keep)
    if dropped:
        meta.metric_analysis = {k: v for k, v in analysis.items() if k in keep}  # also drops the cached JSON
        steps = getattr(meta, "metric_n_steps", None)
        if isinstance(steps, dict):
            meta.metric_n_steps = {k: v for k, v in steps.items() if k in keep}
    return dropped


class TrimFinishedTrials(Callback):
    """Tune callback: ``trim_finished_trial`` when a trial completes or fails. Put it after
    callbacks that read the statistics (none of oscqat's do)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        trim_finished_trial(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        trim_finished_trial(trial)

"""The Tuners of a target, assembled from the pieces they share, so each reads like Ray Tune's
example: ``Tuner(trainable, tune_config=..., run_config=...)``.

The search Tuner (Optuna proposes, ASHA stops early) and the confirm Tuner (a grid of config x
seed, no early stopping) share the trainable's resources, the run config (storage, failure and
checkpoint policy, verbosity) and the selection metric.
"""

from __future__ import annotations

METRIC, MODE = "val_top1", "max"  # the selection metric: the searcher, ASHA and the confirm stage see only it


def with_trial_resources(campaign, fn, **params):
    """``fn`` with its large arguments put in Ray's object store, on the campaign's per-trial resources."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(fn, checkpoint_interval_s=campaign.checkpoint_interval_s, **params),
                               {"cpu": campaign.resources.cpu, "gpu": campaign.resources.gpu})


def run_config(campaign, name: str, callbacks: list):
    """Where the experiment lives and how trials fail, checkpoint and print."""
    from ray import tune

    from search.progress import tune_verbosity

    return tune.RunConfig(name=name, storage_path=campaign.ray_storage_path(), callbacks=callbacks,
                          failure_config=tune.FailureConfig(max_failures=campaign.max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=campaign.checkpoints_to_keep),
                          verbose=tune_verbosity())


def search_scheduler(budget, grace: int):
    """ASHA on epochs (``training_iteration``), or FIFO (every trial trains ``max_epochs``)."""
    if budget.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", max_t=budget.max_epochs, grace_period=grace,
                             reduction_factor=budget.reduction_factor)
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def build_search_tuner(campaign, target, trainable, searcher, grace: int, mlflow_callback):
    """A fresh search Tuner for ``target`` (a resumed one comes from ``Tuner.restore``)."""
    from ray import tune

    from search.progress import progress_callbacks
    from search.trial_memory import TrimFinishedTrials

    b = campaign.budget
    # the trimmer last: after MLflow read the trial; the compact progress line unless --verbose
    callbacks = [mlflow_callback, *progress_callbacks(target.label, b.num_samples, b.max_epochs), TrimFinishedTrials()]
    tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=search_scheduler(b, grace),
                                  num_samples=b.num_samples, max_concurrent_trials=campaign.max_concurrent_trials,
                                  time_budget_s=b.time_budget_s,
                                  # a new trial reuses a finished trial's worker process: no new
                                  # process, torch import and data set build per trial
                                  reuse_actors=True)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config(campaign, target.slug, callbacks))


def build_confirm_tuner(campaign, target, trainable, param_space: dict, name: str, mlflow_callback, trials: int):
    """A fresh confirm Tuner: the grid ``param_space`` (config x seed), every run to the full budget."""
    from ray import tune

    from search.progress import progress_callbacks

    callbacks = [mlflow_callback, *progress_callbacks(f"{target.label} confirm", trials, campaign.budget.max_epochs)]
    tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, max_concurrent_trials=campaign.max_concurrent_trials,
                                  reuse_actors=True)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config(campaign, name, callbacks))

"""The Tune function trainable: build, (restore,) train epoch by epoch, report.

It only builds, trains and reports (Ray Tune examples style). MLflow is written by the
driver-side callback, so trial processes need no route to the tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from oscqat.config import TrainConfig
from oscqat.trainer import NonFiniteLossError, QuantizerCollapseError, Trainer
from search import faults

CHECKPOINT_FILE = "trainer.pt"


def _set_threads() -> None:
    """Use exactly the CPU share Ray assigned to this task.

    Ray sets OMP_NUM_THREADS only when the user has not, so a shell-exported value would
    otherwise give every 1-CPU trial that many threads; the env var is only a fallback.
    """
    import ray

    cpus = None
    if ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    threads = max(1, int(cpus)) if cpus else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def checkpoint_due(now: float, last: float, interval_s: float, final: bool) -> bool:
    """Checkpoint at the last epoch, and otherwise once ``interval_s`` has passed (0: always)."""
    return final or interval_s <= 0 or now - last >= interval_s


def train_trial(params: dict, *, base_config: dict, fp_state: dict | None = None,
                checkpoint_interval_s: float = 0.0) -> None:
    """One trial: ``base_config`` (campaign base + target) updated with the sampled ``params``."""
    _set_threads()
    # Tune logs "Checkpoint successfully created at: <path>" at INFO for every epoch; Ray forwards
    # it to the driver's terminal, where it buries the progress line
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # the FP weights came with the task (``fp_state``): a cluster node need not have the recorded path
    cfg = TrainConfig.model_validate({**base_config, **params, "pretrained": None})
    fault = faults.spec()  # test hook (search/faults.py); None in normal use
    trainer = Trainer(cfg, pretrained_state=fp_state)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=trainer.device, weights_only=True)
            trainer.load_state_dict(state)
    last_checkpoint = time.monotonic()
    while not trainer.done:
        faults.maybe_inject(fault, trainer.epoch + 1, checkpoint is not None, cfg, trainer, before=True)
        try:
            metrics = trainer.run_epoch()
        except (NonFiniteLossError, QuantizerCollapseError) as exc:
            # Report once and stop: retrying a diverged or collapsed trial from its checkpoint
            # fails again. `failure_reason` makes the searcher record FAIL and MLflow FAILED.
            last = trainer.history[-1] if trainer.history else {}
            tune.report({**last, "epoch": trainer.epoch, "val_top1": 0.0, "failure_reason": str(exc),
                         "max_epochs": cfg.epochs})
            return
        faults.maybe_inject(fault, trainer.epoch, checkpoint is not None, cfg)
        # A JSON string, not a dict: Tune keeps running statistics for every numeric leaf of a
        # result in the driver, which for per-layer values grew the driver by ~100 KB a trial.
        layer_osc = json.dumps({name: round(v["osc_frac"], 6) for name, v in trainer.layer_history[-1].items()})
        result = {**metrics, "max_epochs": cfg.epochs, "layer_osc": layer_osc,
                  "node_id": ray.get_runtime_context().get_node_id()}  # which node ran it (tests, debugging)
        if not checkpoint_due(time.monotonic(), last_checkpoint, checkpoint_interval_s, trainer.done):
            tune.report(result)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save(Path(tmp) / CHECKPOINT_FILE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(trainer.history))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))
        last_checkpoint = time.monotonic()


def confirm_trial(config: dict, *, points: dict, **kwargs) -> None:
    """A confirm-stage trial: the search trial ``config["confirm_of"]``'s params with a fresh seed."""
    from search.confirm import CONFIRM_OF

    train_trial({**points[config[CONFIRM_OF]], "seed": int(config["seed"])}, **kwargs)

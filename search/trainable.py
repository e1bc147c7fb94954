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
    cfg = TrainConfig.model_validate({**base_config, **params, "pretrained": None})
    fault = os.environ.get("OSCQAT_FAULT_INJECT")  # test hook, see _maybe_inject_fault
    trainer = Trainer(cfg, pretrained_state=fp_state)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location=trainer.device, weights_only=True)
            trainer.load_state_dict(state)
    last_checkpoint = time.monotonic()
    while not trainer.done:
        _maybe_inject_fault(fault, trainer.epoch + 1, checkpoint is not None, cfg, trainer, before=True)
        try:
            metrics = trainer.run_epoch()
        except (NonFiniteLossError, QuantizerCollapseError) as exc:
            # Report once and stop: retrying a diverged or collapsed trial from its checkpoint
            # fails again. `failure_reason` makes the searcher record FAIL and MLflow FAILED.
            last = trainer.history[-1] if trainer.history else {}
            tune.report({**last, "epoch": trainer.epoch, "val_top1": 0.0, "failure_reason": str(exc),
                         "max_epochs": cfg.epochs})
            return
        _maybe_inject_fault(fault, trainer.epoch, checkpoint is not None, cfg)
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


def _maybe_inject_fault(spec: str | None, epoch: int, restored: bool, cfg: TrainConfig | None = None,
                        trainer: Trainer | None = None, before: bool = False) -> None:
    """Fault injection for the reliability tests; active only when OSCQAT_FAULT_INJECT is set,
    and only on a trial's first (non-restored) attempt.

    ``spec`` is a comma-separated list of ``KIND@EPOCH[:FIELD=VALUE]``: ``raise`` (an exception once
    epoch EPOCH has trained, before it is reported), ``kill`` (SIGKILL of the trial process at the
    same point), ``nan`` (NaN written into the model's weights before epoch EPOCH, so that epoch's
    loss is non-finite). ``FIELD=VALUE`` limits a fault to trials whose TrainConfig field has that
    value, e.g. ``raise@2:method=lsq,nan@2:method=freeze``. ``sleep@*`` (with
    ``OSCQAT_FAULT_SLEEP_S``) paces every epoch, restored attempts included, so a test can stop a
    campaign while work certainly remains.
    """
    if not spec:
        return
    pace = os.environ.get("OSCQAT_FAULT_SLEEP_S")
    if pace and not before and any(i.strip() == "sleep@*" for i in spec.split(",")):
        time.sleep(float(pace))  # pacing, not a fault: every epoch, restored attempts too
    if restored:
        return
    for item in spec.split(","):
        kind, _, rest = item.strip().partition("@")
        at, _, cond = rest.partition(":")
        if at.strip() != str(epoch) or (kind == "nan") != before:
            continue
        if cond:
            key, _, want = cond.partition("=")
            if cfg is None or str(getattr(cfg, key.strip(), None)) != want.strip():
                continue
        if kind == "raise":
            raise RuntimeError(f"injected fault at epoch {epoch}")
        if kind == "kill":
            os.kill(os.getpid(), 9)
        if kind == "nan" and trainer is not None:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

"""The MLflow run schema of a trial or final run, and the one buffered writer that delivers it.

Three writers log the same kind of run: the driver's Tune callback (``search.trial_callback``),
the final training (``reports.final``) and the repair from Ray's files (``reports.sync``). What a
run holds is defined here once: metric batches (the Trainer's ``SCALAR_METRICS``, finite values
only), params in batches MLflow accepts, a child run's tags, the ``layer_oscillations.json``
artifact and the MLflow status that ends a run in each trial state. ``BufferedWriter`` keeps
writes that failed (server down) in order and retries them later, without stalling the caller.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Callable

from oscqat.metrics import SCALAR_METRICS
from search.tracking import TAG, safe_value

log = logging.getLogger("search.tracking")

PARAMS_PER_BATCH = 90  # MLflow accepts at most 100 params per log_batch
METRICS_PER_BATCH = 900  # ... and 1000 metrics
LAYER_OSC_FILE = "layer_oscillations.json"
CONFIG_FILE = "train_config.yaml"

# How a finished trial ends its run. A pruned trial is not a failure: ASHA stopped it because
# others were better, so its run ends FINISHED with ``oscqat.pruned=true`` (name, description and
# ``oscqat.state`` say PRUNED). KILLED stays for runs a person stopped (Ctrl+C, SIGTERM:
# ``oscqat.interrupted``), FAILED for failures.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
PRUNED_TAG = f"{TAG}pruned"


def finite_metrics(values: dict, step: int, timestamp_ms: int | None = None) -> list:
    """``values``' scalar metrics (the Trainer's names) as MLflow Metrics at ``step``; NaN/inf dropped."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    return [Metric(k, float(values[k]), ts, int(step)) for k in SCALAR_METRICS
            if isinstance(values.get(k), (int, float)) and math.isfinite(float(values[k]))]


def param_batches(params: dict, skip: set[str] = frozenset()) -> list[list]:
    """``params`` as MLflow Params (secrets masked), sorted, in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(k, safe_value(k, v)) for k, v in sorted(params.items()) if k not in skip]
    return [items[i:i + PARAMS_PER_BATCH] for i in range(0, len(items), PARAMS_PER_BATCH)]


def metric_batches(metrics: list) -> list[list]:
    return [metrics[i:i + METRICS_PER_BATCH] for i in range(0, len(metrics), METRICS_PER_BATCH)]


def trial_run_tags(parent_run_id: str, trial_id: str, campaign: str, target_label: str, study_name: str,
                   stage: str = "search", **extra) -> dict:
    """The tags of a trial's child run (masked); ``extra``: ``oscqat.<key>`` tags on top."""
    tags = {"mlflow.parentRunId": parent_run_id, f"{TAG}role": "trial", f"{TAG}trial_id": trial_id,
            f"{TAG}campaign": campaign, f"{TAG}target": target_label, f"{TAG}optuna_study": study_name,
            f"{TAG}stage": stage, **{f"{TAG}{k}": v for k, v in extra.items()}}
    return {k: safe_value(k, v) for k, v in tags.items()}


def end_tags(state: str, reason: str | None = None) -> dict:
    """The tags that record how a trial ended (its state; pruned; a failure's reason)."""
    tags = {f"{TAG}state": state}
    if state == "PRUNED":
        tags[PRUNED_TAG] = "true"
    if reason:
        tags[f"{TAG}failure_reason"] = safe_value("reason", reason)[:4000]
    return tags


def write_layer_oscillations(folder: Path, history: list[dict]) -> Path:
    """``[{epoch, layers: {name: osc_frac}}]`` as the run's ``layer_oscillations.json``: the data
    behind ``oscqat report plot``'s heatmap."""
    path = Path(folder) / LAYER_OSC_FILE
    path.write_text(json.dumps(sorted(history, key=lambda h: h["epoch"])))
    return path


class BufferedWriter:
    """Runs MLflow writes in order; a write that fails is kept (with all after it) and retried.

    After a failure it waits ``retry_interval_s`` before calling the server again, so a dead
    server does not cost MLflow's HTTP timeout on every event. Not picklable on purpose: the
    owner re-creates it after a restore.
    """

    def __init__(self, retry_interval_s: float = 5.0):
        self.retry_interval_s = retry_interval_s
        self.pending: deque[tuple[str, Callable[[], object]]] = deque()
        self.retry_at = 0.0
        self._flushing = False  # a write that creates a run queues more writes: no re-entry

    def backing_off(self) -> bool:
        """The server failed moments ago: callers should not call it now."""
        return time.monotonic() < self.retry_at

    def failed(self, what: str, exc: BaseException) -> None:
        """Record a failure outside the queue (e.g. a lookup): back off as after a failed write."""
        self.retry_at = time.monotonic() + self.retry_interval_s
        log.warning("MLflow %s failed (%s); %d write(s) buffered", what, exc.__class__.__name__, len(self.pending))

    def write(self, description: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` now if the server answers; else buffer it (order kept) for a later flush."""
        self.pending.append((description, fn))
        self.flush()

    def flush(self, attempts: int = 1, wait_s: float = 0.0, force: bool = False) -> bool:
        """Deliver the buffer; True when it is empty. ``force`` ignores the back-off."""
        if self._flushing:
            return False
        if self.pending and not force and self.backing_off():
            return False
        self._flushing = True
        try:
            for attempt in range(attempts):
                if force:
                    self.retry_at = 0.0
                while self.pending:
                    description, fn = self.pending[0]
                    try:
                        fn()
                    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
                        self.failed(f"write {description}", exc)
                        break
                    self.pending.popleft()
                if not self.pending:
                    return True
                if attempt + 1 < attempts:
                    time.sleep(wait_s)
            return not self.pending
        finally:
            self._flushing = False
